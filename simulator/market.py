"""The simulated market: exchange-independent ground truth that every dialect serves.

Each instrument has a trade tape: a seeded random walk whose i-th trade (id, price, quantity, taker
side) and the best bid/ask after it depend only on (seed, symbol, i). The clock decides only *when*
trades happen, so two runs with the same seed see the same trades whatever their timing. Klines and
24 h statistics are derived from the kept history, which is why a REST answer and a WebSocket frame
about the same period always agree.

Prices and quantities are integers of the instrument's tick and lot sizes, so volumes and quote
volumes are exact; they are rendered as decimal strings only at the edge.
"""

from __future__ import annotations

import calendar
import math
import random
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import msgspec

TakerSide = Literal["buy", "sell"]
Clock = Callable[[], float]

DAY_MS = 86_400_000
_FIXED_INTERVAL_MS = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}
KLINE_INTERVALS: tuple[str, ...] = (*_FIXED_INTERVAL_MS, "1M")
_MONDAY_OFFSET_MS = 4 * DAY_MS  # 1970-01-01 was a Thursday; weekly bars open on Mondays

# Rough opening prices in USD so the generated markets look familiar; other bases get a seeded price.
_USD_PRICES = {
    "BTC": 60_000.0,
    "ETH": 3_000.0,
    "BNB": 600.0,
    "SOL": 150.0,
    "XRP": 0.6,
    "DOGE": 0.15,
    "ADA": 0.45,
    "TRX": 0.12,
    "DOT": 7.0,
    "LINK": 15.0,
    "LTC": 80.0,
    "AVAX": 30.0,
    "USDT": 1.0,
    "USDC": 1.0,
    "FDUSD": 1.0,
    "USD": 1.0,
    "EUR": 1.08,
    "KRW": 1 / 1350,
}
_VOLATILITY = 0.0002  # standard deviation of one trade's price step, relative to the price
_TRIANGULAR_SCALE = 6**0.5  # u1 - u2 of two uniforms has standard deviation 1/sqrt(6)
_REVERSION = 0.0005  # pull back towards the opening price so long runs stay plausible
_MEAN_NOTIONAL_USD = 800.0


def format_units(units: int, decimals: int, places: int | None = None) -> str:
    """`units` * 10^-decimals as a decimal string with `places` fractional digits (rounded half up)."""
    if places is None:
        places = decimals
    if places < decimals:
        divisor = 10 ** (decimals - places)
        units = (abs(units) + divisor // 2) // divisor * (1 if units >= 0 else -1)
    elif places > decimals:
        units *= 10 ** (places - decimals)
    # String slicing rather than divmod and an f-string: this runs several times per trade.
    digits = str(abs(units))
    sign = "-" if units < 0 else ""
    if places == 0:
        return sign + digits
    if len(digits) <= places:
        digits = digits.rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def format_ratio(numerator: int, denominator: int, places: int) -> str:
    """numerator / denominator as a decimal string with `places` digits, rounded half away from zero."""
    if denominator == 0:
        return format_units(0, 0, places)
    scaled = abs(numerator) * 10**places * 2 // abs(denominator)
    rounded = (scaled + 1) // 2
    negative = (numerator < 0) != (denominator < 0) and rounded != 0
    return format_units(-rounded if negative else rounded, places)


def interval_ms(interval: str) -> int:
    """The nominal length of a kline interval (a 31-day month for `1M`)."""
    if interval == "1M":
        return 31 * DAY_MS
    return _FIXED_INTERVAL_MS[interval]


def bar_open_time(interval: str, time_ms: int) -> int:
    """Open time of the `interval` bar that contains `time_ms` (UTC, Binance alignment)."""
    if interval == "1M":
        moment = datetime.fromtimestamp(time_ms / 1000, UTC)
        return calendar.timegm((moment.year, moment.month, 1, 0, 0, 0)) * 1000
    if interval == "1w":
        return (time_ms - _MONDAY_OFFSET_MS) // interval_ms("1w") * interval_ms("1w") + _MONDAY_OFFSET_MS
    length = _FIXED_INTERVAL_MS[interval]
    return time_ms // length * length


def next_bar_open_time(interval: str, open_time: int) -> int:
    if interval == "1M":
        moment = datetime.fromtimestamp(open_time / 1000, UTC)
        year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
    return open_time + _FIXED_INTERVAL_MS[interval]


@dataclass(frozen=True, slots=True)
class Instrument:
    """A traded pair and the seeded constants of its tape."""

    symbol: str  # "BTC/USDT"
    base: str
    quote: str
    price_decimals: int  # tick size is 10^-price_decimals
    quantity_decimals: int  # lot size is 10^-quantity_decimals
    opening_price: int  # in ticks
    first_trade_id: int
    first_update_id: int
    mean_quantity: int  # in lots

    @classmethod
    def create(cls, symbol: str, seed: int) -> Instrument:
        base, slash, quote = symbol.partition("/")
        if not slash or not base or not quote or "/" in quote:
            raise ValueError(f"symbol {symbol!r} is not BASE/QUOTE")
        rng = random.Random(f"{seed}/{symbol}/instrument")
        base_usd = _USD_PRICES.get(base, 10 ** rng.uniform(-2, 3))
        quote_usd = _USD_PRICES.get(quote, 1.0)
        price = base_usd / quote_usd
        # Keep price + quantity decimals <= 8 so quote volumes stay exact in 8-decimal strings.
        if price >= 1000:
            price_decimals, quantity_decimals = 2, 5
        elif price >= 100:
            price_decimals, quantity_decimals = 2, 4
        elif price >= 1:
            price_decimals, quantity_decimals = 4, 2
        elif price >= 0.01:
            price_decimals, quantity_decimals = 6, 1
        else:
            price_decimals, quantity_decimals = 8, 0
        mean_quantity = _MEAN_NOTIONAL_USD / base_usd * 10**quantity_decimals
        return cls(
            symbol=symbol,
            base=base,
            quote=quote,
            price_decimals=price_decimals,
            quantity_decimals=quantity_decimals,
            opening_price=max(100, round(price * 10**price_decimals)),
            first_trade_id=1000 + rng.randrange(1_000_000),
            first_update_id=10_000 + rng.randrange(100_000_000),
            mean_quantity=max(1, round(mean_quantity)),
        )

    def price(self, ticks: int, places: int | None = None) -> str:
        return format_units(ticks, self.price_decimals, places)

    def quantity(self, lots: int, places: int | None = None) -> str:
        return format_units(lots, self.quantity_decimals, places)

    def notional(self, units: int, places: int | None = None) -> str:
        """A price * quantity product (such as a quote volume) as a decimal string."""
        return format_units(units, self.price_decimals + self.quantity_decimals, places)


class Trade(msgspec.Struct, frozen=True, gc=False):
    symbol: str
    id: int
    price: str  # at the instrument's precision
    quantity: str
    price_ticks: int
    quantity_lots: int
    taker_side: TakerSide
    time: int  # epoch ms


class Quote(msgspec.Struct, frozen=True, gc=False):
    """The best bid and ask; `update_id` grows with every book change (one per trade)."""

    symbol: str
    update_id: int
    bid_ticks: int
    bid_lots: int
    ask_ticks: int
    ask_lots: int


@dataclass(frozen=True, slots=True)
class Tick:
    time: int  # epoch ms of the tick
    trades: list[Trade]
    quotes: list[Quote]  # the book after each symbol's last trade of the tick


@dataclass(slots=True)
class Kline:
    interval: str
    open_time: int
    close_time: int
    open: int  # prices in ticks, volumes in lots, quote volumes in tick * lot units
    high: int
    low: int
    close: int
    volume: int = 0
    quote_volume: int = 0
    taker_buy_volume: int = 0
    taker_buy_quote_volume: int = 0
    count: int = 0
    first_id: int = -1
    last_id: int = -1

    def add(self, trade: Trade) -> None:
        price, lots = trade.price_ticks, trade.quantity_lots
        if self.count == 0:
            self.open = self.high = self.low = price
            self.first_id = trade.id
        elif price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.close = price
        self.last_id = trade.id
        self.count += 1
        self.volume += lots
        self.quote_volume += price * lots
        if trade.taker_side == "buy":
            self.taker_buy_volume += lots
            self.taker_buy_quote_volume += price * lots

    def copy(self) -> Kline:
        return replace(self)


@dataclass(frozen=True, slots=True)
class RollingStats:
    """Statistics of the trades in (open_time, close_time]; prices in ticks, volumes in lots."""

    open_time: int
    close_time: int
    previous_close: int  # the last price before the window
    open: int
    high: int
    low: int
    last: int
    last_quantity: int
    volume: int
    quote_volume: int
    count: int
    first_id: int
    last_id: int


TRIM_CHUNKS = 8  # a history with a limit forgets its oldest trades in this many chunks of it


class TradeHistory:
    """A symbol's trades in id order, optionally keeping only the newest `limit` of them."""

    def __init__(self, first_id: int, limit: int | None) -> None:
        self.first_id = first_id  # id of the very first trade ever generated
        self._trades: list[Trade] = []
        self._start = 0  # list position of the oldest kept trade
        self._limit = limit
        self._chunk = max(1, limit // TRIM_CHUNKS) if limit else 0
        self.total = 0  # trades ever appended
        self.trim_listeners: list[Callable[[int], None]] = []  # told the index about to become oldest

    def append(self, trade: Trade) -> None:
        self._trades.append(trade)
        self.total += 1
        if self._limit is not None and len(self._trades) - self._start > self._limit:
            self._start += 1
            # Forgotten trades leave the list, and the listeners catch up on them, a chunk at a time,
            # each symbol at its own phase (its first id). Once per `limit` trades, every symbol of one
            # rate trimmed in the same tick: at 100 symbols x 100/s a 150-330 ms stall every 10 s
            # (docs/benchmarks.md). Deleting the list head is O(n): not at every trade either.
            if self._start >= self._chunk and (self.total + self.first_id) % self._chunk == 0:
                for listener in self.trim_listeners:
                    listener(self.begin)
                del self._trades[: self._start]
                self._start = 0

    # Positions are absolute: index i is trade id first_id + i, whether or not it is still kept.
    @property
    def begin(self) -> int:
        return self.total - (len(self._trades) - self._start)

    @property
    def end(self) -> int:
        return self.total

    def index_of_id(self, trade_id: int) -> int:
        return trade_id - self.first_id

    def at(self, index: int) -> Trade:
        return self._trades[index - self.total + len(self._trades)]

    def last(self) -> Trade | None:
        return self._trades[-1] if len(self._trades) > self._start else None

    def slice(self, start: int, stop: int) -> list[Trade]:
        offset = len(self._trades) - self.total
        start, stop = max(start, self.begin), min(stop, self.end)
        return self._trades[start + offset : stop + offset] if start < stop else []

    def first_index_at_or_after(self, time_ms: int) -> int:
        offset = len(self._trades) - self.total
        position = bisect_left(self._trades, time_ms, lo=self._start, key=_trade_time)
        return position - offset

    def first_index_after(self, time_ms: int) -> int:
        offset = len(self._trades) - self.total
        position = bisect_right(self._trades, time_ms, lo=self._start, key=_trade_time)
        return position - offset


def _trade_time(trade: Trade) -> int:
    return trade.time


class _RollingWindow:
    """24 h statistics kept incrementally: new trades are added, expired ones subtracted.

    High and low come from monotonic deques, so moving the window costs O(1) amortized per trade.
    """

    def __init__(self, history: TradeHistory, reference_price: int) -> None:
        self._history = history
        self._reference_price = reference_price
        self.left = self.right = history.begin  # the window holds trades [left, right)
        self._volume = self._quote_volume = 0
        self._highs: deque[tuple[int, int]] = deque()  # (price, index), prices decreasing
        self._lows: deque[tuple[int, int]] = deque()  # (price, index), prices increasing
        self._previous_close = reference_price
        history.trim_listeners.append(self._drop_before)

    def stats(self, now_ms: int, window_ms: int) -> RollingStats:
        # Trades forgotten since the last trim are still in the history's list: leave them out here.
        self._drop_before(self._history.begin)
        cutoff = now_ms - window_ms
        history = self._history
        while self.left < self.right and history.at(self.left).time <= cutoff:
            self._drop_oldest()
        last = history.last()
        if self.left == self.right:
            price = last.price_ticks if last is not None else self._reference_price
            return RollingStats(cutoff, now_ms, price, price, price, price, price, 0, 0, 0, 0, -1, -1)
        assert last is not None
        first = history.at(self.left)
        return RollingStats(
            open_time=cutoff,
            close_time=now_ms,
            previous_close=self._previous_close,
            open=first.price_ticks,
            high=self._highs[0][0],
            low=self._lows[0][0],
            last=last.price_ticks,
            last_quantity=last.quantity_lots,
            volume=self._volume,
            quote_volume=self._quote_volume,
            count=self.right - self.left,
            first_id=first.id,
            last_id=last.id,
        )

    def _extend(self) -> None:
        history = self._history
        for index in range(self.right, history.end):
            trade = history.at(index)
            price = trade.price_ticks
            self._volume += trade.quantity_lots
            self._quote_volume += price * trade.quantity_lots
            while self._highs and self._highs[-1][0] <= price:
                self._highs.pop()
            self._highs.append((price, index))
            while self._lows and self._lows[-1][0] >= price:
                self._lows.pop()
            self._lows.append((price, index))
        self.right = history.end

    def _drop_oldest(self) -> None:
        trade = self._history.at(self.left)
        self._volume -= trade.quantity_lots
        self._quote_volume -= trade.price_ticks * trade.quantity_lots
        self._previous_close = trade.price_ticks
        if self._highs[0][1] == self.left:
            self._highs.popleft()
        if self._lows[0][1] == self.left:
            self._lows.popleft()
        self.left += 1

    def _drop_before(self, index: int) -> None:
        # Called before the history forgets trades: afterwards they could no longer be subtracted.
        self._extend()
        while self.left < min(index, self.right):
            self._drop_oldest()


@dataclass(slots=True)
class _Tape:
    """The generator state of one instrument: everything here advances only when a trade is made."""

    instrument: Instrument
    rng: random.Random
    history: TradeHistory
    window: _RollingWindow
    price: int
    quote: Quote  # the book as of the last tick
    book: tuple[int, int, int, int, int]  # the book after the last trade: update id, bid, lots, ask, lots
    floor: int
    due: float = 0.0  # trades owed but not yet generated (the fractional carry between ticks)
    kline_cache: dict[str, Kline] = field(default_factory=dict)  # interval -> newest built bar
    kline_next: dict[str, int] = field(default_factory=dict)  # interval -> next index to fold in


class Market:
    """Deterministic trades for a set of symbols, generated at a steady rate as time passes."""

    def __init__(
        self,
        symbols: Sequence[str],
        seed: int = 1,
        trades_per_second: float = 10.0,
        clock: Clock = time.time,
        history_limit: int | None = None,
    ) -> None:
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be unique")
        if trades_per_second < 0:
            raise ValueError("trades_per_second must not be negative")
        if history_limit is not None and history_limit < 1:
            raise ValueError("history_limit must be positive")
        self.seed = seed
        self.trades_per_second = trades_per_second
        self.clock = clock
        self.instruments: dict[str, Instrument] = {}
        self._tapes: dict[str, _Tape] = {}
        for symbol in symbols:
            instrument = Instrument.create(symbol, seed)
            history = TradeHistory(instrument.first_trade_id, history_limit)
            price = instrument.opening_price
            spread = max(1, price // 10_000)
            book = (
                instrument.first_update_id,
                price - spread,
                instrument.mean_quantity,
                price + spread,
                instrument.mean_quantity,
            )
            self.instruments[symbol] = instrument
            self._tapes[symbol] = _Tape(
                instrument=instrument,
                rng=random.Random(f"{seed}/{symbol}/tape"),
                history=history,
                window=_RollingWindow(history, price),
                price=price,
                quote=Quote(symbol, *book),
                book=book,
                floor=max(10, price // 10),
                # Each symbol's first trade comes at its own point of the first interval: symbols that
                # all traded in the same tick sent a quiet feed as a burst every 1/rate seconds, which
                # a real exchange does not (and which made a quiet worker look half as busy).
                due=random.Random(f"{seed}/{symbol}/phase").random(),
            )
        self.started_at = int(clock() * 1000)
        self._last_tick = clock()
        self._paused = False

    # -- generation -------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last_tick = self.clock()  # paused time owes no trades

    def tick(self, now: float | None = None, max_elapsed: float | None = None) -> Tick:
        """Generate the trades due since the previous tick; returns them and the books they moved.

        `max_elapsed` bounds the time one tick may cover: a caller that fell behind skips the excess
        (the market just runs slower) instead of generating an ever larger backlog.
        """
        if now is None:
            now = self.clock()
        now_ms = int(now * 1000)
        elapsed = now - self._last_tick
        if self._paused or elapsed <= 0:
            if self._paused:
                self._last_tick = now
            return Tick(now_ms, [], [])
        if max_elapsed is not None and elapsed > max_elapsed:
            elapsed = max_elapsed
        start = now - elapsed
        self._last_tick = now
        trades: list[Trade] = []
        quotes: list[Quote] = []
        owed = self.trades_per_second * elapsed
        for tape in self._tapes.values():
            tape.due += owed
            count = int(tape.due)
            if count == 0:
                continue
            tape.due -= count
            # Spread the trades evenly over the elapsed time rather than stamping them all `now`.
            spacing = elapsed / count
            self._make_trades(tape, [int((start + spacing * k) * 1000) for k in range(1, count + 1)], trades)
            tape.quote = Quote(tape.instrument.symbol, *tape.book)
            quotes.append(tape.quote)
        return Tick(now_ms, trades, quotes)

    @staticmethod
    def _make_trades(tape: _Tape, times: list[int], out: list[Trade]) -> None:
        """Append the tape's next trades, one per time; the hot path of the whole simulator."""
        draw = tape.rng.random
        instrument = tape.instrument
        symbol, opening, mean = instrument.symbol, instrument.opening_price, instrument.mean_quantity
        price_decimals, quantity_decimals = instrument.price_decimals, instrument.quantity_decimals
        history = tape.history
        price, floor = tape.price, tape.floor
        update_id, bid, bid_lots, ask, ask_lots = tape.book
        for time_ms in times:
            # Exactly seven draws per trade keep the i-th trade a function of (seed, symbol, i).
            # The difference of two uniforms is a cheap bell-ish step with standard deviation 1.
            step = round(
                (draw() - draw()) * _TRIANGULAR_SCALE * price * _VOLATILITY + (opening - price) * _REVERSION
            )
            coin, size, spread, bid_size, ask_size = draw(), draw(), draw(), draw(), draw()
            price = max(floor, price + step)
            quantity = 1 + int(-math.log(1.0 - size) * mean)  # exponential sizes: many small, few big
            buy = step > 0 or (step == 0 and coin < 0.5)
            trade = Trade(
                symbol,
                history.first_id + history.total,
                format_units(price, price_decimals),
                format_units(quantity, quantity_decimals),
                price,
                quantity,
                "buy" if buy else "sell",
                time_ms,
            )
            history.append(trade)
            out.append(trade)
            # A buyer lifted the ask, so the ask is at the trade price; a seller hit the bid.
            gap = 1 + int(spread * 3)
            bid, ask = (price - gap, price) if buy else (price, price + gap)
            bid_lots, ask_lots = 1 + int(bid_size * 6 * mean), 1 + int(ask_size * 6 * mean)
            update_id += 1
        tape.price = price
        tape.book = (update_id, bid, bid_lots, ask, ask_lots)

    # -- queries ----------------------------------------------------------------------------------

    def history(self, symbol: str) -> TradeHistory:
        return self._tapes[symbol].history

    def trades(self, symbol: str) -> list[Trade]:
        """Every kept trade of `symbol`, oldest first."""
        history = self._tapes[symbol].history
        return history.slice(history.begin, history.end)

    def trades_generated(self) -> dict[str, int]:
        return {symbol: tape.history.total for symbol, tape in self._tapes.items()}

    def quote(self, symbol: str) -> Quote:
        return self._tapes[symbol].quote

    def last_price(self, symbol: str) -> int:
        return self._tapes[symbol].price

    def rolling_stats(self, symbol: str, now_ms: int, window_ms: int = DAY_MS) -> RollingStats:
        return self._tapes[symbol].window.stats(now_ms, window_ms)

    def kline(self, symbol: str, interval: str, open_time: int) -> Kline:
        """The bar of `interval` opening at `open_time`, from the trades generated so far.

        The newest bar per (symbol, interval) is built incrementally, so streaming the current bar
        every second costs only the trades made since the previous call.
        """
        tape = self._tapes[symbol]
        history = tape.history
        close_time = next_bar_open_time(interval, open_time) - 1
        cached = tape.kline_cache.get(interval)
        resumable = cached is not None and tape.kline_next[interval] >= history.begin
        if cached is not None and resumable and cached.open_time == open_time:
            bar, index = cached, tape.kline_next[interval]
        else:
            index = history.first_index_at_or_after(open_time)
            bar = self._empty_bar(tape, interval, open_time, close_time, index)
            if cached is not None and open_time < cached.open_time:
                return self._fold(bar, history, index)  # an old bar: build it without touching the cache
            tape.kline_cache[interval] = bar
        end = history.end
        while index < end:
            trade = history.at(index)
            if trade.time > close_time:
                break
            bar.add(trade)
            index += 1
        tape.kline_next[interval] = index
        return bar.copy()

    def klines(
        self, symbol: str, interval: str, start_ms: int | None, end_ms: int | None, limit: int, now_ms: int
    ) -> list[Kline]:
        """Bars whose open time lies in [start_ms, end_ms], from the market's start to now.

        Without a start it returns the newest `limit` bars up to `end_ms` (default now).
        """
        first_open = bar_open_time(interval, self.started_at)
        last_open = bar_open_time(interval, now_ms if end_ms is None else min(end_ms, now_ms))
        opens: list[int] = []
        if start_ms is not None:
            open_time = max(first_open, bar_open_time(interval, start_ms))
            if open_time < start_ms:
                open_time = next_bar_open_time(interval, open_time)
            while open_time <= last_open and len(opens) < limit:
                opens.append(open_time)
                open_time = next_bar_open_time(interval, open_time)
        else:
            open_time = last_open
            while open_time >= first_open and len(opens) < limit:
                opens.append(open_time)
                open_time = bar_open_time(interval, open_time - 1)
            opens.reverse()
        tape = self._tapes[symbol]
        bars = []
        for open_time in opens:
            close_time = next_bar_open_time(interval, open_time) - 1
            index = tape.history.first_index_at_or_after(open_time)
            bars.append(
                self._fold(self._empty_bar(tape, interval, open_time, close_time, index), tape.history, index)
            )
        return bars

    @staticmethod
    def _empty_bar(tape: _Tape, interval: str, open_time: int, close_time: int, index: int) -> Kline:
        # A bar without trades sits at the previous close, as exchanges show quiet periods.
        history = tape.history
        if index > history.begin:
            previous = history.at(index - 1).price_ticks
        elif history.begin == 0:
            previous = tape.instrument.opening_price
        else:  # the trades before this bar were forgotten (history limit): the best guess left
            previous = history.at(index).price_ticks if index < history.end else tape.price
        return Kline(interval, open_time, close_time, previous, previous, previous, previous)

    @staticmethod
    def _fold(bar: Kline, history: TradeHistory, index: int) -> Kline:
        stop = history.first_index_after(bar.close_time)
        for trade in history.slice(index, stop):
            bar.add(trade)
        return bar
