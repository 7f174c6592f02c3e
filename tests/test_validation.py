"""The validation rules and trade-id tracking of streams/validation.py, one rule at a time."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest

from streams.events import decode_event, encode_event
from streams.exchanges.base import ExchangeAdapter, FrameError, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.validation import (
    DUPLICATE,
    EARLIEST_PLAUSIBLE_MS,
    MAX_HOLES_PER_SYMBOL,
    UNIQUE_WINDOW,
    Gap,
    Rejection,
    Validator,
    gap_event,
)

NOW = 1_700_000_000_000
RECORDED = Path(__file__).resolve().parent / "fixtures" / "recorded" / "BINANCE.ws.1.0"


def trade(
    price: str = "16578.50",
    quantity: str = "0.001",
    trade_id: str = "100",
    *,
    symbol: str = "BTC/USDT",
    timestamp: int = NOW - 5,
    trade_time: int | None = None,
    received_at: int = NOW,
) -> MarketRecord:
    data = Trade(price, quantity, "buy", trade_id, timestamp if trade_time is None else trade_time)
    return MarketRecord("binance", symbol, "trade", timestamp, received_at, data)


def kline(
    open: str = "10", high: str = "12", low: str = "9", close: str = "11", **changes: object
) -> MarketRecord:
    fields: dict[str, object] = {
        "interval": "1m", "start_time": NOW - 60_000, "end_time": NOW - 1, "open": open, "high": high,
        "low": low, "close": close, "volume": "5.5", "quote_volume": "60", "trades": 7, "closed": False,
    }  # fmt: skip
    fields.update(changes)
    return MarketRecord("binance", "BTC/USDT", "kline", NOW - 5, NOW, Kline(**fields))  # type: ignore[arg-type]


def bbo(bid: str = "100.5", ask: str = "100.6", bid_qty: str = "1", ask_qty: str = "2") -> MarketRecord:
    return MarketRecord("binance", "BTC/USDT", "bbo", NOW, NOW, Bbo(bid, bid_qty, ask, ask_qty, "77"))


def ticker(**changes: str | None) -> MarketRecord:
    fields: dict[str, str | None] = {
        "last": "101", "open": "100", "high": "105", "low": "95", "volume": "1000", "quote_volume": "100000",
        "change": "1", "change_percent": "1.00", "bid_price": "100.9", "bid_quantity": "3",
        "ask_price": "101.1", "ask_quantity": "4",
    }  # fmt: skip
    fields.update(changes)
    return MarketRecord("binance", "BTC/USDT", "ticker", NOW - 5, NOW, Ticker(**fields))  # type: ignore[arg-type]


def reason(record: MarketRecord, validator: Validator | None = None, live: bool = True) -> str | None:
    problem = (validator or Validator("binance", "none")).check(record, live)
    return None if problem is None else problem.reason


# -- well-formed input passes ------------------------------------------------------------------------------


def test_wellformed_records_of_every_type_pass() -> None:
    for record in (trade(), kline(), bbo(), ticker()):
        assert reason(record) is None, record


def _recorded_frames() -> list[tuple[int, bytes]]:
    frames = []
    for line in RECORDED.read_text().splitlines():
        if line and not line.startswith("wss://"):
            seconds, _, frame = line.partition(": ")
            frames.append((int(Decimal(seconds) * 1000), frame.encode()))
    return frames


def test_every_recorded_binance_frame_passes_validation() -> None:
    markets = {"NKNUSDT": ("NKN", "USDT"), "BLZETH": ("BLZ", "ETH"), "LRCBTC": ("LRC", "BTC"),
               "RUNEEUR": ("RUNE", "EUR")}  # fmt: skip
    adapter = BinanceAdapter([Instrument(f"{b}/{q}", s, b, q) for s, (b, q) in markets.items()])
    validator = Validator("binance", BinanceAdapter.trade_ids)
    checked = 0
    for received_at, frame in _recorded_frames():
        try:
            items = adapter.parse_frame(frame, received_at)
        except FrameError as error:
            assert error.reason == "unsupported-data-type"  # depth: not parsed yet
            continue
        for item in items:
            if isinstance(item, MarketRecord):
                assert validator.check(item) is None, (item, validator.check(item))
                checked += 1
    assert checked == 88  # trades, klines and bookTickers of the recording


# -- prices and quantities ---------------------------------------------------------------------------------

BAD_NUMBERS = ["0", "0.000", "-1", "-0.5", "1e5", "1E-8", "NaN", "nan", "Infinity", "inf", "", " 1", "1 ",
               "abc", "1.2.3", "\uff11\uff12", "\u0663", "0x10", "+1", "1_000", "9" * 65, "."]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_trade_price_must_be_a_positive_plain_decimal(bad: str) -> None:
    assert reason(trade(price=bad)) == "invalid-price"


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_trade_quantity_must_be_a_positive_plain_decimal(bad: str) -> None:
    assert reason(trade(quantity=bad)) == "invalid-quantity"


@pytest.mark.parametrize("good", ["1", "0.00000001", "16578.50000000", "000.10", "1.", ".5", "9" * 64])
def test_plain_positive_decimals_pass(good: str) -> None:
    assert reason(trade(price=good, quantity=good)) is None


# -- timestamps --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (NOW, None),
        (NOW + 300_000, None),  # exactly the window
        (NOW - 300_000, None),
        (NOW + 300_001, "implausible-timestamp"),  # the future
        (NOW - 300_001, "implausible-timestamp"),  # stale for a live frame
        (NOW // 1000, "implausible-timestamp"),  # seconds, not milliseconds
        (NOW * 1000, "implausible-timestamp"),  # microseconds
        (0, "implausible-timestamp"),
        (-1, "implausible-timestamp"),
    ],
)
def test_event_time_within_the_clock_skew_window(timestamp: int, expected: str | None) -> None:
    assert reason(trade(timestamp=timestamp, trade_time=NOW)) == expected


def test_trade_time_is_checked_too() -> None:
    assert reason(trade(trade_time=NOW + 400_000)) == "implausible-timestamp"
    assert reason(trade(trade_time=NOW - 400_000)) == "implausible-timestamp"


def test_clock_skew_window_is_configurable() -> None:
    record = trade(timestamp=NOW + 2_000, trade_time=NOW)
    assert reason(record, Validator("binance", "none", clock_skew_seconds=1)) == "implausible-timestamp"
    assert reason(record, Validator("binance", "none", clock_skew_seconds=3)) is None


def test_rest_input_may_be_old_but_not_from_the_future_or_before_2009() -> None:
    old = trade(timestamp=NOW - 86_400_000)
    assert reason(old, live=True) == "implausible-timestamp"
    assert reason(old, live=False) is None
    assert reason(trade(timestamp=NOW + 400_000, trade_time=NOW), live=False) == "implausible-timestamp"
    assert reason(trade(timestamp=EARLIEST_PLAUSIBLE_MS - 1), live=False) == "implausible-timestamp"


# -- klines ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bar", "expected"),
    [
        (kline(high="10.5"), "inconsistent-kline"),  # below close 11
        (kline(high="9.99", close="9.5"), "inconsistent-kline"),  # below open 10
        (kline(low="10.01"), "inconsistent-kline"),  # above open 10
        (kline(low="9", close="8.5"), "inconsistent-kline"),  # above close 8.5
        (kline(end_time=NOW - 120_000), "inconsistent-kline"),
        (kline(open="10", high="10", low="10", close="10"), None),  # a flat bar
        (kline(high="11"), None),  # high == close
        (kline(low="10", close="12"), None),  # low == open
        # floats cannot tell these apart; Decimal can:
        (kline(open="0.1", high="0.10000000000000000001", low="0.1", close="0.1"), None),
        (kline(open="0.10000000000000000001", high="0.1", low="0.1", close="0.1"), "inconsistent-kline"),
        (kline(volume="0"), None),
        (kline(volume="-1"), "invalid-volume"),
        (kline(quote_volume="1e3"), "invalid-volume"),
        (kline(trades=-1), "invalid-volume"),
        (kline(open="0"), "invalid-price"),
        (kline(low="-9"), "invalid-price"),
    ],
)
def test_kline_rules(bar: MarketRecord, expected: str | None) -> None:
    assert reason(bar) == expected


# -- bbo and ticker ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (bbo("100.6", "100.6"), "crossed-book"),
        (bbo("100.7", "100.6"), "crossed-book"),
        (bbo("0.10000000000000000001", "0.1"), "crossed-book"),  # equal as floats
        (bbo("0.1", "0.10000000000000000001"), None),
        (bbo(bid_qty="0"), "invalid-quantity"),
        (bbo(ask_qty="-2"), "invalid-quantity"),
        (bbo(bid="0"), "invalid-price"),
        (bbo(ask="NaN"), "invalid-price"),
    ],
)
def test_bbo_rules(record: MarketRecord, expected: str | None) -> None:
    assert reason(record) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bid_price": "101.1"}, "crossed-book"),
        ({"bid_price": "102"}, "crossed-book"),
        ({"bid_price": None, "bid_quantity": None}, None),  # bid not given: nothing to compare
        ({"bid_price": "0.00000000", "bid_quantity": "0.00000000"}, None),  # an empty side of the book
        ({"change": "-3.5", "change_percent": "-3.38"}, None),  # changes may be negative
        ({"change": "--1"}, "invalid-price"),
        ({"change_percent": "1e2"}, "invalid-price"),
        ({"last": "0"}, "invalid-price"),
        ({"ask_price": "-1"}, "invalid-price"),
        ({"ask_quantity": "x"}, "invalid-quantity"),
        ({"volume": "-1"}, "invalid-volume"),
    ],
)
def test_ticker_rules(changes: dict[str, str | None], expected: str | None) -> None:
    assert reason(ticker(**changes)) == expected


# -- increasing trade ids (Binance) ------------------------------------------------------------------------


def feed(validator: Validator, ids: list[int], symbol: str = "BTC/USDT") -> list[Rejection | None]:
    return [validator.check(trade(trade_id=str(i), symbol=symbol)) for i in ids]


def test_adapters_declare_their_trade_id_policy() -> None:
    assert BinanceAdapter.trade_ids == "increasing"
    assert ExchangeAdapter.trade_ids == "unique"  # the safe default: dedupe only


def test_increasing_ids_drop_duplicates_without_dead_lettering() -> None:
    validator = Validator("binance", "increasing")
    assert feed(validator, [1, 2, 3, 3, 2, 4]) == [None, None, None, DUPLICATE, DUPLICATE, None]
    assert DUPLICATE.reason == "duplicate"
    assert validator.take_gaps() == []


def test_a_jump_in_increasing_ids_is_a_gap_and_its_fill_is_accepted_once() -> None:
    validator = Validator("binance", "increasing")
    assert feed(validator, [10, 11, 15]) == [None, None, None]
    (gap,) = validator.take_gaps()
    assert (gap.symbol, gap.first_missing, gap.last_missing, gap.missing) == ("BTC/USDT", 12, 14, 3)
    assert validator.take_gaps() == []  # taken once
    # A backfill delivers the missing ids, in any order, once; repeats and old ids are duplicates.
    assert feed(validator, [13, 13, 12, 14, 12, 11, 15]) == [
        None, DUPLICATE, None, None, DUPLICATE, DUPLICATE, DUPLICATE,
    ]  # fmt: skip
    assert feed(validator, [16]) == [None]
    assert validator.take_gaps() == []


def test_symbols_are_tracked_independently() -> None:
    validator = Validator("binance", "increasing")
    assert feed(validator, [5, 6], "BTC/USDT") == [None, None]
    assert feed(validator, [5, 6], "ETH/USDT") == [None, None]
    assert feed(validator, [6], "ETH/USDT") == [DUPLICATE]


def test_non_integer_id_on_an_increasing_exchange_is_rejected() -> None:
    validator = Validator("binance", "increasing")
    for bad in ("abc", "-5", "1.5", "", "١٢", "9" * 21):
        assert reason(trade(trade_id=bad), validator) == "invalid-trade-id"


def test_remembered_gaps_are_bounded_and_forgotten_ones_let_ids_through() -> None:
    validator = Validator("binance", "increasing")
    ids = [0] + [2 * n for n in range(1, 200)]  # every other id missing: 199 gaps
    feed(validator, ids)
    assert len(validator.take_gaps()) == 199
    state = validator._increasing["BTC/USDT"]
    assert len(state.holes) == MAX_HOLES_PER_SYMBOL
    # A forgotten gap's ids can no longer be told from repeats: let through (at least once, never lost).
    assert feed(validator, [1]) == [None]
    assert feed(validator, [397]) == [None]  # still remembered: a fill
    assert feed(validator, [397, 398]) == [DUPLICATE, DUPLICATE]


def test_state_stays_bounded_over_a_long_hostile_run() -> None:
    validator = Validator("binance", "increasing")
    rng = random.Random(7)
    next_id = 1
    for n in range(100_000):
        roll = rng.random()
        if roll < 0.01:
            next_id += rng.randint(2, 1000)  # a gap
        elif roll < 0.05:
            validator.check(trade(trade_id=str(max(1, next_id - rng.randint(1, 5000)))))  # late or repeated
            continue
        validator.check(trade(trade_id=str(next_id), symbol=f"S{n % 50}/USDT"))
        next_id += 1
        if n % 1000 == 0:
            validator.take_gaps()
    assert len(validator._increasing) == 51
    assert all(len(state.holes) <= MAX_HOLES_PER_SYMBOL for state in validator._increasing.values())


# -- unique, unordered ids (Upbit, Bithumb) ----------------------------------------------------------------


def test_unique_ids_dedupe_without_order_or_gaps() -> None:
    validator = Validator("upbit", "unique")
    assert feed(validator, [5, 3, 9, 3, 5, 4]) == [None, None, None, DUPLICATE, DUPLICATE, None]
    assert validator.take_gaps() == []


def test_unique_id_memory_is_a_bounded_window() -> None:
    validator = Validator("upbit", "unique")
    feed(validator, list(range(UNIQUE_WINDOW * 3)))
    recent = validator._recent["BTC/USDT"]
    assert len(recent.seen) == len(recent.order) == UNIQUE_WINDOW
    assert feed(validator, [UNIQUE_WINDOW * 3 - 1]) == [DUPLICATE]  # recent: remembered
    assert feed(validator, [0]) == [None]  # long gone: let through


def test_no_policy_no_tracking() -> None:
    validator = Validator("other", "none")
    assert feed(validator, [1, 1, 1]) == [None, None, None]


# -- the gap event -----------------------------------------------------------------------------------------


def test_gap_event_for_collector_events() -> None:
    event = gap_event(Gap("binance", "BTC/USDT", 12, 14, NOW - 10, NOW - 2, NOW))
    assert decode_event(encode_event(event)) == event
    assert (event.type, event.exchange, event.symbol, event.time) == ("gap", "binance", "BTC/USDT", NOW)
    assert event.detail == {
        "dataType": "trade", "firstMissingId": 12, "lastMissingId": 14, "missing": 3,
        "afterTime": NOW - 10, "beforeTime": NOW - 2,
    }  # fmt: skip
