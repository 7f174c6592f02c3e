"""BinanceFuturesAdapter: recorded USD-M traffic and documented payloads (exchange-protocols.md §2)."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.depth import DepthDiff
from streams.exchanges import adapter_class
from streams.exchanges.base import Ack, DataType, ErrorReply, FrameError, Instrument, SubscriptionList
from streams.exchanges.binance_futures import BinanceFuturesAdapter
from streams.plan import plan_connections
from streams.records import Kline, MarketRecord, decode_record, encode_record
from streams.rest import RestTag

FIXTURE = Path(__file__).parent / "fixtures" / "binance-futures.ws"
RECEIVED_AT = 1_700_000_000_123
MARKETS = {
    "SUSHIUSDT": ("SUSHI", "USDT"),
    "AKROUSDT": ("AKRO", "USDT"),
    "KEEPUSDT": ("KEEP", "USDT"),
    "CTKUSDT": ("CTK", "USDT"),
    "BTCUSDT": ("BTC", "USDT"),
    "BNBUSDT": ("BNB", "USDT"),
}
INSTRUMENTS = [Instrument(f"{b}/{q}", symbol, b, q) for symbol, (b, q) in MARKETS.items()]


@pytest.fixture
def adapter() -> BinanceFuturesAdapter:
    return BinanceFuturesAdapter(INSTRUMENTS)


def contract_json(items: list[Any]) -> dict[str, Any]:
    assert len(items) == 1 and isinstance(items[0], MarketRecord)
    assert decode_record(encode_record(items[0])) == items[0]
    return json.loads(encode_record(items[0]))


def reason_of(adapter: BinanceFuturesAdapter, payload: bytes) -> str:
    with pytest.raises(FrameError) as caught:
        adapter.parse_frame(payload, RECEIVED_AT)
    return caught.value.reason


def record(data: dict[str, Any], kind: str, timestamp: int, received_at: int, body: dict) -> dict[str, Any]:
    base, quote = MARKETS[data["s"]]
    return {"exchange": "binance-futures", "symbol": f"{base}/{quote}", "type": kind,
            "timestamp": timestamp, "receivedAt": received_at, "data": body}  # fmt: skip


def expected_trade(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    body = {"price": data["p"], "quantity": data["q"], "side": "sell" if data["m"] else "buy",
            "tradeId": str(data["a"]), "tradeTime": data["T"]}  # fmt: skip
    return record(data, "trade", data["E"], received_at, body)


def expected_kline(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    k = data["k"]
    body = {"interval": k["i"], "startTime": k["t"], "endTime": k["T"], "open": k["o"], "high": k["h"],
            "low": k["l"], "close": k["c"], "volume": k["v"], "quoteVolume": k["q"], "trades": k["n"],
            "closed": k["x"]}  # fmt: skip
    return record(data, "kline", data["E"], received_at, body)


def expected_ticker(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    # Futures tickers carry no bid/ask: the record leaves those fields out.
    body = {"last": data["c"], "open": data["o"], "high": data["h"], "low": data["l"], "volume": data["v"],
            "quoteVolume": data["q"], "change": data["p"], "changePercent": data["P"]}  # fmt: skip
    return record(data, "ticker", data["E"], received_at, body)


def expected_bbo(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    body = {"bidPrice": data["b"], "bidQuantity": data["B"], "askPrice": data["a"],
            "askQuantity": data["A"], "updateId": str(data["u"])}  # fmt: skip
    # Unlike spot, the futures bookTicker has an event time.
    return record(data, "bbo", data["E"], received_at, body)


def recorded_frames() -> list[tuple[int, bytes]]:
    frames = []
    for line in FIXTURE.read_text().splitlines():
        if line and not line.startswith("wss://"):
            seconds, _, frame = line.partition(": ")
            frames.append((int(Decimal(seconds) * 1000), frame.encode()))
    return frames


RECORDED = recorded_frames()


def test_fixture_has_every_recorded_channel() -> None:
    channels = {json.loads(frame)["stream"].split("@", 1)[1] for _, frame in RECORDED}
    assert channels == {"aggTrade", "kline_1m", "bookTicker", "depth@100ms"}
    assert len(RECORDED) == 238


@pytest.mark.parametrize(("received_at", "frame"), RECORDED, ids=[str(n) for n in range(len(RECORDED))])
def test_recorded_frame(adapter: BinanceFuturesAdapter, received_at: int, frame: bytes) -> None:
    source = json.loads(frame)
    channel = source["stream"].split("@", 1)[1]
    assert adapter.control_events(frame) == []
    if channel.startswith("depth"):
        data = source["data"]
        base, quote = MARKETS[data["s"]]
        levels = [[tuple(level) for level in data[side]] for side in ("b", "a")]
        expected_diff = DepthDiff(f"{base}/{quote}", data["E"], received_at, data["U"], data["u"], data["pu"],
                                  *levels)  # fmt: skip
        assert adapter.parse_frame(frame, received_at) == [expected_diff]
        return
    build = {"aggTrade": expected_trade, "kline_1m": expected_kline, "bookTicker": expected_bbo}[channel]
    assert contract_json(adapter.parse_frame(frame, received_at)) == build(source["data"], received_at)


# Documented payloads, exchange-protocols.md §2.4 (comments dropped; `nq`, `st`, `ps` are newer fields
# that parsers must tolerate).
DOC_AGG_TRADE: dict[str, Any] = {
    "e": "aggTrade", "E": 123456789, "s": "BTCUSDT", "a": 5933014, "p": "0.001", "q": "100",
    "nq": "100", "f": 100, "l": 105, "T": 123456785, "m": True, "st": 1, "ps": "BTCUSDT",
}  # fmt: skip
DOC_KLINE: dict[str, Any] = {
    "e": "kline", "E": 1638747660000, "s": "BTCUSDT",
    "k": {"t": 1638747660000, "T": 1638747719999, "s": "BTCUSDT", "i": "1m", "f": 100, "L": 200,
          "o": "0.0010", "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000", "n": 100, "x": False,
          "q": "1.0000", "V": "500", "Q": "0.500", "B": "123456"},
}  # fmt: skip
DOC_TICKER: dict[str, Any] = {
    "e": "24hrTicker", "E": 123456789, "s": "BTCUSDT", "p": "0.0015", "P": "250.00", "w": "0.0018",
    "c": "0.0025", "Q": "10", "o": "0.0010", "h": "0.0025", "l": "0.0010", "v": "10000", "q": "18",
    "O": 0, "C": 86400000, "F": 0, "L": 18150, "n": 18151,
}  # fmt: skip
DOC_BOOK_TICKER: dict[str, Any] = {
    "e": "bookTicker", "u": 400900217, "E": 1568014460893, "T": 1568014460891, "s": "BNBUSDT",
    "b": "25.35190000", "B": "31.21000000", "a": "25.36520000", "A": "40.66000000",
}  # fmt: skip
DOCUMENTED = [
    pytest.param("btcusdt@aggTrade", DOC_AGG_TRADE, expected_trade, id="aggTrade"),
    pytest.param("btcusdt@kline_1m", DOC_KLINE, expected_kline, id="kline"),
    pytest.param("btcusdt@ticker", DOC_TICKER, expected_ticker, id="24hrTicker"),
    pytest.param("bnbusdt@bookTicker", DOC_BOOK_TICKER, expected_bbo, id="bookTicker"),
]


@pytest.mark.parametrize(("stream", "data", "expected"), DOCUMENTED)
def test_documented_payloads(adapter: BinanceFuturesAdapter, stream: str, data: dict, expected: Any) -> None:
    combined = json.dumps({"stream": stream, "data": data}).encode()
    assert contract_json(adapter.parse_frame(combined, RECEIVED_AT)) == expected(data, RECEIVED_AT)
    raw = json.dumps(data).encode()
    assert contract_json(adapter.parse_frame(raw, RECEIVED_AT)) == expected(data, RECEIVED_AT)


def test_documented_trade_spelled_out(adapter: BinanceFuturesAdapter) -> None:
    assert contract_json(adapter.parse_frame(json.dumps(DOC_AGG_TRADE).encode(), RECEIVED_AT)) == {
        "exchange": "binance-futures", "symbol": "BTC/USDT", "type": "trade", "timestamp": 123456789,
        "receivedAt": RECEIVED_AT,
        "data": {"price": "0.001", "quantity": "100", "side": "sell", "tradeId": "5933014",
                 "tradeTime": 123456785},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "event"),
    [
        (b'{"result": null, "id": 1}', Ack(1)),
        (b'{"result": ["btcusdt@aggTrade"], "id": 3}', SubscriptionList(3, ["btcusdt@aggTrade"])),
        (b'{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}',
         ErrorReply(2, "Invalid request: invalid stream", 2)),
        (b'{"code": 1, "msg": "Invalid value type: expected Boolean"}',
         ErrorReply(1, "Invalid value type: expected Boolean")),
    ],
)  # fmt: skip
def test_replies(adapter: BinanceFuturesAdapter, frame: bytes, event: object) -> None:
    assert adapter.parse_frame(frame, RECEIVED_AT) == [event]
    assert adapter.control_events(frame) == [event]


# Routing: the 2026 URL change (exchange-protocols.md §2.1).
@pytest.mark.parametrize(
    ("data_type", "stream", "route"),
    [
        ("trade", "btcusdt@aggTrade", "/market/stream"),
        ("kline_1m", "btcusdt@kline_1m", "/market/stream"),
        ("kline_1M", "btcusdt@kline_1M", "/market/stream"),
        ("ticker", "btcusdt@ticker", "/market/stream"),
        ("bbo", "btcusdt@bookTicker", "/public/stream"),
    ],
)
def test_stream_names_and_routes(
    adapter: BinanceFuturesAdapter, data_type: str, stream: str, route: str
) -> None:
    parsed = DataType.parse(data_type)
    assert adapter.stream_name(adapter.by_symbol["BTC/USDT"], parsed) == stream
    assert adapter.route(parsed) == route


def test_plan_puts_book_tickers_and_market_streams_on_separate_connections(
    adapter: BinanceFuturesAdapter,
) -> None:
    data_types = [DataType.parse(t) for t in ("trade", "kline_1m", "ticker", "bbo")]
    instruments = [adapter.by_symbol["BTC/USDT"], adapter.by_symbol["BNB/USDT"]]
    plans = plan_connections(adapter, instruments, data_types, max_connections=5, streams_per_connection=1000)
    assert {plan.route: set(plan.streams) for plan in plans} == {
        "/market/stream": {"btcusdt@aggTrade", "btcusdt@kline_1m", "btcusdt@ticker",
                           "bnbusdt@aggTrade", "bnbusdt@kline_1m", "bnbusdt@ticker"},
        "/public/stream": {"btcusdt@bookTicker", "bnbusdt@bookTicker"},
    }  # fmt: skip


@pytest.mark.parametrize("data_type", ["kline_1s", "kline_2m"])
def test_unsupported_data_types(adapter: BinanceFuturesAdapter, data_type: str) -> None:
    assert not BinanceFuturesAdapter.supports(DataType.parse(data_type))
    with pytest.raises(ValueError):
        adapter.stream_name(adapter.by_symbol["BTC/USDT"], DataType.parse(data_type))


def test_registered_with_its_limits() -> None:
    assert adapter_class("binance-futures") is BinanceFuturesAdapter
    limits = BinanceFuturesAdapter.limits
    assert limits.max_incoming_messages_per_second == 10
    assert limits.max_streams_per_connection == 1024
    assert limits.max_connection_lifetime_seconds == 24 * 3600
    assert limits.rest_weight_per_minute == 2400
    assert BinanceFuturesAdapter.instruments_path == "/fapi/v1/exchangeInfo"
    assert (
        BinanceFuturesAdapter.acknowledges_subscriptions and not BinanceFuturesAdapter.replaces_subscriptions
    )


def test_subscribe_messages(adapter: BinanceFuturesAdapter) -> None:
    assert adapter.subscribe_message(["btcusdt@aggTrade"], 4) == (
        b'{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":4}'
    )
    assert adapter.unsubscribe_message(["btcusdt@aggTrade"], 5) == (
        b'{"method":"UNSUBSCRIBE","params":["btcusdt@aggTrade"],"id":5}'
    )


def test_instruments_are_perpetuals_named_by_their_assets() -> None:
    body = json.dumps({"symbols": [
        {"symbol": "BTCUSDT", "pair": "BTCUSDT", "contractType": "PERPETUAL", "status": "TRADING",
         "baseAsset": "BTC", "quoteAsset": "USDT", "marginAsset": "USDT"},
        {"symbol": "BTCUSDT_260925", "pair": "BTCUSDT", "contractType": "CURRENT_QUARTER",
         "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT", "marginAsset": "USDT"},
        {"symbol": "1000PEPEUSDC", "pair": "1000PEPEUSDC", "contractType": "PERPETUAL",
         "status": "SETTLING", "baseAsset": "1000PEPE", "quoteAsset": "USDC"},
    ]}).encode()  # fmt: skip
    assert BinanceFuturesAdapter.parse_instruments(body) == [
        Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT", "TRADING"),
        Instrument("1000PEPE/USDC", "1000PEPEUSDC", "1000PEPE", "USDC", "SETTLING"),
    ]


MALFORMED = [
    pytest.param(b"{", "invalid-json", id="truncated"),
    pytest.param(b"[]", "schema-mismatch", id="array"),
    pytest.param(json.dumps({"stream": "btcusdt@trade", "data": DOC_AGG_TRADE}).encode(), "unknown-stream",
                 id="spot-trade-stream"),
    pytest.param(json.dumps({"stream": "btcusdt@kline_1s", "data": DOC_KLINE}).encode(), "unknown-stream",
                 id="kline-1s"),
    pytest.param(json.dumps({**DOC_AGG_TRADE, "e": "trade"}).encode(), "unknown-event", id="raw-trade"),
    pytest.param(json.dumps({k: v for k, v in DOC_BOOK_TICKER.items() if k != "E"}).encode(),
                 "schema-mismatch", id="book-ticker-without-event-time"),
    pytest.param(json.dumps({**DOC_AGG_TRADE, "p": 0.001}).encode(), "schema-mismatch", id="price-number"),
    pytest.param(json.dumps({"stream": "ethusdt@aggTrade", "data": {**DOC_AGG_TRADE, "s": "ETHUSDT"}})
                 .encode(), "unknown-symbol", id="unknown-symbol"),
    pytest.param(json.dumps({"stream": "bnbusdt@aggTrade", "data": DOC_AGG_TRADE}).encode(),
                 "symbol-mismatch", id="symbol-mismatch"),
    pytest.param(b'{"e":"depthUpdate","E":1,"s":"BTCUSDT"}', "schema-mismatch", id="raw-depth-without-ids"),
    pytest.param(b'{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":1,"u":2,"b":[],"a":[]}', "schema-mismatch",
                 id="depth-without-pu"),
    pytest.param(b"{}", "unknown-event", id="empty-object"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_frames(adapter: BinanceFuturesAdapter, payload: bytes, reason: str) -> None:
    assert reason_of(adapter, payload) == reason


@settings(max_examples=300, deadline=None)
@given(
    frame=st.sampled_from([frame for _, frame in RECORDED[::15]]),
    position=st.floats(0, 1),
    cut=st.integers(0, 8),
    insert=st.binary(max_size=8),
)
def test_mutated_frames_raise_only_frame_error(
    frame: bytes, position: float, cut: int, insert: bytes
) -> None:
    at = int(position * len(frame))
    adapter = BinanceFuturesAdapter(INSTRUMENTS)
    with contextlib.suppress(FrameError):
        adapter.parse_frame(frame[:at] + insert + frame[at + cut :], RECEIVED_AT)
    adapter.control_events(frame[:at] + insert + frame[at + cut :])


# REST history (exchange-protocols.md §2.6): aggTrades share the aggTrade stream's ids.
def test_trades_request_pages_aggregates_by_id(adapter: BinanceFuturesAdapter) -> None:
    btc = adapter.by_symbol["BTC/USDT"]
    request = adapter.trades_request(btc, 5933014, 1000)
    assert (request.path, request.params, request.tag) == (
        "/fapi/v1/aggTrades",
        {"symbol": "BTCUSDT", "limit": "1000", "fromId": "5933014"},
        "trades/BTCUSDT",
    )
    assert "fromId" not in adapter.trades_request(btc, None, 10).params
    assert adapter.klines_request(btc, "1m", 1638747660000, 1500).path == "/fapi/v1/klines"
    assert adapter.ticker_request(btc).path == "/fapi/v1/ticker/24hr"


def test_parse_rest_agg_trades_klines_and_ticker(adapter: BinanceFuturesAdapter) -> None:
    trades = b'[{"a":26129,"p":"0.01633102","q":"4.70443515","nq":"4.70443515","f":27781,"l":27781,' \
             b'"T":1498793709153,"m":true}]'  # fmt: skip
    [trade] = adapter.parse_rest(RestTag("trades", "BTCUSDT", None), trades, RECEIVED_AT)
    assert json.loads(encode_record(trade)) == {
        "exchange": "binance-futures", "symbol": "BTC/USDT", "type": "trade", "timestamp": 1498793709153,
        "receivedAt": RECEIVED_AT, "data": {"price": "0.01633102", "quantity": "4.70443515", "side": "sell",
                                            "tradeId": "26129", "tradeTime": 1498793709153}}  # fmt: skip
    klines = b'[[1499040000000,"0.01634790","0.80000000","0.01575800","0.01577100","148976.11427815",' \
             b'1499644799999,"2434.19055334",308,"1756.87402397","28.46694368","0"]]'  # fmt: skip
    [kline] = adapter.parse_rest(RestTag("klines", "BTCUSDT", "1m"), klines, RECEIVED_AT)
    assert kline.data == Kline(
        "1m",
        1499040000000,
        1499644799999,
        "0.01634790",
        "0.80000000",
        "0.01575800",
        "0.01577100",
        "148976.11427815",
        "2434.19055334",
        308,
        True,
    )
    ticker = json.dumps(
        {
            "symbol": "BTCUSDT",
            "priceChange": "-94.99999800",
            "priceChangePercent": "-95.960",
            "weightedAvgPrice": "0.29628482",
            "lastPrice": "4.00000200",
            "lastQty": "200.00000000",
            "openPrice": "99.00000000",
            "highPrice": "100.00000000",
            "lowPrice": "0.10000000",
            "volume": "8913.30000000",
            "quoteVolume": "15.30000000",
            "openTime": 1499783499040,
            "closeTime": 1499869899040,
            "firstId": 28385,
            "lastId": 28460,
            "count": 76,
        }
    ).encode()
    [record] = adapter.parse_rest(RestTag("ticker", "BTCUSDT", None), ticker, RECEIVED_AT)
    assert record.timestamp == 1499869899040 and record.data.last == "4.00000200"  # type: ignore[union-attr]
    with pytest.raises(FrameError):
        adapter.parse_rest(RestTag("trades", "BTCUSDT", None), b'[{"id":1}]', RECEIVED_AT)


def test_trade_marker_reads_aggregate_ids_only(adapter: BinanceFuturesAdapter) -> None:
    marks = {}
    for _, frame in RECORDED:
        mark = adapter.trade_marker(frame)
        source = json.loads(frame)
        if source["stream"].endswith("@aggTrade"):
            base, quote = MARKETS[source["data"]["s"]]
            assert mark == (f"{base}/{quote}", source["data"]["a"])
            marks[mark] = True
        else:
            assert mark is None
    assert len(marks) == 91
    assert adapter.trade_marker(json.dumps(DOC_AGG_TRADE).encode()) == ("BTC/USDT", 5933014)
    assert BinanceFuturesAdapter.rest_weight_used({"X-MBX-USED-WEIGHT-1M": "42"}) == 42
