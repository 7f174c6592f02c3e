"""Validation of normalized market records, and per-symbol trade-id tracking.

The normalize agents run every record an adapter produces through a `Validator` before publishing
it. A record that breaks a rule is refused with a `Rejection` whose reason is the dead-letter slug:

    invalid-price          a price that is not a positive plain decimal (`"16578.50"`; no sign, exponent,
                           NaN or Infinity); a ticker change that is not a signed plain decimal
    invalid-quantity       a trade or bbo quantity that is not a positive plain decimal
    invalid-volume         a volume that is not a non-negative plain decimal, or a negative trade count
    implausible-timestamp  an event or trade time before 2009, or further than the clock-skew window
                           from the receive time (only the future side is checked for REST input,
                           whose records may legitimately be old)
    inconsistent-kline     high < max(open, close), low > min(open, close), or endTime < startTime
    crossed-book           a bbo or ticker whose bid is not below its ask; an order book snapshot whose
                           best bid is not below its best ask
    invalid-trade-id       a trade id that is not an integer on an exchange with increasing ids
    invalid-update-id      a depth record or diff whose update ids are not non-negative integers, or
                           whose first id is past its last

Order book levels (`depth_problem` for what adapters parse, the same rules for depth records): a price
must be a positive plain decimal of at most 18 decimals (invalid-price); a quantity a plain decimal,
zero only in a diff or update, where it removes the level (invalid-quantity: negative, not a number,
or zero in a snapshot).

Continuity (repeats, gaps, ids that do not follow) is not checked here: the continuity engine
(streams/continuity/) does that for every trade that passes these checks.

Speed: this runs for every record (30k+/s; about 1 µs per trade). Plain-decimal checks are string
methods, not Decimal; comparisons go through floats, which decide exactly whenever they differ
(correctly rounded conversion is monotonic), and fall back to Decimal only when the floats are equal.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, NamedTuple

from streams.book import PRICE_DECIMALS, price_key
from streams.depth import DepthBook, DepthDiff, DepthSnapshot
from streams.records import Bbo, Depth, Kline, MarketRecord, Ticker, Trade

TradeIdPolicy = Literal["increasing", "unique", "none"]
"""How an exchange's trade ids behave, declared by each adapter (`ExchangeAdapter.trade_ids`) and
followed by the continuity engine:

increasing  ids rise by one per trade and symbol (Binance): a jump is a gap
unique      ids are unique but not ordered (Upbit, Bithumb `sequential_id`): repeats are dropped, gaps
            are found from the connection and repaired from history
none        ids carry no guarantee: no tracking
"""

DEFAULT_CLOCK_SKEW_SECONDS = 300.0
EARLIEST_PLAUSIBLE_MS = 1_230_768_000_000  # 2009-01-01: no exchange traded before; catches seconds
MAX_NUMBER_LENGTH = 64  # longer digit strings are garbage, and would be slow to compare


class Rejection(NamedTuple):
    reason: str
    detail: str = ""


def _unsigned(text: str) -> bool:
    """A plain decimal ≥ 0: ASCII digits with at most one point (method calls, not a regex: faster)."""
    digits = text.replace(".", "", 1)
    return digits.isdigit() and digits.isascii() and len(text) <= MAX_NUMBER_LENGTH


def _positive(text: str) -> bool:
    digits = text.replace(".", "", 1)
    return (
        digits.isdigit() and digits.isascii() and len(text) <= MAX_NUMBER_LENGTH and digits.strip("0") != ""
    )


def _less(a: str, b: str) -> bool:
    """a < b for validated plain decimals, exactly."""
    fa, fb = float(a), float(b)
    if fa != fb:
        return fa < fb
    return Decimal(a) < Decimal(b)


class Validator:
    """Checks the records of one exchange; holds only per-symbol state of bounded size."""

    def __init__(
        self,
        exchange: str,
        trade_ids: TradeIdPolicy = "unique",
        clock_skew_seconds: float = DEFAULT_CLOCK_SKEW_SECONDS,
    ) -> None:
        self.exchange = exchange
        self.trade_ids = trade_ids
        self.skew_ms = int(clock_skew_seconds * 1000)

    def check(self, record: MarketRecord, live: bool = True) -> Rejection | None:
        """None when the record may go on (to the continuity engine, for trades); else why not.

        `live` is False for REST input, whose records may be older than the clock-skew window.
        """
        received_at = record.received_at
        latest = received_at + self.skew_ms
        earliest = received_at - self.skew_ms if live else EARLIEST_PLAUSIBLE_MS
        if earliest < EARLIEST_PLAUSIBLE_MS:
            earliest = EARLIEST_PLAUSIBLE_MS
        if not earliest <= record.timestamp <= latest:
            return _implausible(record.timestamp, received_at, self.skew_ms)
        data = record.data
        # Trades come first and inline: they are most of the traffic.
        if type(data) is Trade:
            if not earliest <= data.trade_time <= latest:
                return _implausible(data.trade_time, received_at, self.skew_ms)
            if not _positive(data.price):
                return Rejection("invalid-price", f"price {data.price!r}")
            if not _positive(data.quantity):
                return Rejection("invalid-quantity", f"quantity {data.quantity!r}")
            if self.trade_ids == "increasing":
                text = data.trade_id
                if not (text.isdigit() and text.isascii() and len(text) <= 20):
                    return Rejection("invalid-trade-id", f"trade id {text!r} is not a non-negative integer")
            return None
        if type(data) is Bbo:
            return _bbo(data)
        if type(data) is Kline:
            return _kline(data)
        if type(data) is Ticker:
            return _ticker(data)
        if type(data) is Depth:
            return _depth_record(data)
        return None


def _implausible(time: int, received_at: int, skew_ms: int) -> Rejection:
    return Rejection(
        "implausible-timestamp", f"{time} is not within {skew_ms} ms of the receive time {received_at}"
    )


def _bbo(bbo: Bbo) -> Rejection | None:
    for price in (bbo.bid_price, bbo.ask_price):
        if not _positive(price):
            return Rejection("invalid-price", f"price {price!r}")
    for quantity in (bbo.bid_quantity, bbo.ask_quantity):
        if not _positive(quantity):
            return Rejection("invalid-quantity", f"quantity {quantity!r}")
    if not _less(bbo.bid_price, bbo.ask_price):
        return Rejection("crossed-book", f"bid {bbo.bid_price} is not below ask {bbo.ask_price}")
    return None


def _kline(bar: Kline) -> Rejection | None:
    for price in (bar.open, bar.high, bar.low, bar.close):
        if not _positive(price):
            return Rejection("invalid-price", f"price {price!r}")
    for volume in (bar.volume, bar.quote_volume):
        if not _unsigned(volume):
            return Rejection("invalid-volume", f"volume {volume!r}")
    if bar.trades < 0:
        return Rejection("invalid-volume", f"trade count {bar.trades}")
    if bar.end_time < bar.start_time:
        return Rejection("inconsistent-kline", f"endTime {bar.end_time} before startTime {bar.start_time}")
    for price in (bar.open, bar.close):
        if _less(bar.high, price):
            return Rejection("inconsistent-kline", f"high {bar.high} below {price}")
        if _less(price, bar.low):
            return Rejection("inconsistent-kline", f"low {bar.low} above {price}")
    return None


def _ticker(ticker: Ticker) -> Rejection | None:
    for price in (ticker.last, ticker.open, ticker.high, ticker.low):
        if not _positive(price):
            return Rejection("invalid-price", f"price {price!r}")
    for change in (ticker.change, ticker.change_percent):
        if not _unsigned(change.removeprefix("-")):
            return Rejection("invalid-price", f"change {change!r}")
    for volume in (ticker.volume, ticker.quote_volume):
        if not _unsigned(volume):
            return Rejection("invalid-volume", f"volume {volume!r}")
    # An empty side of the book shows as a zero price in a ticker, so only non-negative is required.
    for book_price in (ticker.bid_price, ticker.ask_price):
        if book_price is not None and not _unsigned(book_price):
            return Rejection("invalid-price", f"price {book_price!r}")
    for quantity in (ticker.bid_quantity, ticker.ask_quantity):
        if quantity is not None and not _unsigned(quantity):
            return Rejection("invalid-quantity", f"quantity {quantity!r}")
    bid, ask = ticker.bid_price, ticker.ask_price
    if bid is not None and ask is not None and _positive(bid) and _positive(ask) and not _less(bid, ask):
        return Rejection("crossed-book", f"bid {bid} is not below ask {ask}")
    return None


def depth_problem(item: DepthDiff | DepthBook | DepthSnapshot) -> Rejection | None:
    """Why an adapter's order book item must not touch a book, or None. A diff's levels may have
    quantity zero (removal); a whole book or snapshot's may not, and must not be crossed."""
    if isinstance(item, DepthDiff):
        first, last = item.first_update_id, item.last_update_id
        if first < 0 or first > last or (item.prev_update_id is not None and item.prev_update_id < 0):
            previous = item.prev_update_id
            return Rejection("invalid-update-id", f"update ids {first}..{last} (previous {previous})")
        return _levels_problem(item.bids, False) or _levels_problem(item.asks, False)
    update_id = item.update_id if isinstance(item, DepthBook) else item.last_update_id
    if update_id < 0:
        return Rejection("invalid-update-id", f"update id {update_id}")
    return _whole_book_problem(item.bids, item.asks)


def _levels_problem(levels: list[tuple[str, str]], whole_book: bool) -> Rejection | None:
    for price, quantity in levels:
        point = price.find(".")
        if not _positive(price) or (point >= 0 and len(price) - point - 1 > PRICE_DECIMALS):
            return Rejection("invalid-price", f"level price {price!r}")
        if not (_positive(quantity) if whole_book else _unsigned(quantity)):
            what = "zero in a whole book" if whole_book and _unsigned(quantity) else "not a size"
            return Rejection("invalid-quantity", f"level quantity {quantity!r} at {price} ({what})")
    return None


def _whole_book_problem(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> Rejection | None:
    problem = _levels_problem(bids, True) or _levels_problem(asks, True)
    if problem is None and bids and asks:
        best_bid = max(bids, key=lambda level: price_key(level[0]))[0]
        best_ask = min(asks, key=lambda level: price_key(level[0]))[0]
        if price_key(best_bid) >= price_key(best_ask):
            return Rejection("crossed-book", f"best bid {best_bid} is not below best ask {best_ask}")
    return problem


def _depth_record(depth: Depth) -> Rejection | None:
    ids = (depth.first_update_id, depth.last_update_id, depth.prev_update_id or "0")
    if not all(text.isdigit() and text.isascii() and len(text) <= 20 for text in ids):
        return Rejection("invalid-update-id", f"update ids {ids}")
    if int(depth.first_update_id) > int(depth.last_update_id):
        first, last = depth.first_update_id, depth.last_update_id
        return Rejection("invalid-update-id", f"first update id {first} past last {last}")
    if depth.snapshot:
        return _whole_book_problem(depth.bids, depth.asks)
    return _levels_problem(depth.bids, False) or _levels_problem(depth.asks, False)
