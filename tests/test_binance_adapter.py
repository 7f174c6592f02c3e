"""BinanceAdapter against recorded traffic and the documented payloads (exchange-protocols.md §1)."""

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
from streams.exchanges import binance as binance_module
from streams.exchanges.base import (
    Ack,
    DataType,
    ErrorReply,
    FrameError,
    Instrument,
    ServerShutdown,
    SubscriptionList,
)
from streams.exchanges.binance import BinanceAdapter
from streams.records import Kline, MarketRecord, decode_record, encode_record

RECORDED = Path(__file__).resolve().parent / "fixtures" / "recorded"
RECEIVED_AT = 1_700_000_000_123

# exchange symbol → (base, quote): the fixture's four markets plus the documented examples' ones.
MARKETS = {
    "NKNUSDT": ("NKN", "USDT"),
    "BLZETH": ("BLZ", "ETH"),
    "LRCBTC": ("LRC", "BTC"),
    "RUNEEUR": ("RUNE", "EUR"),
    "BTCUSDT": ("BTC", "USDT"),
    "BNBBTC": ("BNB", "BTC"),
    "BNBUSDT": ("BNB", "USDT"),
}
INSTRUMENTS = [
    Instrument(symbol=f"{base}/{quote}", exchange_symbol=symbol, base=base, quote=quote)
    for symbol, (base, quote) in MARKETS.items()
]


def normalized(exchange_symbol: str) -> str:
    base, quote = MARKETS[exchange_symbol]
    return f"{base}/{quote}"


@pytest.fixture
def adapter() -> BinanceAdapter:
    return BinanceAdapter(INSTRUMENTS)


def only_record(items: list[Any]) -> MarketRecord:
    assert len(items) == 1
    record = items[0]
    assert isinstance(record, MarketRecord)
    return record


def as_contract_json(items: list[Any]) -> dict[str, Any]:
    """The single record in `items`, as downstream consumers see it on the market topic."""
    record = only_record(items)
    assert decode_record(encode_record(record)) == record
    return json.loads(encode_record(record))


def reason_of(adapter: BinanceAdapter, payload: bytes) -> str:
    with pytest.raises(FrameError) as caught:
        adapter.parse_frame(payload, RECEIVED_AT)
    return caught.value.reason


def combined(stream: str, data: dict[str, Any]) -> bytes:
    return json.dumps({"stream": stream, "data": data}, separators=(",", ":")).encode()  # as Binance sends


# Expected records, built from an independent json.loads of the frame and the DESIGN.md contract.
def expected_record(
    record_type: str, data: dict[str, Any], timestamp: int, received_at: int, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "exchange": "binance",
        "symbol": normalized(data["s"]),
        "type": record_type,
        "timestamp": timestamp,
        "receivedAt": received_at,
        "data": body,
    }


def expected_trade(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    trade_id = data["t"] if data["e"] == "trade" else data["a"]
    body = {
        "price": data["p"],
        "quantity": data["q"],
        "side": "sell" if data["m"] else "buy",
        "tradeId": str(trade_id),
        "tradeTime": data["T"],
    }
    return expected_record("trade", data, data["E"], received_at, body)


def expected_kline(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    bar = data["k"]
    body = {
        "interval": bar["i"],
        "startTime": bar["t"],
        "endTime": bar["T"],
        "open": bar["o"],
        "high": bar["h"],
        "low": bar["l"],
        "close": bar["c"],
        "volume": bar["v"],
        "quoteVolume": bar["q"],
        "trades": bar["n"],
        "closed": bar["x"],
    }
    return expected_record("kline", data, data["E"], received_at, body)


def expected_ticker(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    body = {
        "last": data["c"],
        "open": data["o"],
        "high": data["h"],
        "low": data["l"],
        "volume": data["v"],
        "quoteVolume": data["q"],
        "change": data["p"],
        "changePercent": data["P"],
        "bidPrice": data["b"],
        "bidQuantity": data["B"],
        "askPrice": data["a"],
        "askQuantity": data["A"],
    }
    return expected_record("ticker", data, data["E"], received_at, body)


def expected_bbo(data: dict[str, Any], received_at: int) -> dict[str, Any]:
    body = {
        "bidPrice": data["b"],
        "bidQuantity": data["B"],
        "askPrice": data["a"],
        "askQuantity": data["A"],
        "updateId": str(data["u"]),
    }
    # bookTicker has no event time, so the record's timestamp is the receive time.
    return expected_record("bbo", data, received_at, received_at, body)


# Recorded traffic. Line format: tests/fixtures/recorded/README.md.
def recorded_frames() -> list[tuple[int, bytes]]:
    frames = []
    for line in (RECORDED / "BINANCE.ws.1.0").read_text().splitlines():
        if not line or line.startswith("wss://"):
            continue  # blank, or a connection-opened line
        seconds, _, frame = line.partition(": ")
        frames.append((int(Decimal(seconds) * 1000), frame.encode()))
    return frames


RECORDED_FRAMES = recorded_frames()


def test_recording_has_every_channel_of_the_readme() -> None:
    channels = {json.loads(frame)["stream"].split("@", 1)[1] for _, frame in RECORDED_FRAMES}
    assert channels == {"depth@100ms", "bookTicker", "kline_1m", "aggTrade"}
    assert len(RECORDED_FRAMES) == 265


@pytest.mark.parametrize(
    ("received_at", "frame"),
    RECORDED_FRAMES,
    ids=[f"{n}-{json.loads(frame)['stream']}" for n, (_, frame) in enumerate(RECORDED_FRAMES)],
)
def test_recorded_frame(adapter: BinanceAdapter, received_at: int, frame: bytes) -> None:
    source = json.loads(frame)
    data = source["data"]
    channel = source["stream"].split("@", 1)[1]
    # The source agent's per-frame check must pass every market frame through untouched.
    assert adapter.control_events(frame) == []
    if channel.startswith("depth"):
        # Diff depth is not a market record: the depth engine turns it into depth records.
        bids, asks = ([tuple(level) for level in data[side]] for side in ("b", "a"))
        expected_diff = DepthDiff(normalized(data["s"]), data["E"], received_at, data["U"], data["u"], None,
                                  bids, asks)  # fmt: skip
        assert adapter.parse_frame(frame, received_at) == [expected_diff]
        return
    expected = {"bookTicker": expected_bbo, "kline_1m": expected_kline, "aggTrade": expected_trade}[channel]
    assert as_contract_json(adapter.parse_frame(frame, received_at)) == expected(data, received_at)


# Documented payloads, exchange-protocols.md §1.4 (comments dropped).
DOC_TRADE: dict[str, Any] = {
    "e": "trade", "E": 1672515782136, "s": "BNBBTC", "t": 12345, "p": "0.001", "q": "100",
    "T": 1672515782136, "m": True, "M": True,
}  # fmt: skip
DOC_AGG_TRADE: dict[str, Any] = {
    "e": "aggTrade", "E": 1672515782136, "s": "BNBBTC", "a": 12345, "p": "0.001", "q": "100",
    "f": 100, "l": 105, "T": 1672515782136, "m": True, "M": True,
}  # fmt: skip
DOC_KLINE: dict[str, Any] = {
    "e": "kline", "E": 1672515782136, "s": "BNBBTC",
    "k": {
        "t": 1672515780000, "T": 1672515839999, "s": "BNBBTC", "i": "1m", "f": 100, "L": 200,
        "o": "0.0010", "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000", "n": 100, "x": False,
        "q": "1.0000", "V": "500", "Q": "0.500", "B": "123456",
    },
}  # fmt: skip
DOC_TICKER: dict[str, Any] = {
    "e": "24hrTicker", "E": 1672515782136, "s": "BNBBTC", "p": "0.0015", "P": "250.00", "w": "0.0018",
    "x": "0.0009", "c": "0.0025", "Q": "10", "b": "0.0024", "B": "10", "a": "0.0026", "A": "100",
    "o": "0.0010", "h": "0.0025", "l": "0.0010", "v": "10000", "q": "18", "O": 0, "C": 86400000,
    "F": 0, "L": 18150, "n": 18151,
}  # fmt: skip
DOC_BOOK_TICKER: dict[str, Any] = {
    "u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000",
    "A": "40.66000000",
}  # fmt: skip

DOCUMENTED = [
    pytest.param("bnbbtc@trade", DOC_TRADE, expected_trade, id="trade"),
    pytest.param("bnbbtc@aggTrade", DOC_AGG_TRADE, expected_trade, id="aggTrade"),
    pytest.param("bnbbtc@kline_1m", DOC_KLINE, expected_kline, id="kline"),
    pytest.param("bnbbtc@ticker", DOC_TICKER, expected_ticker, id="24hrTicker"),
    pytest.param("bnbusdt@bookTicker", DOC_BOOK_TICKER, expected_bbo, id="bookTicker"),
]


@pytest.mark.parametrize(("stream", "data", "expected"), DOCUMENTED)
def test_documented_payload_combined(adapter: BinanceAdapter, stream: str, data: dict, expected: Any) -> None:
    frame = json.dumps({"stream": stream, "data": data}).encode()
    assert as_contract_json(adapter.parse_frame(frame, RECEIVED_AT)) == expected(data, RECEIVED_AT)


@pytest.mark.parametrize(("stream", "data", "expected"), DOCUMENTED)
def test_documented_payload_raw(adapter: BinanceAdapter, stream: str, data: dict, expected: Any) -> None:
    frame = json.dumps(data).encode()
    assert as_contract_json(adapter.parse_frame(frame, RECEIVED_AT)) == expected(data, RECEIVED_AT)


@pytest.mark.parametrize(
    ("buyer_is_maker", "taker_side"), [(True, "sell"), (False, "buy")], ids=["maker-buyer", "taker-buyer"]
)
@pytest.mark.parametrize("event", [DOC_TRADE, DOC_AGG_TRADE], ids=["trade", "aggTrade"])
def test_side_is_the_takers(
    adapter: BinanceAdapter, event: dict, buyer_is_maker: bool, taker_side: str
) -> None:
    frame = json.dumps({**event, "m": buyer_is_maker}).encode()
    assert as_contract_json(adapter.parse_frame(frame, RECEIVED_AT))["data"]["side"] == taker_side


def test_documented_values_spelled_out(adapter: BinanceAdapter) -> None:
    trade = only_record(adapter.parse_frame(json.dumps(DOC_TRADE).encode(), RECEIVED_AT))
    assert json.loads(encode_record(trade)) == {
        "exchange": "binance", "symbol": "BNB/BTC", "type": "trade", "timestamp": 1672515782136,
        "receivedAt": RECEIVED_AT,
        "data": {"price": "0.001", "quantity": "100", "side": "sell", "tradeId": "12345",
                 "tradeTime": 1672515782136},
    }  # fmt: skip
    bbo = only_record(adapter.parse_frame(json.dumps(DOC_BOOK_TICKER).encode(), RECEIVED_AT))
    assert bbo.natural_id == "400900217"
    assert bbo.timestamp == RECEIVED_AT


def test_kline_of_another_interval(adapter: BinanceAdapter) -> None:
    data = {**DOC_KLINE, "k": {**DOC_KLINE["k"], "i": "1M", "x": True}}
    kline = only_record(adapter.parse_frame(combined("bnbbtc@kline_1M", data), RECEIVED_AT))
    assert isinstance(kline.data, Kline)
    assert (kline.data.interval, kline.data.closed, kline.natural_id) == ("1M", True, "1672515780000:1M")


# Replies and notices, exchange-protocols.md §1.1 and §1.3.
@pytest.mark.parametrize(
    ("frame", "event"),
    [
        (b'{"result": null, "id": 1}', Ack(1)),
        (b'{"result": null, "id": 312}', Ack(312)),
        (b'{"result":null,"id":"a1b2"}', Ack("a1b2")),
        (b'{"result":null,"id":null}', Ack(None)),
        (b'{"result": ["btcusdt@aggTrade"], "id": 3}', SubscriptionList(3, ["btcusdt@aggTrade"])),
        (b'{"result":[],"id":4}', SubscriptionList(4, [])),
    ],
)
def test_replies(adapter: BinanceAdapter, frame: bytes, event: object) -> None:
    assert adapter.parse_frame(frame, RECEIVED_AT) == [event]
    assert adapter.control_events(frame) == [event]


DOCUMENTED_ERRORS = [
    (b'{"code": 0, "msg": "Unknown property","id": 5}', ErrorReply(0, "Unknown property", 5)),
    (
        b'{"code": 1, "msg": "Invalid value type: expected Boolean"}',
        ErrorReply(1, "Invalid value type: expected Boolean"),
    ),
    (
        b'{"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}',
        ErrorReply(2, "Invalid request: request ID must be an unsigned integer"),
    ),
    (
        b'{"code": 2, "msg": "Invalid request: unknown variant %s, expected one of SUBSCRIBE, '
        b'UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY ..."}',
        ErrorReply(
            2,
            "Invalid request: unknown variant %s, expected one of SUBSCRIBE, UNSUBSCRIBE, "
            "LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY ...",
        ),
    ),
    (
        b'{"code": 2, "msg": "Invalid request: too many parameters"}',
        ErrorReply(2, "Invalid request: too many parameters"),
    ),
    (
        b'{"code": 2, "msg": "Invalid request: missing field method ..."}',
        ErrorReply(2, "Invalid request: missing field method ..."),
    ),
    (
        b'{"code":3,"msg":"Invalid JSON: expected value at line %s column %s"}',
        ErrorReply(3, "Invalid JSON: expected value at line %s column %s"),
    ),
    # Live servers have also answered with the error nested under "error".
    (
        b'{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}',
        ErrorReply(2, "Invalid request: invalid stream", 2),
    ),
]


@pytest.mark.parametrize(("frame", "event"), DOCUMENTED_ERRORS)
def test_error_replies(adapter: BinanceAdapter, frame: bytes, event: ErrorReply) -> None:
    assert adapter.parse_frame(frame, RECEIVED_AT) == [event]
    assert adapter.control_events(frame) == [event]


@pytest.mark.parametrize(
    "frame",
    [
        b'{"e": "serverShutdown", "E": 1770123456789}',
        b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}',
    ],
    ids=["raw", "combined"],
)
def test_server_shutdown(adapter: BinanceAdapter, frame: bytes) -> None:
    assert adapter.parse_frame(frame, RECEIVED_AT) == [ServerShutdown(1770123456789)]
    assert adapter.control_events(frame) == [ServerShutdown(1770123456789)]


def test_control_events_ignores_broken_frames(adapter: BinanceAdapter) -> None:
    assert adapter.control_events(b"\xff{") == []
    assert adapter.control_events(b'{"stream":"!serverShutdown","data":{}}') == []


# Requests, names and metadata.
def test_subscribe_and_unsubscribe_messages(adapter: BinanceAdapter) -> None:
    streams = ["btcusdt@trade", "bnbbtc@kline_1m"]
    assert adapter.subscribe_message(streams, 7) == (
        b'{"method":"SUBSCRIBE","params":["btcusdt@trade","bnbbtc@kline_1m"],"id":7}'
    )
    assert adapter.unsubscribe_message(("btcusdt@trade",), 312) == (
        b'{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":312}'
    )


@pytest.mark.parametrize(
    ("data_type", "stream"),
    [
        ("trade", "btcusdt@trade"),
        ("kline_1m", "btcusdt@kline_1m"),
        ("kline_1M", "btcusdt@kline_1M"),
        ("kline_1s", "btcusdt@kline_1s"),
        ("ticker", "btcusdt@ticker"),
        ("bbo", "btcusdt@bookTicker"),
        ("depth", "btcusdt@depth@100ms"),
    ],
)
def test_stream_names_and_route(adapter: BinanceAdapter, data_type: str, stream: str) -> None:
    btc_usdt = adapter.by_symbol["BTC/USDT"]
    assert adapter.stream_name(btc_usdt, DataType.parse(data_type)) == stream
    assert adapter.route(DataType.parse(data_type)) == "/stream"
    # Every stream this adapter names, it can also read.
    assert binance_module._BY_CHANNEL_NAME.get(stream.split("@", 1)[1]) is not None


@pytest.mark.parametrize("data_type", ["kline_2m", "kline_7d"])
def test_unsupported_data_types(adapter: BinanceAdapter, data_type: str) -> None:
    assert not BinanceAdapter.supports(DataType.parse(data_type))
    with pytest.raises(ValueError):
        adapter.stream_name(adapter.by_symbol["BTC/USDT"], DataType.parse(data_type))


def test_supported_data_types() -> None:
    intervals = ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d"]
    intervals += ["1w", "1M"]
    for text in ["trade", "ticker", "bbo", *(f"kline_{i}" for i in intervals)]:
        assert BinanceAdapter.supports(DataType.parse(text)), text
    assert BinanceAdapter.data_kinds == {"trade", "kline", "ticker", "bbo", "depth"}
    assert BinanceAdapter.kline_intervals == set(intervals)


def test_registered_with_its_limits() -> None:
    assert adapter_class("binance") is BinanceAdapter
    limits = BinanceAdapter.limits
    assert limits.max_streams_per_connection == 1024
    assert limits.max_incoming_messages_per_second == 5
    assert (limits.max_connection_attempts, limits.connection_attempt_window_seconds) == (300, 300)
    assert limits.max_connection_lifetime_seconds == 24 * 3600
    assert limits.rest_weight_per_minute == 6000
    assert BinanceAdapter.instruments_path == "/api/v3/exchangeInfo"


def test_parse_instruments_uses_assets_not_string_splitting() -> None:
    body = json.dumps(
        {
            "timezone": "UTC",
            "symbols": [
                {"symbol": "1000SATSUSDT", "status": "TRADING", "baseAsset": "1000SATS",
                 "quoteAsset": "USDT", "baseAssetPrecision": 8, "filters": []},
                {"symbol": "ETHBTC", "status": "BREAK", "baseAsset": "ETH", "quoteAsset": "BTC"},
                {"symbol": "BTCFDUSD", "status": "HALT", "baseAsset": "BTC", "quoteAsset": "FDUSD"},
            ],
        }
    ).encode()  # fmt: skip
    assert BinanceAdapter.parse_instruments(body) == [
        Instrument("1000SATS/USDT", "1000SATSUSDT", "1000SATS", "USDT", "TRADING"),
        Instrument("ETH/BTC", "ETHBTC", "ETH", "BTC", "BREAK"),
        Instrument("BTC/FDUSD", "BTCFDUSD", "BTC", "FDUSD", "HALT"),
    ]
    adapter = BinanceAdapter(BinanceAdapter.parse_instruments(body))
    assert adapter.stream_name(adapter.by_symbol["1000SATS/USDT"], DataType("trade")) == "1000satsusdt@trade"


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"<html>", "invalid-json"), (b'{"symbols":[{"symbol":"ETHBTC"}]}', "schema-mismatch")],
)
def test_parse_instruments_rejects_bad_bodies(body: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as caught:
        BinanceAdapter.parse_instruments(body)
    assert caught.value.reason == reason


# Malformed input: FrameError with a stable reason, never anything else.
NESTING = 100_000
MALFORMED = [
    pytest.param(b'{"stream":"btcusdt@trade",', "invalid-json", id="truncated"),
    pytest.param(b"", "invalid-json", id="empty"),
    pytest.param(b"\xff\xfe\x00{}", "invalid-json", id="not-utf8"),
    pytest.param(
        combined("bnbbtc@trade", DOC_TRADE).replace(b'"0.001"', b'"0.0\xff1"'),
        "invalid-json",
        id="utf8-in-price",
    ),
    pytest.param(b"[1, 2]", "schema-mismatch", id="top-level-array"),
    pytest.param(b"42", "schema-mismatch", id="top-level-number"),
    pytest.param(b'"text"', "schema-mismatch", id="top-level-string"),
    pytest.param(b"null", "schema-mismatch", id="top-level-null"),
    pytest.param(combined("bnbbtc@trade", {**DOC_TRADE, "p": 0.001}), "schema-mismatch", id="price-number"),
    pytest.param(combined("bnbbtc@trade", {**DOC_TRADE, "t": "12345"}), "schema-mismatch", id="id-string"),
    pytest.param(combined("bnbbtc@trade", {**DOC_TRADE, "m": "true"}), "schema-mismatch", id="flag-string"),
    pytest.param(json.dumps({**DOC_TRADE, "E": 1.5}).encode(), "schema-mismatch", id="raw-time-float"),
    pytest.param(
        combined("bnbbtc@trade", {k: v for k, v in DOC_TRADE.items() if k != "p"}),
        "schema-mismatch",
        id="missing-price",
    ),
    pytest.param(
        combined("bnbbtc@kline_1m", {**DOC_KLINE, "k": {**DOC_KLINE["k"], "n": "100"}}),
        "schema-mismatch",
        id="kline-trades-string",
    ),
    pytest.param(b'{"stream":"bnbbtc@trade"}', "schema-mismatch", id="combined-without-data"),
    pytest.param(b'{"stream":7,"data":{}}', "schema-mismatch", id="stream-number"),
    pytest.param(b'{"result":true,"id":2}', "schema-mismatch", id="get-property-result"),
    pytest.param(b'{"code":2,"id":1}', "schema-mismatch", id="error-without-msg"),
    pytest.param(b'{"u":1,"s":"BNBUSDT","b":"1"}', "schema-mismatch", id="partial-book-ticker"),
    pytest.param(combined("bnbbtc@aggTrade", DOC_TRADE), "schema-mismatch", id="trade-on-aggtrade-stream"),
    pytest.param(combined("bnbbtc@foo", DOC_TRADE), "unknown-stream", id="unknown-channel"),
    pytest.param(combined("bnbbtc", DOC_TRADE), "unknown-stream", id="no-channel"),
    pytest.param(combined("bnbbtc@kline_2m", DOC_KLINE), "unknown-stream", id="unknown-interval"),
    pytest.param(combined("!miniTicker@arr", {}), "unknown-stream", id="market-wide-stream"),
    pytest.param(combined("bnbbtc@depth", {}), "schema-mismatch", id="depth-without-fields"),
    pytest.param(combined("bnbbtc@depth20@100ms", {}), "unsupported-data-type", id="partial-depth"),
    pytest.param(b'{"e":"depthUpdate","E":1,"s":"BNBBTC"}', "schema-mismatch", id="raw-depth-without-ids"),
    pytest.param(b'{"e":"24hrMiniTicker","E":1,"s":"BNBBTC"}', "unknown-event", id="raw-unknown-event"),
    pytest.param(b'{"lastUpdateId":160,"bids":[],"asks":[]}', "unknown-event", id="raw-partial-depth"),
    pytest.param(b"{}", "unknown-event", id="empty-object"),
    pytest.param(
        combined("ethusdt@trade", {**DOC_TRADE, "s": "ETHUSDT"}), "unknown-symbol", id="unknown-symbol"
    ),
    pytest.param(
        json.dumps({**DOC_TRADE, "s": "ETHUSDT"}).encode(), "unknown-symbol", id="raw-unknown-symbol"
    ),
    pytest.param(combined("btcusdt@trade", DOC_TRADE), "symbol-mismatch", id="symbol-mismatch"),
    # msgspec rejects a top-level array before descending into it; deeper down, nesting beyond the
    # recursion limit is reported as undecodable JSON.
    pytest.param(b"[" * NESTING + b"]" * NESTING, "schema-mismatch", id="nested-top-level"),
    pytest.param(b'{"a":' * NESTING + b"1" + b"}" * NESTING, "invalid-json", id="nested-objects"),
    pytest.param(
        b'{"stream":"bnbbtc@trade","data":' + b"[" * NESTING + b"]" * NESTING + b"}",
        "invalid-json",
        id="nested-data",
    ),
    pytest.param(
        b'{"result":' + b"[" * NESTING + b"]" * NESTING + b',"id":1}', "invalid-json", id="nested-result"
    ),
]


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_frames(adapter: BinanceAdapter, payload: bytes, reason: str) -> None:
    assert reason_of(adapter, payload) == reason


def test_stream_cache_is_bounded(adapter: BinanceAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binance_module, "_STREAM_CACHE_LIMIT", 2)
    for symbol in ["aaa", "bbb", "ccc", "ddd"]:
        assert reason_of(adapter, combined(f"{symbol}@trade", {**DOC_TRADE, "s": symbol.upper()})) == (
            "unknown-symbol"
        )
    assert len(adapter._streams) == 2


def test_instrument_table_changes_apply_to_cached_streams(adapter: BinanceAdapter) -> None:
    frame = combined("bnbbtc@trade", DOC_TRADE)
    adapter.parse_frame(frame, RECEIVED_AT)
    del adapter.instruments["BNBBTC"]
    assert reason_of(adapter, frame) == "unknown-symbol"


SAMPLE_FRAMES = [frame for _, frame in RECORDED_FRAMES[::20]] + [
    json.dumps(payload).encode() for payload in (DOC_TRADE, DOC_KLINE, DOC_TICKER, DOC_BOOK_TICKER)
]


@settings(max_examples=300, deadline=None)
@given(
    frame=st.sampled_from(SAMPLE_FRAMES),
    position=st.floats(0, 1),
    cut=st.integers(0, 8),
    insert=st.binary(max_size=8),
)
def test_mutated_frames_raise_only_frame_error(
    frame: bytes, position: float, cut: int, insert: bytes
) -> None:
    at = int(position * len(frame))
    mutated = frame[:at] + insert + frame[at + cut :]
    adapter = BinanceAdapter(INSTRUMENTS)
    try:
        adapter.parse_frame(mutated, RECEIVED_AT)
    except FrameError as exc:
        assert exc.reason in {
            "invalid-json", "schema-mismatch", "unknown-stream", "unknown-event",
            "unsupported-data-type", "unknown-symbol", "symbol-mismatch",
        }  # fmt: skip
    adapter.control_events(mutated)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_bytes_raise_only_frame_error(payload: bytes) -> None:
    adapter = BinanceAdapter(INSTRUMENTS)
    with contextlib.suppress(FrameError):
        adapter.parse_frame(payload, RECEIVED_AT)
