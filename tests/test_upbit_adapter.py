"""UpbitAdapter against recorded SIMPLE-format binary frames and the documented payloads (§3)."""

from __future__ import annotations

import ast
import contextlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.continuity import Settings
from streams.depth import DepthBook
from streams.exchanges import adapter_class
from streams.exchanges.base import DataType, ErrorReply, FrameError, Instrument, SubscriptionList
from streams.exchanges.upbit import UpbitAdapter, millis, plain
from streams.plan import plan_connections
from streams.records import MarketRecord, Trade, decode_record, encode_record
from streams.rest import RestTag

FIXTURE = Path(__file__).parent / "fixtures" / "upbit.ws"
RECEIVED_AT = 1_700_000_000_123
CODES = ["KRW-BTC", "KRW-ETH", "KRW-LAMB", "KRW-WAVES", "BTC-ITAM", "BTC-XTZ", "BTC-PAX"]


def instrument(code: str) -> Instrument:
    quote, base = code.split("-")
    return Instrument(f"{base}/{quote}", code, base, quote)


@pytest.fixture
def adapter() -> UpbitAdapter:
    return UpbitAdapter([instrument(code) for code in CODES])


def contract(items: list[Any]) -> list[dict[str, Any]]:
    assert all(isinstance(item, MarketRecord) for item in items)
    for item in items:
        assert decode_record(encode_record(item)) == item
    return [json.loads(encode_record(item)) for item in items]


def reason_of(adapter: UpbitAdapter, payload: bytes) -> str:
    with pytest.raises(FrameError) as caught:
        adapter.parse_frame(payload, RECEIVED_AT)
    return caught.value.reason


def exact(value: Any) -> str:
    """The number as sent, as the contract's plain decimal string."""
    return format(Decimal(value), "f")


def recorded() -> tuple[str, list[tuple[int, bytes]]]:
    request, frames = "", []
    for line in FIXTURE.read_text().splitlines():
        if " <- " in line:
            request = line.split(": ", 1)[1]
        elif line and not line.startswith("wss://"):
            seconds, _, literal = line.partition(": ")
            frames.append((int(Decimal(seconds) * 1000), ast.literal_eval(literal)))
    return request, frames


RECORDED_REQUEST, RECORDED = recorded()


def test_fixture_is_binary_simple_trades_and_orderbooks() -> None:
    assert all(isinstance(frame, bytes) for _, frame in RECORDED)
    assert {json.loads(frame)["ty"] for _, frame in RECORDED} == {"trade", "orderbook"}
    assert len(RECORDED) == 449
    assert json.loads(RECORDED_REQUEST)[1] == {"format": "SIMPLE"}


@pytest.mark.parametrize(("received_at", "frame"), RECORDED, ids=[str(n) for n in range(len(RECORDED))])
def test_recorded_frame(adapter: UpbitAdapter, received_at: int, frame: bytes) -> None:
    source = json.loads(frame, parse_float=Decimal)
    assert adapter.control_events(frame) == []
    items = adapter.parse_frame(frame, received_at)
    if source["ty"] == "orderbook":  # the bbo record, then the whole book (the depth engine's input)
        items, book = items[:1], items[1]
        units = source["obu"]
        assert book == DepthBook(
            f"{source['cd'].split('-')[1]}/{source['cd'].split('-')[0]}", source["tms"], received_at,
            source["tms"], [(exact(u["bp"]), exact(u["bs"])) for u in units],
            [(exact(u["ap"]), exact(u["as"])) for u in units],
        )  # fmt: skip
    [record] = contract(items)
    quote, base = source["cd"].split("-")
    common = {"exchange": "upbit", "symbol": f"{base}/{quote}", "timestamp": source["tms"],
              "receivedAt": received_at}  # fmt: skip
    if source["ty"] == "trade":
        assert record == {**common, "type": "trade", "data": {
            "price": exact(source["tp"]), "quantity": exact(source["tv"]),
            "side": "buy" if source["ab"] == "BID" else "sell", "tradeId": str(source["sid"]),
            "tradeTime": source["ttms"]}}  # fmt: skip
    else:
        top = source["obu"][0]
        assert record == {**common, "type": "bbo", "data": {
            "bidPrice": exact(top["bp"]), "bidQuantity": exact(top["bs"]), "askPrice": exact(top["ap"]),
            "askQuantity": exact(top["as"]), "updateId": str(source["tms"])}}  # fmt: skip


# Documented payloads, exchange-protocols.md §3.3.
DOC_TRADE = b"""{"type": "trade", "code": "KRW-BTC", "timestamp": 1730336862082, "trade_date": "2024-10-31",
 "trade_time": "01:07:42", "trade_timestamp": 1730336862047, "trade_price": 100473000.00000000,
 "trade_volume": 0.00014208, "ask_bid": "BID", "prev_closing_price": 100571000.00000000, "change": "FALL",
 "change_price": 98000.00000000, "sequential_id": 17303368620470000, "best_ask_price": 100473000,
 "best_ask_size": 0.43139478, "best_bid_price": 100465000, "best_bid_size": 0.01990656,
 "stream_type": "SNAPSHOT"}"""
DOC_TICKER = b"""{"type": "ticker", "code": "KRW-BTC", "opening_price": 31883000, "high_price": 32310000,
 "low_price": 31855000, "trade_price": 32287000, "prev_closing_price": 31883000.00000000,
 "acc_trade_price": 78039261076.51241000, "change": "RISE", "change_price": 404000.00000000,
 "signed_change_price": 404000.00000000, "change_rate": 0.0126713295, "signed_change_rate": 0.0126713295,
 "ask_bid": "ASK", "trade_volume": 0.03103806, "acc_trade_volume": 2429.58834336, "trade_date": "20230221",
 "trade_time": "074102", "trade_timestamp": 1676965262139, "acc_ask_volume": 1146.25573608,
 "acc_bid_volume": 1283.33260728, "highest_52_week_price": 57678000.00000000,
 "highest_52_week_date": "2022-03-28", "lowest_52_week_price": 20700000.00000000,
 "lowest_52_week_date": "2022-12-30", "market_state": "ACTIVE", "is_trading_suspended": false,
 "delisting_date": null, "market_warning": "NONE", "timestamp": 1676965262177,
 "acc_trade_price_24h": 228827082483.70729000, "acc_trade_volume_24h": 7158.80283560,
 "stream_type": "REALTIME"}"""
DOC_ORDERBOOK = b"""{"type":"orderbook","code":"KRW-BTC","timestamp":1730336862082,
 "total_ask_size":4.74,"total_bid_size":0.29,
 "orderbook_units":[{"ask_price":100473000,"bid_price":100465000,"ask_size":0.43,"bid_size":0.02}],
 "level":0,"stream_type":"REALTIME"}"""


def candle(start: str, close: float, timestamp: int, unit: str = "1m") -> bytes:
    return json.dumps({
        "type": f"candle.{unit}", "code": "KRW-BTC", "candle_date_time_utc": start,
        "candle_date_time_kst": start, "opening_price": 100, "high_price": 120, "low_price": 90.5,
        "trade_price": close, "candle_acc_trade_volume": 1e-08, "candle_acc_trade_price": 0.000001,
        "timestamp": timestamp, "stream_type": "REALTIME",
    }).encode()  # fmt: skip


def test_documented_trade(adapter: UpbitAdapter) -> None:
    assert contract(adapter.parse_frame(DOC_TRADE, RECEIVED_AT)) == [{
        "exchange": "upbit", "symbol": "BTC/KRW", "type": "trade", "timestamp": 1730336862082,
        "receivedAt": RECEIVED_AT,
        "data": {"price": "100473000.00000000", "quantity": "0.00014208", "side": "buy",
                 "tradeId": "17303368620470000", "tradeTime": 1730336862047},
    }]  # fmt: skip
    sell = DOC_TRADE.replace(b'"ask_bid": "BID"', b'"ask_bid": "ASK"')
    assert contract(adapter.parse_frame(sell, RECEIVED_AT))[0]["data"]["side"] == "sell"


def test_documented_ticker(adapter: UpbitAdapter) -> None:
    assert contract(adapter.parse_frame(DOC_TICKER, RECEIVED_AT)) == [{
        "exchange": "upbit", "symbol": "BTC/KRW", "type": "ticker", "timestamp": 1676965262177,
        "receivedAt": RECEIVED_AT,
        "data": {"last": "32287000", "open": "31883000", "high": "32310000", "low": "31855000",
                 "volume": "2429.58834336", "quoteVolume": "78039261076.51241000",
                 "change": "404000.00000000", "changePercent": "1.26713295"},
    }]  # fmt: skip


def test_documented_orderbook_top_is_the_bbo(adapter: UpbitAdapter) -> None:
    assert contract(adapter.parse_frame(DOC_ORDERBOOK, RECEIVED_AT)[:1])[0]["data"] == {
        "bidPrice": "100465000", "bidQuantity": "0.02", "askPrice": "100473000", "askQuantity": "0.43",
        "updateId": "1730336862082"}  # fmt: skip


def test_candles_close_when_a_later_bar_starts(adapter: UpbitAdapter) -> None:
    first = contract(adapter.parse_frame(candle("2024-10-31T01:07:00", 110, 1730336862000), 1))
    assert [(k["data"]["startTime"], k["data"]["closed"]) for k in first] == [(1730336820000, False)]
    assert first[0]["data"] == {
        "interval": "1m", "startTime": 1730336820000, "endTime": 1730336879999, "open": "100", "high": "120",
        "low": "90.5", "close": "110", "volume": "0.00000001", "quoteVolume": "0.000001", "trades": 0,
        "closed": False}  # fmt: skip
    update = contract(adapter.parse_frame(candle("2024-10-31T01:07:00", 111, 1730336863000), 2))
    assert [(k["data"]["close"], k["data"]["closed"]) for k in update] == [("111", False)]
    later = contract(adapter.parse_frame(candle("2024-10-31T01:08:00", 112, 1730336881000), 3))
    # The previous bar's last state, now final, then the new bar.
    summary = [
        (k["data"]["startTime"], k["data"]["close"], k["data"]["closed"], k["receivedAt"]) for k in later
    ]
    assert summary == [(1730336820000, "111", True, 3), (1730336880000, "112", False, 3)]
    assert adapter.parse_frame(candle("2024-10-31T01:07:00", 113, 1730336882000), 4) == []  # late: dropped
    hour = contract(adapter.parse_frame(candle("2024-10-31T01:00:00", 5, 1730336882000, "60m"), 5))
    assert [(k["data"]["interval"], k["data"]["closed"]) for k in hour] == [("1h", False)]


@pytest.mark.parametrize(
    ("frame", "event"),
    [
        (b'{"error":{"name":"NO_TICKET","message":"ticket is required"}}',
         ErrorReply(0, "NO_TICKET: ticket is required")),
        (b'{"method":"LIST_SUBSCRIPTIONS","result":[{"type":"trade","codes":["KRW-BTC","KRW-ETH"]}],'
         b'"ticket":"t1"}', SubscriptionList("t1", ["trade:KRW-BTC", "trade:KRW-ETH"])),
    ],
)  # fmt: skip
def test_control_frames(adapter: UpbitAdapter, frame: bytes, event: object) -> None:
    assert adapter.parse_frame(frame, RECEIVED_AT) == [event]
    assert adapter.control_events(frame) == [event]


def test_status_up_is_neither_data_nor_error(adapter: UpbitAdapter) -> None:
    assert adapter.parse_frame(b'{"status":"UP"}', RECEIVED_AT) == []
    assert adapter.control_events(b'{"status":"UP"}') == []


def test_subscribe_message_is_the_whole_set_as_one_array(adapter: UpbitAdapter) -> None:
    message = json.loads(adapter.subscribe_message(
        ["trade:KRW-BTC", "orderbook:KRW-BTC.1", "trade:KRW-ETH", "candle.1m:KRW-BTC"], 7))  # fmt: skip
    assert len(message[0]["ticket"]) == 36
    assert message[1:] == [
        {"type": "trade", "codes": ["KRW-BTC", "KRW-ETH"], "is_only_realtime": True},
        {"type": "orderbook", "codes": ["KRW-BTC.1"]},
        {"type": "candle.1m", "codes": ["KRW-BTC"]}, {"format": "DEFAULT"}]  # fmt: skip
    with pytest.raises(NotImplementedError):
        adapter.unsubscribe_message(["trade:KRW-BTC"], 8)


@pytest.mark.parametrize(
    ("data_type", "stream"),
    [("trade", "trade:KRW-BTC"), ("ticker", "ticker:KRW-BTC"), ("bbo", "orderbook:KRW-BTC.1"),
     ("kline_1m", "candle.1m:KRW-BTC"), ("kline_1h", "candle.60m:KRW-BTC"),
     ("kline_4h", "candle.240m:KRW-BTC"), ("kline_1s", "candle.1s:KRW-BTC")],
)  # fmt: skip
def test_stream_names(adapter: UpbitAdapter, data_type: str, stream: str) -> None:
    assert adapter.stream_name(adapter.by_symbol["BTC/KRW"], DataType.parse(data_type)) == stream
    assert adapter.route(DataType.parse(data_type)) == "/websocket/v1"


@pytest.mark.parametrize("data_type", ["kline_1w", "kline_1d", "kline_2h"])
def test_unsupported(adapter: UpbitAdapter, data_type: str) -> None:
    assert not UpbitAdapter.supports(DataType.parse(data_type))


def test_traits_and_limits(adapter: UpbitAdapter) -> None:
    assert adapter_class("upbit") is UpbitAdapter
    assert not UpbitAdapter.acknowledges_subscriptions and UpbitAdapter.replaces_subscriptions
    assert UpbitAdapter.keepalive == (60.0, b"PING")
    assert UpbitAdapter.trade_ids == "unique"
    limits = UpbitAdapter.limits
    assert (limits.max_connection_attempts, limits.connection_attempt_window_seconds) == (5, 1)
    assert limits.max_incoming_messages_per_second == 5
    plans = plan_connections(adapter, [adapter.by_symbol["BTC/KRW"]], [DataType("trade"), DataType("bbo")],
                             max_connections=1, streams_per_connection=1000)  # fmt: skip
    assert [plan.streams for plan in plans] == [("trade:KRW-BTC", "orderbook:KRW-BTC.1")]


def test_instruments_are_quote_dash_base() -> None:
    markets = [{"market": "KRW-BTC", "korean_name": "비트코인", "english_name": "Bitcoin"},
               {"market": "BTC-ETH", "korean_name": "이더리움", "english_name": "Ethereum"},
               {"market": "USDT-1INCH", "korean_name": "1인치", "english_name": "1inch"}]  # fmt: skip
    body = json.dumps(markets).encode()
    assert UpbitAdapter.parse_instruments(body) == [
        Instrument("BTC/KRW", "KRW-BTC", "BTC", "KRW"), Instrument("ETH/BTC", "BTC-ETH", "ETH", "BTC"),
        Instrument("1INCH/USDT", "USDT-1INCH", "1INCH", "USDT")]  # fmt: skip


def test_rest_ticks_oldest_first_with_exact_numbers(adapter: UpbitAdapter) -> None:
    btc = adapter.by_symbol["BTC/KRW"]
    # trades/ticks cannot page forward: backfill asks for the newest page whatever the last id seen.
    request = adapter.trades_request(btc, 17510687993360000, 1000)
    assert (request.path, request.params) == ("/v1/trades/ticks", {"market": "KRW-BTC", "count": "500"})
    older = adapter.older_trades_request(btc, "17510687993360000", 100)
    assert older.params == {"market": "KRW-BTC", "count": "100", "cursor": "17510687993360000"}
    body = b"""[{"market":"KRW-BTC","trade_date_utc":"2025-06-27","trade_time_utc":"23:59:59",
      "timestamp":1751068799336,"trade_price":145000000.0,"trade_volume":1e-05,"prev_closing_price":1.0,
      "change_price":2.0,"ask_bid":"ASK","sequential_id":17510687993360000},
     {"market":"KRW-BTC","trade_date_utc":"2025-06-27","trade_time_utc":"23:59:58",
      "timestamp":1751068798000,"trade_price":144999000,"trade_volume":0.5,"prev_closing_price":1.0,
      "change_price":2.0,"ask_bid":"BID","sequential_id":17510687980000001}]"""  # fmt: skip
    records = adapter.parse_rest(RestTag("trades", "KRW-BTC", None), body, RECEIVED_AT)
    assert [(r.data.trade_id, r.data.price, r.data.quantity, r.data.side) for r in records] == [  # type: ignore[union-attr]
        ("17510687980000001", "144999000", "0.5", "buy"),
        ("17510687993360000", "145000000.0", "0.00001", "sell")]  # fmt: skip


def test_numbers_and_times() -> None:
    assert plain(Decimal("1E-8")) == "0.00000001"
    assert plain(Decimal("100473000.00000000")) == "100473000.00000000"
    assert millis(1783657882348) == 1783657882348
    assert millis("1783657882348968") == 1783657882348
    with pytest.raises(FrameError):
        plain(Decimal("NaN"))
    with pytest.raises(FrameError):
        millis("17836x")


MALFORMED = [
    pytest.param(b"{", "invalid-json", id="truncated"),
    pytest.param(b"[]", "schema-mismatch", id="array"),
    pytest.param(b"{}", "unknown-event", id="empty"),
    pytest.param(b'{"type":"depth","code":"KRW-BTC"}', "unknown-event", id="unknown-type"),
    pytest.param(DOC_TRADE.replace(b'"KRW-BTC"', b'"KRW-DOGE"'), "unknown-symbol", id="unknown-symbol"),
    pytest.param(DOC_TRADE.replace(b"0.00014208", b'"x"'), "schema-mismatch", id="volume-text"),
    pytest.param(DOC_TRADE.replace(b'"BID"', b'"BUY"'), "schema-mismatch", id="bad-side"),
    pytest.param(DOC_TRADE.replace(b"0.00014208", b'"NaN"'), "invalid-number", id="nan"),
    pytest.param(DOC_TRADE.replace(b"17303368620470000", b'"abc"'), "schema-mismatch", id="bad-id"),
    pytest.param(DOC_ORDERBOOK.replace(b'[{"ask_price":100473000,"bid_price":100465000,"ask_size":0.43,'
                                       b'"bid_size":0.02}]', b"[]"), "empty-book", id="empty-book"),
    pytest.param(candle("2024-10-31T01:07:00", 1, 1, "10m").replace(b"candle.10m", b"candle.7m"),
                 "unsupported-data-type", id="candle-unit"),
    pytest.param(candle("yesterday", 1, 1), "schema-mismatch", id="candle-time"),
    pytest.param(b'{"error":{"message":"x"}}', "schema-mismatch", id="error-without-name"),
    pytest.param(b'{"ty":"trade","x":' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid-json",
                 id="simple-nested"),
    pytest.param(b'{"ty":"trade","cd":"KRW-BTC"}', "schema-mismatch", id="simple-partial"),
    pytest.param(b'{"ty":"trade","cd":"KRW-BTC","tp":4.0e1001618678279000002}', "invalid-number",
                 id="simple-exponent-out-of-range"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_frames(adapter: UpbitAdapter, payload: bytes, reason: str) -> None:
    assert reason_of(adapter, payload) == reason


@settings(max_examples=300, deadline=None)
@given(
    frame=st.sampled_from([f for _, f in RECORDED[::30]] + [DOC_TRADE, DOC_TICKER, DOC_ORDERBOOK]),
    position=st.floats(0, 1),
    cut=st.integers(0, 8),
    insert=st.binary(max_size=8),
)
def test_mutated_frames_raise_only_frame_error(
    frame: bytes, position: float, cut: int, insert: bytes
) -> None:
    at = int(position * len(frame))
    mutated = frame[:at] + insert + frame[at + cut :]
    adapter = UpbitAdapter([instrument(code) for code in CODES])
    with contextlib.suppress(FrameError):
        adapter.parse_frame(mutated, RECEIVED_AT)
    adapter.control_events(mutated)


def test_trade_marker_is_the_time_based_sequential_id(adapter: UpbitAdapter) -> None:
    assert adapter.trade_marker(DOC_TRADE.replace(b": ", b":").replace(b"\n", b"")) == (
        "BTC/KRW",
        17303368620470000,
    )
    assert adapter.trade_marker(DOC_ORDERBOOK) is None
    assert adapter.trade_marker(b'{"type":"trade",') is None
    # The recorded SIMPLE frames are not what the collector asks for; they carry no marker.
    assert all(adapter.trade_marker(frame) is None for _, frame in RECORDED[:20])
    assert UpbitAdapter.rest_history


def test_trade_position_of_a_parsed_trade_is_its_marker(adapter: UpbitAdapter) -> None:
    frame = DOC_TRADE.replace(b": ", b":").replace(b"\n", b"")
    [record] = adapter.parse_frame(frame, RECEIVED_AT)
    assert isinstance(record, MarketRecord) and isinstance(record.data, Trade)
    assert adapter.trade_marker(frame) == ("BTC/KRW", adapter.trade_position(record.data))
    btc = adapter.by_symbol["BTC/KRW"]
    assert adapter.history_request(btc, None, "17303368620470000").params["cursor"] == "17303368620470000"
    assert adapter.trade_id_consistent(record.data)  # the id carries the trade time


def test_the_dedupe_window_holds_more_than_a_rest_page(adapter: UpbitAdapter) -> None:
    # The page that reaches back past the last trade seen repeats up to a page of published trades.
    page = int(adapter.trades_request(adapter.by_symbol["BTC/KRW"], None, 10_000).params["count"])
    assert adapter.trade_ids == "unique" and page == adapter.history_page < Settings().recent_ids


def test_rest_candles_oldest_first_closed_when_over(adapter: UpbitAdapter) -> None:
    btc = adapter.by_symbol["BTC/KRW"]
    assert adapter.klines_request(btc, "1h", 0, 1000).path == "/v1/candles/minutes/60"
    assert adapter.klines_request(btc, "1s", 0, 1000).params == {"market": "KRW-BTC", "count": "200"}
    assert adapter.klines_request(btc, "1s", 0, 1000).path == "/v1/candles/seconds"
    body = json.dumps([
        {"market": "KRW-BTC", "candle_date_time_utc": "2024-10-31T01:08:00", "candle_date_time_kst": "x",
         "opening_price": 2, "high_price": 3, "low_price": 1, "trade_price": 2.5, "timestamp": 1730336890000,
         "candle_acc_trade_price": 10.5, "candle_acc_trade_volume": 4.2, "unit": 1},
        {"market": "KRW-BTC", "candle_date_time_utc": "2024-10-31T01:07:00", "candle_date_time_kst": "x",
         "opening_price": 1, "high_price": 2, "low_price": 1, "trade_price": 2, "timestamp": 1730336870000,
         "candle_acc_trade_price": 3, "candle_acc_trade_volume": 1e-8, "unit": 1},
    ]).encode()  # fmt: skip
    records = adapter.parse_rest(RestTag("klines", "KRW-BTC", "1m"), body, 1730336885000)
    assert [(r.data.start_time, r.data.closed, r.data.volume) for r in records] == [  # type: ignore[union-attr]
        (1730336820000, True, "0.00000001"),
        (1730336880000, False, "4.2"),
    ]
