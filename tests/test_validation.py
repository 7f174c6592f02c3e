"""The validation rules of streams/validation.py, one rule at a time (continuity: test_continuity.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from streams.exchanges.base import ExchangeAdapter, FrameError, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.validation import EARLIEST_PLAUSIBLE_MS, Validator

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


# -- trade ids --------------------------------------------------------------------------------------------


def test_adapters_declare_their_trade_id_policy() -> None:
    assert BinanceAdapter.trade_ids == "increasing"
    assert ExchangeAdapter.trade_ids == "unique"  # the safe default: dedupe only


def test_non_integer_id_on_an_increasing_exchange_is_rejected() -> None:
    validator = Validator("binance", "increasing")
    for bad in ("abc", "-5", "1.5", "", "١٢", "9" * 21):
        assert reason(trade(trade_id=bad), validator) == "invalid-trade-id"


def test_repeats_and_jumps_are_not_validation_s_business() -> None:
    validator = Validator("binance", "increasing")
    assert [validator.check(trade(trade_id=str(i))) for i in (5, 5, 9)] == [None, None, None]
