"""The continuity of one symbol's trades: what is published, held, confirmed, repaired or given up.

A line publishes a live trade at once when it follows the symbol's sequence: the next id where ids
count trades (Binance), a position not before the last one's and a price near the last one's where ids
are only unique (Upbit, Bithumb). Anything else is held, together with every later trade of the
symbol, and the line asks the exchange's REST history (a `FetchTrades` output) until history covers
the held trades:

- history fills the hole: its trades are published in order, then the held ones;
- a held trade that history should contain but does not, or contains with other values, was
  invented: it is rejected (`unconfirmed-trade-id`) and never published;
- a held trade newer than everything history knows waits `confirm_ms` for history to catch up, then
  is rejected, unless a long enough run of later live trades vouches for it (a real jump of the
  stream that history cannot serve);
- history that no longer reaches back, or an exchange that refuses for `give_up_ms`, ends the repair
  with an unrecoverable gap of exact range.

Pure: no clock (every input carries `now`, epoch ms), no I/O; outputs go to the engine's list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from streams.continuity.outputs import Drop, FetchTrades, GapClosed, Output, Publish, Reject
from streams.records import MarketRecord, Trade

UNCONFIRMED = "unconfirmed-trade-id"
AUDIT_PAGES = 2  # history pages one audit reads at most


@dataclass(frozen=True)
class Settings:
    confirm_ms: int = 5_000  # a held trade newer than history waits this long for history to catch up
    recheck_ms: int = 750  # between history requests while waiting for history to catch up
    answer_timeout_ms: int = 20_000  # a request without answer is asked again
    give_up_ms: int = 120_000  # a repair the exchange will not serve ends unrecoverable
    max_held: int = 20_000  # trades held per symbol before the repair is given up
    corroborate: int = 20  # consecutive live trades that vouch for a jump history cannot confirm
    price_band: float = 0.05  # a price this far from the last published one needs confirmation
    max_pages: int = 20  # history pages per repair where history pages backwards
    retry_first_ms: int = 500
    retry_max_ms: int = 10_000
    recent_ids: int = 2_048  # ids remembered per symbol where ids are only unique
    poll_ms: int = 1_000  # between history requests while the symbol's stream is down (REST fallback)
    audit_min_ms: int = 5_000  # the shortest time between two audits of one symbol
    # A symbol whose stream came up here (a start, a takeover) without a live trade this long asks
    # history for what was missed meanwhile; a busy symbol's first trade shows any gap at no cost.
    quiet_start_ms: int = 10_000


@dataclass
class Seed:
    """What the market topic already holds for a symbol (read at start and after a rebalance)."""

    last_id: int | None = None
    last_position: int | None = None
    last_price: str | None = None
    last_time: int | None = None
    recent_ids: tuple[str, ...] = ()
    recent_from: int | None = None  # position of the oldest of `recent_ids`


class _Held:
    __slots__ = ("key", "origin", "position", "record")

    def __init__(self, key: Any, record: MarketRecord, origin: Any, position: int) -> None:
        self.key = key
        self.record = record
        self.origin = origin
        self.position = position


@dataclass
class _Repair:
    reason: str
    detected_at: int
    after_time: int | None
    request_id: str | None = None
    requested_at: int = 0
    requested_from: int | None = None
    not_before: int = 0
    attempts: int = 0
    requests: int = 0
    waiting_since: int | None = None  # history is behind the held trades since then
    audit_edge: int | None = None  # an audit publishes nothing newer than the stream had reached
    filled: list[list[Any]] = field(default_factory=list)  # [first, last, count] published from history
    pages: list[MarketRecord] = field(default_factory=list)
    target: int | None = None  # position history must reach back to (backward paging)
    audit: bool = False  # a routine look at history for trades a healthy stream skipped
    boundary: bool = False  # the stream may have missed anything since the last trade published
    unreachable: tuple[int | None, int | None] | None = None  # a window history could not serve


def trade(record: MarketRecord) -> Trade:
    data = record.data
    assert isinstance(data, Trade)
    return data


def same_trade(a: MarketRecord, b: MarketRecord) -> bool:
    """The same trade by value (history and stream may spell decimals differently)."""
    x, y = trade(a), trade(b)
    if x.side != y.side:
        return False
    try:
        return Decimal(x.price) == Decimal(y.price) and Decimal(x.quantity) == Decimal(y.quantity)
    except InvalidOperation:
        return False


class Line:
    """The bookkeeping every rule shares: last price, held trades, the open repair, outputs."""

    def __init__(
        self,
        symbol: str,
        group: str,
        settings: Settings,
        out: list[Output],
        next_request_id: Callable[[], str],
    ) -> None:
        self.symbol = symbol
        self.group = group
        self.settings = settings
        self.out = out
        self._next_request_id = next_request_id
        self.last_price: float | None = None
        self.last_time: int | None = None
        self.held: dict[Any, _Held] = {}
        self.repair: _Repair | None = None
        self.down = False  # the stream carrying this symbol is down: history is polled instead

    # -- shared helpers ---------------------------------------------------------------------------

    def price_ok(self, record: MarketRecord) -> bool:
        if self.last_price is None:
            return True
        price = float(trade(record).price)
        return abs(price - self.last_price) <= self.settings.price_band * self.last_price

    def _published(self, record: MarketRecord, origins: tuple[Any, ...]) -> None:
        data = trade(record)
        self.last_price = float(data.price)
        self.last_time = data.trade_time
        self.out.append(Publish(record, origins))

    def _reject(self, held: _Held, detail: str) -> None:
        self.out.append(Reject(held.record, UNCONFIRMED, detail, held.origin))

    def _hold(self, key: Any, record: MarketRecord, origin: Any, position: int) -> None:
        self.held[key] = _Held(key, record, origin, position)

    def _start_repair(self, reason: str, now: int) -> _Repair:
        if self.repair is None:
            self.repair = _Repair(reason, now, self.last_time, not_before=now)
        return self.repair

    def _backoff(self, attempts: int) -> int:
        return min(self.settings.retry_max_ms, self.settings.retry_first_ms * 2 ** max(0, attempts - 1))

    def _issue(self, now: int, from_id: int | None = None, cursor: str | None = None) -> None:
        repair = self.repair
        assert repair is not None
        request_id = self._next_request_id()
        repair.request_id, repair.requested_at, repair.requested_from = request_id, now, from_id
        repair.requests += 1
        self.out.append(FetchTrades(request_id, self.symbol, self.group, from_id, cursor, repair.reason))

    def stream_down(self, now: int) -> None:
        """No connection carries this symbol now: read history instead, every `poll_ms`, until it is up."""
        if self.down:
            return
        self.down = True
        repair = self._start_repair("stream down", now)
        repair.boundary = True
        if repair.request_id is None and now >= repair.not_before:
            self._ask(now)

    def stream_up(self, now: int) -> None:
        if not self.down:
            return
        self.down = False
        repair = self.repair
        if repair is not None:
            repair.boundary = False
        if repair is not None and repair.request_id is None and not self.held:
            self.close_repair(now)

    def _polled(self, now: int) -> None:
        """An answer came back while the stream is down: ask again after `poll_ms`."""
        repair = self.repair
        if repair is not None and self.down and repair.request_id is None:
            repair.not_before = max(repair.not_before, now + self.settings.poll_ms)

    def refused(self, request_id: str, retry_after_ms: int, now: int) -> None:
        """The exchange did not answer a request (throttled, refused, failed)."""
        repair = self.repair
        if repair is None or repair.request_id != request_id:
            return
        repair.request_id = None
        repair.attempts += 1
        repair.not_before = now + max(retry_after_ms, self._backoff(repair.attempts))

    def tick(self, now: int) -> None:
        repair = self.repair
        if repair is None:
            return
        if repair.request_id is not None and now - repair.requested_at >= self.settings.answer_timeout_ms:
            repair.request_id = None  # the answer was lost: ask again
        if now - repair.detected_at >= self.settings.give_up_ms or len(self.held) > self.settings.max_held:
            self._give_up(now)
            return
        if repair.waiting_since is not None and now - repair.waiting_since >= self.settings.confirm_ms:
            self._history_stays_behind(now)
            return
        if repair.request_id is None and now >= repair.not_before:
            self._ask(now)

    # -- what each rule defines -------------------------------------------------------------------

    @property
    def seeded(self) -> bool:
        """Whether the line knows the last trade published (there is something to continue)."""
        raise NotImplementedError

    def seed(self, seed: Seed) -> None:
        raise NotImplementedError

    def quiet_start(self, now: int) -> None:
        """The stream came up here long ago and has carried no trade of this symbol: whatever history
        has since the last trade published was missed (the stream delivers only what follows)."""
        raise NotImplementedError

    def _ask(self, now: int) -> None:
        raise NotImplementedError

    def _give_up(self, now: int) -> None:
        raise NotImplementedError

    def _history_stays_behind(self, now: int) -> None:
        raise NotImplementedError

    def close_repair(self, now: int) -> None:
        raise NotImplementedError


class IncreasingLine(Line):
    """Ids count the symbol's trades one by one (Binance trade ids, aggregate ids).

    A live trade with id `last + 1` (and a price near the last one) follows on. While trades are held,
    history accumulates in `pool`; ids below a held trade that history also knows were skipped by the
    stream (the stream delivers in id order), so history fills them. A held id history does not reach
    yet may be a real trade history has not caught up with, or an invented one: it waits.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last: int | None = None
        self.pool: dict[int, MarketRecord] = {}  # history beyond `last`, while a repair is open

    @property
    def seeded(self) -> bool:
        return self.last is not None

    def seed(self, seed: Seed) -> None:
        if seed.last_id is not None:
            self.last = seed.last_id
            self.last_price = float(seed.last_price) if seed.last_price else None
            self.last_time = seed.last_time

    def live(self, record: MarketRecord, origin: Any, now: int) -> None:
        trade_id = int(trade(record).trade_id)
        last = self.last
        if (last is not None and trade_id <= last) or trade_id in self.held:
            self.out.append(Drop(origin))  # delivered already (a reconnect's replay, an overlap)
            return
        if last is None:
            self.last = trade_id  # nothing known before: the stream starts here
            self._published(record, (origin,))
            return
        if trade_id == last + 1 and self.price_ok(record):
            self.last = trade_id
            self._published(record, (origin,))
            if self.repair is not None:
                self._advance(now)
            return
        self._hold(trade_id, record, origin, trade_id)
        repair = self._start_repair("jump" if trade_id > last + 1 else "price", now)
        if repair.request_id is None and now >= repair.not_before and repair.waiting_since is None:
            self._ask(now)

    def quiet_start(self, now: int) -> None:
        if self.last is None or self.repair is not None or self.held:
            return
        repair = self._start_repair("quiet start", now)
        repair.boundary = True
        self._ask(now)

    def _ask(self, now: int) -> None:
        assert self.last is not None
        frontier = max(self.pool, default=self.last)
        self._issue(now, from_id=max(frontier, self.last) + 1)

    def history(self, records: list[MarketRecord], request_id: str | None, page_full: bool, now: int) -> None:
        if self.last is None:
            return  # nothing to continue: the live stream decides where this symbol starts
        repair = self.repair
        answered = repair is not None and request_id is not None and repair.request_id == request_id
        ids = sorted(int(trade(r).trade_id) for r in records)
        if repair is None:
            self._follow_history(records)  # the fallback poller's, while the stream is down
            return
        if answered:
            repair.request_id, repair.attempts = None, 0
            asked = repair.requested_from
            if asked == self.last + 1 and ids and ids[0] > asked:
                # History no longer reaches back to what is missing.
                self._unrecoverable(asked, ids[0] - 1, now, "history does not reach back that far")
                self.last = ids[0] - 1
        for record in records:
            trade_id = int(trade(record).trade_id)
            if trade_id > self.last:
                self.pool[trade_id] = record
        self._advance(now)
        if not answered or self.repair is None:
            return
        frontier = max(self.pool, default=self.last)
        if page_full:
            self._ask(now)  # history goes on: read it up to the held trades
        elif self.down:
            self._polled(now)
        elif self.held and min(self.held) > frontier:
            # History has nothing newer yet: the lowest held trade waits for it (or is invented).
            if repair.waiting_since is None:
                repair.waiting_since = now
            repair.not_before = now + self.settings.recheck_ms

    def _follow_history(self, records: list[MarketRecord]) -> None:
        assert self.last is not None
        for record in sorted(records, key=lambda r: int(trade(r).trade_id)):
            if int(trade(record).trade_id) == self.last + 1:
                self.last += 1
                self._published(record, ())

    def _advance(self, now: int) -> None:
        """Publish everything that now follows on, from history and from the held trades."""
        assert self.last is not None
        repair, pool = self.repair, self.pool
        frontier = max(pool, default=None)
        # History speaks for ids up to the highest held id it also reaches: below a live trade, an id
        # the stream did not deliver was skipped. While the stream is down, for everything it has.
        if repair is not None and repair.boundary:
            proven = frontier
        else:
            proven = max((k for k in self.held if frontier is not None and k <= frontier), default=None)
        while True:
            next_id = self.last + 1
            known = pool.pop(next_id, None) if proven is not None and next_id <= proven else None
            held = self.held.pop(next_id, None)
            if known is not None:
                if held is not None and not same_trade(held.record, known):
                    self._reject(held, f"the exchange's history has trade {next_id} with other values")
                    held = None
                if held is not None:
                    self._published(held.record, (held.origin,))
                else:
                    self._published(known, ())
                    self._note_filled(next_id)
                self.last = next_id
                continue
            if held is not None:
                if self.price_ok(held.record):
                    self._published(held.record, (held.origin,))
                    self.last = next_id
                    continue
                self.held[next_id] = held  # a price far off waits for history to confirm it
            break
        for trade_id in [k for k in pool if k <= self.last]:
            del pool[trade_id]
        if not self.held and not self.down:
            self.close_repair(now)
        elif repair is not None and proven is not None:
            repair.waiting_since = None  # history moved on; the next lowest held trade waits afresh

    def _note_filled(self, trade_id: int) -> None:
        repair = self.repair
        if repair is None:
            return
        if repair.filled and repair.filled[-1][1] == trade_id - 1:
            repair.filled[-1][1] = trade_id
            repair.filled[-1][2] += 1
        else:
            repair.filled.append([trade_id, trade_id, 1])

    def _corroborated(self, first: int) -> bool:
        run = 0
        while first + run in self.held and run < self.settings.corroborate:
            run += 1
        return run >= self.settings.corroborate

    def _history_stays_behind(self, now: int) -> None:
        """History still lacks the lowest held trade after `confirm_ms`: a jump it cannot see yet is
        believed only when enough later live trades follow it; anything else was invented."""
        self._settle_lowest(now, "not in the exchange's history")

    def _give_up(self, now: int) -> None:
        while self.held:
            self._settle_lowest(now, "the exchange's history could not be read")
        self.close_repair(now)

    def _settle_lowest(self, now: int, why: str) -> None:
        assert self.last is not None
        lowest = min(self.held)
        if self._corroborated(lowest):
            # The run is real, so whatever history has below it was skipped by the stream.
            while self.last + 1 in self.pool and self.last + 1 < lowest:
                self.last += 1
                self._published(self.pool.pop(self.last), ())
                self._note_filled(self.last)
            if lowest > self.last + 1:
                self._unrecoverable(self.last + 1, lowest - 1, now, why)
            self.last = lowest - 1
            while self.last + 1 in self.held:  # the run vouches for itself, price included
                held = self.held.pop(self.last + 1)
                self._published(held.record, (held.origin,))
                self.last += 1
        else:
            held = self.held.pop(lowest)
            self._reject(held, f"{why} within {self.settings.confirm_ms // 1000} s")
        if self.repair is not None:
            self.repair.waiting_since = None
        self._advance(now)

    def _unrecoverable(self, first: int, last: int, now: int, why: str) -> None:
        repair = self.repair
        detected = repair.detected_at if repair else now
        self.out.append(
            GapClosed(
                self.symbol, "trade", "unrecoverable", why, detected, now, self.last_time, None,
                str(first), str(last), last - first + 1, 0, repair.requests if repair else 0,
            )
        )  # fmt: skip

    def close_repair(self, now: int) -> None:
        repair, self.repair = self.repair, None
        self.pool.clear()
        if repair is None:
            return
        for first, last, count in repair.filled:
            self.out.append(
                GapClosed(
                    self.symbol, "trade", "repaired", repair.reason, repair.detected_at, now,
                    repair.after_time, self.last_time, str(first), str(last), last - first + 1, count,
                    repair.requests,
                )
            )  # fmt: skip


class RecentIds:
    """The last `size` ids of a symbol, for exchanges whose ids are unique but unordered, with the
    position of the oldest one: how far back `in` can tell a published trade from a new one."""

    __slots__ = ("order", "seen", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[tuple[Any, int]] = deque()
        self.seen: set[Any] = set()

    def __contains__(self, key: Any) -> bool:
        return key in self.seen

    def add(self, key: Any, position: int) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        self.order.append((key, position))
        if len(self.order) > self.size:
            self.seen.discard(self.order.popleft()[0])

    @property
    def full(self) -> bool:
        return len(self.order) >= self.size

    def oldest_position(self) -> int | None:
        return min((position for _, position in self.order), default=None) if self.order else None


def id_key(trade_id: str) -> Any:
    """Ids as ints where they are digits (smaller and faster to hash), else as the text."""
    return int(trade_id) if trade_id.isdigit() and len(trade_id) < 40 else trade_id


class TimedLine(Line):
    """Ids are unique but say nothing reliable about order; a position (the trade time, or an id that
    encodes it) orders trades, and history pages backwards from the newest trade (Upbit, Bithumb)."""

    def __init__(
        self,
        *args: Any,
        position: Callable[[Trade], int],
        consistent: Callable[[Trade], bool],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._position = position
        self._consistent = consistent
        self.last_position: int | None = None
        self.recent = RecentIds(self.settings.recent_ids)
        self.connections: set[str] = set()
        self.last_audit = 0  # epoch ms of the last audit started
        self.audited_to: int | None = None  # position up to which history was compared

    @property
    def seeded(self) -> bool:
        return self.last_position is not None

    def seed(self, seed: Seed) -> None:
        if seed.last_position is not None:
            self.last_position = seed.last_position
            self.last_price = float(seed.last_price) if seed.last_price else None
            self.last_time = seed.last_time
        for trade_id in seed.recent_ids:
            self.recent.add(id_key(trade_id), seed.recent_from or seed.last_position or 0)
        # Audits never look before what the seed can tell apart.
        self.audited_to = seed.recent_from if seed.recent_from is not None else seed.last_position

    def position(self, record: MarketRecord) -> int:
        return self._position(trade(record))

    def follows(self, record: MarketRecord, position: int) -> bool:
        last = self.last_position
        in_order = last is None or position >= last
        return in_order and self._consistent(trade(record)) and self.price_ok(record)

    def boundary(self, reason: str, now: int) -> None:
        """The stream may have missed trades here (a new connection, lost frames, a silence, a restart):
        history fills in everything after the last trade published."""
        if self.last_position is None:
            return  # nothing published before: nothing to continue from
        repair = self._start_repair(reason, now)
        repair.reason = reason
        repair.boundary = True
        repair.audit = False
        if repair.target is None or repair.target > self.last_position:
            repair.target = self.last_position
        if repair.request_id is None and now >= repair.not_before and repair.waiting_since is None:
            self._ask(now)

    def quiet_start(self, now: int) -> None:
        if self.repair is None and not self.held:
            self.boundary("quiet start", now)

    def audit(self, now: int) -> bool:
        """Compare what history has with what was published since the last audit: where ids cannot show
        a gap, a stream that skips trades on a healthy connection is caught only this way. Trades keep
        flowing meanwhile; what the audit finds missing is published late. False: nothing to audit."""
        if self.repair is not None or self.held or self.last_position is None:
            return False
        self.last_audit = now
        repair = self._start_repair("audit", now)
        repair.audit = True
        # Only as far back as the recent ids reach: older published trades could not be told from new.
        oldest = self.recent.oldest_position() if self.recent.full else None
        repair.target = max(self.audited_to or 0, oldest or 0) or None
        repair.audit_edge = self.last_position
        self._ask(now)
        return True

    def live(self, record: MarketRecord, origin: Any, now: int, connection: str | None = None) -> None:
        key = id_key(trade(record).trade_id)
        if key in self.recent or key in self.held:
            self.out.append(Drop(origin))
            return
        if connection is not None and connection not in self.connections:
            self.boundary("new connection" if self.connections else "restart", now)
            self.connections.add(connection)
            if len(self.connections) > 8:
                self.connections = {connection}
        position = self.position(record)
        auditing = self.repair is not None and self.repair.audit
        if (self.repair is None or auditing) and not self.held and self.follows(record, position):
            self._publish(key, record, (origin,), position)
            return
        self._hold(key, record, origin, position)
        repair = self._start_repair("suspect", now)
        repair.audit = False  # an audit under way becomes this repair
        if repair.target is None or (self.last_position is not None and position < repair.target):
            repair.target = position if self.last_position is None else min(position, self.last_position)
        if repair.request_id is None and now >= repair.not_before and repair.waiting_since is None:
            self._ask(now)

    def _publish(self, key: Any, record: MarketRecord, origins: tuple[Any, ...], position: int) -> None:
        self.recent.add(key, position)
        if self.audited_to is None:
            self.audited_to = position  # the line starts here: history before it is not ours to audit
        if self.last_position is None or position > self.last_position:
            self.last_position = position
        self._published(record, origins)

    def _ask(self, now: int) -> None:
        repair = self.repair
        assert repair is not None
        repair.pages = []
        self._issue(now)  # the newest page first

    def history(self, records: list[MarketRecord], request_id: str | None, page_full: bool, now: int) -> None:
        """A page of history, oldest first. Pages of one repair go back until they reach its target."""
        repair = self.repair
        if repair is None or request_id is None or repair.request_id != request_id:
            self._unsolicited(records)
            return
        repair.request_id, repair.attempts = None, 0
        repair.pages[:0] = records
        target = repair.target if repair.target is not None else self.last_position
        oldest = self.position(records[0]) if records else None
        if oldest is not None and target is not None and oldest > target:
            pages = repair.requests
            if page_full and pages < (AUDIT_PAGES if repair.audit else self.settings.max_pages):
                self._issue(now, cursor=trade(records[0]).trade_id)
                return
            # History ends (or is cut off) before it reaches the last trade published.
            if not repair.audit:  # an audit just looks no further back than it could
                repair.unreachable = (self.last_time, trade(records[0]).trade_time)
        if repair.audit:
            self._audited(now)
            return
        self._merge(now)

    def _audited(self, now: int) -> None:
        """Publish what history has between the audit's target and the stream's edge that was never
        published (late: the stream skipped it)."""
        repair = self.repair
        assert repair is not None
        start, edge = repair.target, repair.audit_edge
        found = []
        for record in repair.pages:
            key, position = id_key(trade(record).trade_id), self.position(record)
            if key in self.recent or key in self.held or edge is None or position > edge:
                continue
            if start is None or position >= start:
                found.append((position, key, record))
        found.sort(key=lambda item: item[0])
        for position, key, record in found:
            repair.filled.append([key, key, 1])
            self._publish(key, record, (), position)
        self.audited_to = edge
        self.close_repair(now)

    def _unsolicited(self, records: list[MarketRecord]) -> None:
        """History nobody asked for (the fallback poller while the stream is down): what it adds after
        the last trade published is published, in order."""
        if self.held or self.repair is not None or self.last_position is None:
            return
        for record in sorted(records, key=self.position):
            key, position = id_key(trade(record).trade_id), self.position(record)
            if key not in self.recent and position >= self.last_position:
                self._publish(key, record, (), position)

    def _merge(self, now: int) -> None:
        repair = self.repair
        assert repair is not None
        pages = repair.pages
        repair.pages = []
        frontier = max((self.position(r) for r in pages), default=None)
        # History covers a held trade made before its newest trade (by trade time: an invented id's
        # position may say anything); one of the same millisecond may be newer than the page.
        newest_time = max((trade(r).trade_time for r in pages), default=None)
        known = {id_key(trade(r).trade_id): r for r in pages}
        start = repair.target if repair.target is not None else self.last_position
        covered = [
            h
            for h in self.held.values()
            if newest_time is not None and trade(h.record).trade_time < newest_time
        ]
        # After a boundary everything history has since the last trade published was missed; after a
        # suspect trade only what lies before held trades is (the rest the stream may still deliver).
        limit = frontier if repair.boundary else max((h.position for h in covered), default=None)
        confirmed: dict[Any, tuple[Any, ...]] = {}
        for held in sorted(covered, key=lambda h: h.position):
            del self.held[held.key]
            match = known.get(held.key)
            if match is None:
                self._reject(held, "not in the exchange's history")
            elif not same_trade(held.record, match):
                self._reject(held, "the exchange's history has this id with other values")
            else:
                confirmed[held.key] = (held.origin,)
        fresh = []
        for key, record in known.items():
            position = self.position(record)
            missed = limit is not None and (start is None or position >= start) and position <= limit
            if key not in self.recent and (key in confirmed or missed):
                fresh.append((position, key, record))
        fresh.sort(key=lambda item: item[0])
        for position, key, record in fresh:
            origins = confirmed.pop(key, ())
            same_moment = self.held.pop(key, None)  # a held trade of history's newest millisecond
            if same_moment is not None:
                if same_trade(same_moment.record, record):
                    origins = (same_moment.origin,)
                else:
                    self._reject(same_moment, "the exchange's history has this id with other values")
            if not origins:
                repair.filled.append([key, key, 1])
            self._publish(key, record, origins, position)
        # What is left is newer than history: it follows now, or waits for a later page.
        for held in sorted(self.held.values(), key=lambda h: h.position):
            if self.follows(held.record, held.position):
                del self.held[held.key]
                self._publish(held.key, held.record, (held.origin,), held.position)
        if self.down:
            repair.target = self.last_position
            self._polled(now)
            return
        if self.held:
            if repair.waiting_since is None:
                repair.waiting_since = now
            repair.not_before = now + self.settings.recheck_ms
            repair.target = self.last_position
            repair.boundary = False  # what history had is in; the rest is judged like live trades
            return
        self.close_repair(now)

    def _history_stays_behind(self, now: int) -> None:
        for held in sorted(self.held.values(), key=lambda h: h.position):
            self._reject(held, f"not in the exchange's history within {self.settings.confirm_ms // 1000} s")
        self.held.clear()
        self.close_repair(now)

    def _give_up(self, now: int) -> None:
        repair = self.repair
        if repair is not None and repair.unreachable is None:
            repair.unreachable = (self.last_time, None)
        for held in sorted(self.held.values(), key=lambda h: h.position):
            if self.follows(held.record, held.position):
                self._publish(held.key, held.record, (held.origin,), held.position)
            else:
                self._reject(held, "the exchange's history could not be read to confirm it")
        self.held.clear()
        self.close_repair(now)

    def close_repair(self, now: int) -> None:
        repair, self.repair = self.repair, None
        if repair is None:
            return
        if repair.unreachable is not None:
            after, before = repair.unreachable
            self.out.append(
                GapClosed(
                    self.symbol, "trade", "unrecoverable", repair.reason, repair.detected_at, now,
                    after, before, None, None, None, len(repair.filled), repair.requests,
                    "the exchange's history does not reach back to the last trade published",
                )
            )  # fmt: skip
        elif repair.filled:
            self.out.append(
                GapClosed(
                    self.symbol, "trade", "repaired", repair.reason, repair.detected_at, now,
                    repair.after_time, self.last_time, None, None, len(repair.filled), len(repair.filled),
                    repair.requests,
                )
            )  # fmt: skip
