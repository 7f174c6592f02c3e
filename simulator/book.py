"""Ground-truth order books for the simulator's dialects, their diff streams, and the depth faults.

Each dialect's market gets one book per symbol, made the first time anything asks for it (a depth
subscription, a REST snapshot, the ground-truth endpoint) and advanced at every tick from then on.
A book agrees with the dialect's trades and bookTicker: its best bid and ask are the market's quote
(the levels the last trade left) at the quote's update id, and every change of the book carries the
update id the market gave the trades that made it. Below the top, levels sit a typical trade's
price step apart at first (so a trade moves the top by a level or two, not through the whole book),
with sizes from a hash of the price; each update id also changes, removes or adds one level near the
top (a deterministic function of the seed, symbol and id), and the book is kept at `depth` levels a
side by dropping or adding levels at its far end. Prices and sizes are integers of
the instrument's ticks and lots; dialects format them.

The book remembers the changes of its recent ticks (`HISTORY_SECONDS`), so it can show itself as of
any recent tick's update id: what a test compares a rebuilt book with, and what a stale snapshot is
made of.

Endpoints (`?exchange=<dialect>`, Binance spot without it; `symbol` in the dialect's spelling or
BASE/QUOTE):

    GET  /_sim/book?symbol=BTCUSDT[&updateId=N][&levels=100]
         the book now, or as of the recent update id N as the dialect names ids (Binance `u` and
         `lastUpdateId`; Upbit's orderbook timestamp; Bithumb's µs timestamp string), levels
         formatted as the dialect sends them: {"exchange", "symbol", "updateId", "time", "bids", "asks"}
    POST /_sim/books  {"symbol": "BTCUSDT", "updateIds": ["N", ...], "levels": 100}  the book as of each
         id, in one walk back through its history: {"books": [book as above, or null for an id not
         remembered, ...]}
    POST /_sim/faults/depth-skip      {"count": 1, "symbol": "BTCUSDT"}  the next `count` diff events of
         the symbol (of any symbol without `symbol`) are not sent, on live connections: the next event
         sent on that stream does not continue the previous one
    POST /_sim/faults/stale-snapshot  {"count": 1, "seconds": 2}  the next `count` REST snapshots show
         the book as it was `seconds` ago: older than diffs already sent
"""

from __future__ import annotations

import asyncio
import zlib
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from simulator.market import Instrument, Market, Quote, Tick

DEPTH = 1000  # levels a side in every ground-truth book
HISTORY_SECONDS = 60.0  # how far back a book can show itself
MAX_HISTORY = 20_000  # ticks remembered per book at most
TRUTHS_PER_STEP = 100  # ids of a /_sim/books request looked up between two turns of the event loop
CHURN_PER_TICK = 8  # at most this many churn changes per tick, however many update ids it covers
CHURN_DISTANCE = 12  # churn touches the levels this close to the top
# Levels are this fraction of the price apart: the market's typical price step per trade (market.py).
LEVEL_SPACING = 0.0002
_MASK = (1 << 64) - 1

Changes = dict[tuple[bool, int], int]  # (is bid, price ticks) → lots now, 0 when the level is gone
Levels = list[tuple[int, int]]  # (price ticks, lots), best first
Undo = list[tuple[bool, int, int]]  # (is bid, price ticks, lots before; 0: absent)
Format = Callable[[Instrument, int], str]  # a dialect's price or quantity text


def _mix(value: int) -> int:
    """splitmix64: a cheap, well-spread hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


@dataclass(slots=True)
class _Entry:
    """One tick's changes: enough to undo them (the lots each level had before, 0 if absent)."""

    update_id: int
    time: int
    undo: Undo


class TruthBook:
    """One symbol's ground-truth book."""

    def __init__(self, instrument: Instrument, quote: Quote, time_ms: int, depth: int = DEPTH) -> None:
        self.instrument = instrument
        self.depth = depth
        self.update_id = quote.update_id
        self.time = time_ms
        self._salt = _mix(zlib.crc32(instrument.symbol.encode()) << 32 ^ instrument.first_update_id)
        self.spacing = max(1, round(instrument.opening_price * LEVEL_SPACING))
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self._bid_prices: list[int] = []  # ascending: the best bid is last
        self._ask_prices: list[int] = []  # ascending: the best ask is first
        self.history: deque[_Entry] = deque()
        # The state before the oldest remembered tick: the book as made, or after a forgotten tick.
        self.floor = (quote.update_id, time_ms)
        for level in range(depth):
            if quote.bid_ticks - level * self.spacing > 0:
                price = quote.bid_ticks - level * self.spacing
                self.bids[price] = quote.bid_lots if level == 0 else self._resting_lots(price)
            price = quote.ask_ticks + level * self.spacing
            self.asks[price] = quote.ask_lots if level == 0 else self._resting_lots(price)
        self._bid_prices = sorted(self.bids)
        self._ask_prices = sorted(self.asks)

    def _resting_lots(self, price: int) -> int:
        return 1 + _mix(price ^ self._salt) % (6 * self.instrument.mean_quantity)

    # -- evolution --------------------------------------------------------------------------------

    def advance(self, quote: Quote, time_ms: int) -> Changes:
        """Move to the quote's update id; returns the levels that changed."""
        if quote.update_id <= self.update_id:
            return {}
        changes: Changes = {}
        undo: Undo = []
        first_churn = max(self.update_id + 1, quote.update_id - CHURN_PER_TICK + 1)
        for update_id in range(first_churn, quote.update_id + 1):
            self._churn(_mix(update_id ^ self._salt), changes, undo)
        # The quote is the top: the trades took (or the makers withdrew) what lies inside it.
        while self._bid_prices and self._bid_prices[-1] > quote.bid_ticks:
            self._set(True, self._bid_prices[-1], 0, changes, undo)
        while self._ask_prices and self._ask_prices[0] < quote.ask_ticks:
            self._set(False, self._ask_prices[0], 0, changes, undo)
        self._set(True, quote.bid_ticks, quote.bid_lots, changes, undo)
        self._set(False, quote.ask_ticks, quote.ask_lots, changes, undo)
        self._keep_depth(changes, undo)
        self.update_id, self.time = quote.update_id, time_ms
        self._remember(_Entry(quote.update_id, time_ms, undo))
        return changes

    def _churn(self, draw: int, changes: Changes, undo: Undo) -> None:
        is_bid = bool(draw & 1)
        prices = self._bid_prices if is_bid else self._ask_prices
        distance = 1 + (draw >> 1) % CHURN_DISTANCE  # never the top: the quote owns it
        if distance >= len(prices):
            return
        price = prices[-1 - distance] if is_bid else prices[distance]
        action = (draw >> 8) % 6
        if action == 0:
            self._set(is_bid, price, 0, changes, undo)
        elif action == 1:  # a maker joins between this level and the next one out
            step = max(1, self.spacing // 2)
            outside = price - step if is_bid else price + step
            if outside > 0 and outside not in (self.bids if is_bid else self.asks):
                self._set(is_bid, outside, self._resting_lots(outside), changes, undo)
        else:
            self._set(is_bid, price, 1 + (draw >> 16) % (6 * self.instrument.mean_quantity), changes, undo)

    def _keep_depth(self, changes: Changes, undo: Undo) -> None:
        bids, asks = self._bid_prices, self._ask_prices
        while len(bids) > self.depth:
            self._set(True, bids[0], 0, changes, undo)
        while len(asks) > self.depth:
            self._set(False, asks[-1], 0, changes, undo)
        spacing = self.spacing
        while len(bids) < self.depth and bids and bids[0] > spacing:
            self._set(True, bids[0] - spacing, self._resting_lots(bids[0] - spacing), changes, undo)
        while len(asks) < self.depth and asks:
            self._set(False, asks[-1] + spacing, self._resting_lots(asks[-1] + spacing), changes, undo)

    def _set(self, is_bid: bool, price: int, lots: int, changes: Changes, undo: Undo) -> None:
        levels, prices = (self.bids, self._bid_prices) if is_bid else (self.asks, self._ask_prices)
        before = levels.get(price, 0)
        if before == lots:
            return
        undo.append((is_bid, price, before))
        changes[(is_bid, price)] = lots
        if lots:
            levels[price] = lots
            if not before:
                _insort(prices, price)
            return
        del levels[price]
        # Most changes are at an end of a side (the top moving, the far end kept at depth).
        if prices[-1] == price:
            prices.pop()
        elif prices[0] == price:
            del prices[0]
        else:
            del prices[bisect_left(prices, price)]

    def _remember(self, entry: _Entry) -> None:
        history = self.history
        history.append(entry)
        horizon = entry.time - HISTORY_SECONDS * 1000
        while len(history) > MAX_HISTORY or history[0].time < horizon:
            forgotten = history.popleft()
            self.floor = (forgotten.update_id, forgotten.time)

    # -- queries ----------------------------------------------------------------------------------

    def top(self, levels: int) -> tuple[Levels, Levels]:
        bids = [(price, self.bids[price]) for price in reversed(self._bid_prices[-levels:])]
        asks = [(price, self.asks[price]) for price in self._ask_prices[:levels]]
        return bids, asks

    def states(self) -> Iterator[tuple[int, int]]:
        """(update id, tick time) of every state the book can show, oldest first."""
        yield self.floor
        for entry in self.history:
            yield entry.update_id, entry.time

    def as_of(self, update_id: int) -> tuple[Levels, Levels] | None:
        """Every level as it was at a remembered tick's update id; None for any other id."""
        if update_id == self.update_id:
            return self.top(self.depth)
        if all(state_id != update_id for state_id, _ in self.states()):
            return None
        walk = _Walk(self.bids, self.asks, self._bid_prices, self._ask_prices)
        for entry in reversed(self.history):
            if entry.update_id <= update_id:
                break
            walk.undo(entry)
        return walk.top(len(walk.bid_prices) + len(walk.ask_prices))

    def as_of_many(self, update_ids: Iterable[int], levels: int) -> dict[int, tuple[Levels, Levels]]:
        """The top `levels` of each side as they were at each remembered id among `update_ids`, in one
        walk back through the history (a test checking every record of a stream asks for hundreds).
        The walk keeps each side's prices sorted, so a top is a slice: a scan of the whole book per
        id held the simulator's event loop, and so every stream it serves, for seconds."""
        remembered = {self.update_id, *(state_id for state_id, _ in self.states())}
        wanted = set(update_ids) & remembered
        found: dict[int, tuple[Levels, Levels]] = {}
        walk = _Walk(self.bids, self.asks, self._bid_prices, self._ask_prices)
        if self.update_id in wanted:
            found[self.update_id] = walk.top(levels)
        for entry in reversed(self.history):
            if len(found) == len(wanted):
                break
            if entry.update_id in wanted:  # the state before undoing an entry is the state at its id
                found[entry.update_id] = walk.top(levels)
            walk.undo(entry)
        if self.floor[0] in wanted and self.floor[0] not in found:
            found[self.floor[0]] = walk.top(levels)
        return found

    def update_id_at(self, time_ms: float) -> int:
        """The update id of the last remembered state at or before `time_ms` (the oldest if none)."""
        chosen = self.floor[0]
        for update_id, at in self.states():
            if at > time_ms:
                break
            chosen = update_id
        return chosen

    def time_of(self, update_id: int) -> int:
        return next((at for state_id, at in self.states() if state_id == update_id), self.time)


class _Walk:
    """A copy of a book's levels that ticks are undone on, each side's prices kept sorted."""

    __slots__ = ("ask_prices", "asks", "bid_prices", "bids")

    def __init__(self, bids: dict[int, int], asks: dict[int, int], bid_prices: list[int],
                 ask_prices: list[int]) -> None:  # fmt: skip
        self.bids, self.asks = dict(bids), dict(asks)
        self.bid_prices, self.ask_prices = list(bid_prices), list(ask_prices)

    def undo(self, entry: _Entry) -> None:
        for is_bid, price, before in reversed(entry.undo):
            side, prices = (self.bids, self.bid_prices) if is_bid else (self.asks, self.ask_prices)
            if before:
                if price not in side:
                    _insort(prices, price)
                side[price] = before
            else:
                del side[price]
                del prices[bisect_left(prices, price)]

    def top(self, levels: int) -> tuple[Levels, Levels]:
        bids, asks = self.bids, self.asks
        best_bids = self.bid_prices[max(0, len(self.bid_prices) - levels) :]
        return ([(price, bids[price]) for price in reversed(best_bids)],
                [(price, asks[price]) for price in self.ask_prices[:levels]])  # fmt: skip


def _insort(prices: list[int], price: int) -> None:
    # Most inserts land at an end (a new top, a refilled far level): check those before bisecting.
    if not prices or price > prices[-1]:
        prices.append(price)
    elif price < prices[0]:
        prices.insert(0, price)
    else:
        insort(prices, price)


# -- diff streams (Binance) ---------------------------------------------------------------------------


@dataclass(slots=True)
class DiffStream:
    """One diff depth stream (`btcusdt@depth@100ms`): changes gathered between its events."""

    name: str
    symbol: str
    interval_ms: int
    last_update_id: int  # `u` of the stream's previous event (sent or skipped)
    next_at_ms: int = 0
    pending: Changes = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DiffEvent:
    stream: str
    symbol: str
    first_update_id: int  # U
    last_update_id: int  # u
    prev_update_id: int  # pu
    bids: Levels
    asks: Levels


class DepthFeed:
    """One dialect's ground-truth books, its diff streams and its depth faults."""

    def __init__(
        self,
        market: Market,
        names: dict[str, str],
        price: Format,
        quantity: Format,
        book_id: Callable[[int, int], str] = lambda update_id, time_ms: str(update_id),
        depth: int = DEPTH,
    ) -> None:
        self.market = market
        self.names = names  # every accepted spelling of a symbol (exchange's, BASE/QUOTE) → market symbol
        self.price, self.quantity = price, quantity
        self.book_id = book_id  # (update id, tick time) → the id as the dialect sends it
        self.depth = depth
        self.books: dict[str, TruthBook] = {}
        self.streams: dict[str, DiffStream] = {}
        self._by_symbol: dict[str, list[DiffStream]] = {}
        self._skips: dict[str | None, int] = {}  # market symbol (None: every symbol) → events to skip
        self.stale_snapshots = 0
        self.stale_seconds = 2.0
        self.counts = {"skippedDiffs": 0, "staleSnapshots": 0}

    def book(self, symbol: str) -> TruthBook:
        book = self.books.get(symbol)
        if book is None:
            instrument = self.market.instruments[symbol]
            quote = self.market.quote(symbol)
            now_ms = int(self.market.clock() * 1000)
            book = self.books[symbol] = TruthBook(instrument, quote, now_ms, self.depth)
        return book

    def advance(self, tick: Tick) -> None:
        """Move every book in use to the tick's quotes and gather the changes for its streams."""
        books = self.books
        if not books:
            return
        for quote in tick.quotes:
            book = books.get(quote.symbol)
            if book is None:
                continue
            changes = book.advance(quote, tick.time)
            for stream in self._by_symbol.get(quote.symbol, ()):
                stream.pending.update(changes)

    # -- diff streams -----------------------------------------------------------------------------

    def open_stream(self, name: str, symbol: str, interval_ms: int) -> None:
        book = self.book(symbol)
        stream = DiffStream(name, symbol, interval_ms, book.update_id)
        self.streams[name] = stream
        self._by_symbol.setdefault(symbol, []).append(stream)

    def close_stream(self, name: str) -> None:
        stream = self.streams.pop(name, None)
        if stream is not None:
            self._by_symbol[stream.symbol].remove(stream)

    def due_events(self, now_ms: int) -> Iterator[DiffEvent]:
        """The events due by `now_ms`, each stream at its own speed; skipped ones are consumed here."""
        for stream in self.streams.values():
            if now_ms < stream.next_at_ms:
                continue
            stream.next_at_ms = now_ms - now_ms % stream.interval_ms + stream.interval_ms
            if not stream.pending:
                continue  # nothing changed: Binance sends nothing
            book = self.books[stream.symbol]
            pending, stream.pending = stream.pending, {}
            previous, stream.last_update_id = stream.last_update_id, book.update_id
            if self._take_skip(stream.symbol):
                self.counts["skippedDiffs"] += 1
                continue
            bids = sorted(((p, lots) for (is_bid, p), lots in pending.items() if is_bid), reverse=True)
            asks = sorted((p, lots) for (is_bid, p), lots in pending.items() if not is_bid)
            yield DiffEvent(stream.name, stream.symbol, previous + 1, book.update_id, previous, bids, asks)

    def _take_skip(self, symbol: str) -> bool:
        for key in (symbol, None):
            left = self._skips.get(key, 0)
            if left:
                self._skips[key] = left - 1
                return True
        return False

    # -- snapshots and ground truth -----------------------------------------------------------------

    def snapshot(self, symbol: str, limit: int) -> tuple[int, int, list[list[str]], list[list[str]]]:
        """(update id, tick time, bids, asks) of a REST snapshot, formatted; a stale one if asked for."""
        update_id, time_ms, bids, asks = self.snapshot_levels(symbol, limit)
        instrument = self.market.instruments[symbol]
        return update_id, time_ms, self.format(instrument, bids), self.format(instrument, asks)

    def snapshot_levels(self, symbol: str, limit: int) -> tuple[int, int, Levels, Levels]:
        """A REST snapshot's (update id, tick time, bids, asks) in ticks and lots."""
        book = self.book(symbol)
        update_id = book.update_id
        if self.stale_snapshots:
            self.stale_snapshots -= 1
            self.counts["staleSnapshots"] += 1
            update_id = book.update_id_at(book.time - self.stale_seconds * 1000)
        levels = book.as_of(update_id)
        assert levels is not None
        return update_id, book.time_of(update_id), levels[0][:limit], levels[1][:limit]

    def truth(self, wanted: str, dialect_id: str | None, levels: int) -> dict[str, Any] | None:
        """The ground truth of `/_sim/book` (now, without an id); None for an unknown symbol, {"error"}
        for an unknown id."""
        symbol = self.names.get(wanted)
        if symbol is None:
            return None
        if dialect_id is None:
            book = self.book(symbol)
            dialect_id = self.book_id(book.update_id, book.time)
        [answer] = self.truths(wanted, [dialect_id], levels) or [None]
        return answer or {"error": f"update id {dialect_id} is not a remembered state of {wanted}"}

    def truths(self, wanted: str, dialect_ids: list[str], levels: int) -> list[dict[str, Any] | None] | None:
        """The truth at many ids of one symbol at once, in their order (None for an id not remembered),
        from one walk back through its history; None for an unknown symbol."""
        symbol = self.names.get(wanted)
        if symbol is None:
            return None
        book = self.book(symbol)
        by_dialect_id: dict[str, tuple[int, int]] = {}
        for uid, at in [(book.update_id, book.time), *book.states()]:  # an id's newest state first
            by_dialect_id.setdefault(self.book_id(uid, at), (uid, at))
        known = [by_dialect_id[i] for i in dialect_ids if i in by_dialect_id]
        tops = book.as_of_many((uid for uid, _ in known), levels)
        # The same levels recur in answer after answer: each price and size is formatted once.
        prices: dict[int, str] = {}
        sizes: dict[int, str] = {}
        answers: list[dict[str, Any] | None] = []
        for dialect_id in dialect_ids:
            state = by_dialect_id.get(dialect_id)
            if state is None or state[0] not in tops:
                answers.append(None)
                continue
            bids, asks = tops[state[0]]
            answers.append({"symbol": wanted, "updateId": dialect_id, "time": state[1],
                            "bids": self.format(book.instrument, bids, prices, sizes),
                            "asks": self.format(book.instrument, asks, prices, sizes)})  # fmt: skip
        return answers

    def format(
        self,
        instrument: Instrument,
        levels: Iterable[tuple[int, int]],
        prices: dict[int, str] | None = None,
        sizes: dict[int, str] | None = None,
    ) -> list[list[str]]:
        """Levels as the dialect writes them; `prices` and `sizes` remember texts across calls."""
        prices = {} if prices is None else prices
        sizes = {} if sizes is None else sizes
        formatted = []
        for ticks, lots in levels:
            price = prices.get(ticks)
            if price is None:
                price = prices[ticks] = self.price(instrument, ticks)
            size = sizes.get(lots)
            if size is None:
                size = sizes[lots] = self.quantity(instrument, lots)
            formatted.append([price, size])
        return formatted

    # -- faults -----------------------------------------------------------------------------------

    def skip(self, wanted: str | None, count: int) -> bool:
        symbol = None if wanted is None else self.names.get(wanted)
        if wanted is not None and symbol is None:
            return False
        self._skips[symbol] = self._skips.get(symbol, 0) + count
        return True

    def state(self) -> dict[str, Any]:
        return {
            "books": len(self.books),
            "diffStreams": len(self.streams),
            "skipsPending": {str(k): v for k, v in self._skips.items() if v},
            "staleSnapshotsPending": self.stale_snapshots,
            **self.counts,
        }


# -- endpoints ----------------------------------------------------------------------------------------


def add_routes(app: web.Application, venues: dict[str, Any], default: str) -> None:
    """`/_sim/book` and the depth faults, for every dialect that has a `depth` feed."""

    def feed(request: web.Request) -> DepthFeed:
        venue = venues.get(request.query.get("exchange", default))
        depth = getattr(venue, "depth", None)
        if not isinstance(depth, DepthFeed):
            raise web.HTTPNotFound(text="unknown exchange, or one without order books")
        return depth

    async def body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        data = await request.json()
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return data

    def number(data: dict[str, Any], key: str, default: float) -> float:
        value = data.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise web.HTTPBadRequest(text=f"{key} must be a non-negative number")
        return float(value)

    async def book(request: web.Request) -> web.Response:
        depth = feed(request)
        levels = request.query.get("levels", "100")
        if not levels.isdigit():
            raise web.HTTPBadRequest(text="levels must be a number")
        answer = depth.truth(request.query.get("symbol", ""), request.query.get("updateId"), int(levels))
        if answer is None:
            return _json({"error": "unknown symbol"}, 400)
        return _json(answer, 404 if "error" in answer else 200)

    async def books(request: web.Request) -> web.Response:
        depth, data = feed(request), await body(request)
        ids, levels = data.get("updateIds"), data.get("levels", 100)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise web.HTTPBadRequest(text="updateIds must be a list of strings")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 0:
            raise web.HTTPBadRequest(text="levels must be a non-negative number")
        answers: list[dict[str, Any] | None] = []
        for start in range(0, max(len(ids), 1), TRUTHS_PER_STEP):
            if start:  # the streams this simulator serves go on between steps
                await asyncio.sleep(0)
            step = depth.truths(str(data.get("symbol", "")), ids[start : start + TRUTHS_PER_STEP], levels)
            if step is None:
                return _json({"error": "unknown symbol"}, 400)
            answers += step
        return _json({"books": answers})

    async def skip(request: web.Request) -> web.Response:
        depth, data = feed(request), await body(request)
        symbol = data.get("symbol")
        if symbol is not None and not isinstance(symbol, str):
            raise web.HTTPBadRequest(text="symbol must be a string")
        if not depth.skip(symbol, int(number(data, "count", 1))):
            return _json({"error": "unknown symbol"}, 400)
        return _json(depth.state())

    async def stale(request: web.Request) -> web.Response:
        depth, data = feed(request), await body(request)
        depth.stale_snapshots += int(number(data, "count", 1))
        depth.stale_seconds = number(data, "seconds", 2)
        return _json(depth.state())

    app.router.add_get("/_sim/book", book)
    app.router.add_post("/_sim/books", books)
    app.router.add_post("/_sim/faults/depth-skip", skip)
    app.router.add_post("/_sim/faults/stale-snapshot", stale)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")
