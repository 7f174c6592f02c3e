"""Order books in the exchange adapters: stream names, settings, frames and REST snapshots per exchange.

The recorded Binance traffic is replayed in test_depth_recorded.py and the recorded Upbit frames in
test_upbit_adapter.py; these are the documented payloads (exchange-protocols.md) and the rules.
"""

from __future__ import annotations

import json

import pytest

from streams.config import ConfigError, parse_config
from streams.depth import DepthBook, DepthDiff, DepthSettings, DepthSnapshot
from streams.exchanges import adapter_class
from streams.exchanges.base import (
    DEPTH_PUBLISHED,
    DataType,
    DepthSettingError,
    ExchangeAdapter,
    FrameError,
    Instrument,
)
from streams.exchanges.bithumb import BithumbAdapter
from streams.records import Bbo, MarketRecord
from streams.rest import RestTag, parse_source

RECEIVED_AT = 1_700_000_000_123
DEPTH = DataType.parse("depth")
BINANCE_MARKETS = [
    Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT"),
    Instrument("BNB/BTC", "BNBBTC", "BNB", "BTC"),
]
KRW_MARKETS = [Instrument("BTC/KRW", "KRW-BTC", "BTC", "KRW"), Instrument("ETH/KRW", "KRW-ETH", "ETH", "KRW")]


def make(exchange: str, **depth: object) -> ExchangeAdapter:
    adapter_type = adapter_class(exchange)
    markets = KRW_MARKETS if exchange in ("upbit", "bithumb") else BINANCE_MARKETS
    return adapter_type(markets, adapter_type.depth_settings(**depth))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exchange", "settings", "stream", "route"),
    [
        ("binance", {}, "btcusdt@depth@100ms", "/stream"),
        ("binance", {"speed": "1000ms"}, "btcusdt@depth", "/stream"),
        ("binance-futures", {}, "btcusdt@depth@100ms", "/public/stream"),
        ("binance-futures", {"speed": "250ms"}, "btcusdt@depth", "/public/stream"),
        ("binance-futures", {"speed": "500ms"}, "btcusdt@depth@500ms", "/public/stream"),
        ("upbit", {}, "orderbook:KRW-BTC.15", "/websocket/v1"),
        ("upbit", {"levels": 30}, "orderbook:KRW-BTC.30", "/websocket/v1"),
        ("bithumb", {"levels": 3}, "orderbook:KRW-BTC.3", "/websocket/v1"),
    ],
)
def test_stream_names_follow_the_depth_settings(
    exchange: str, settings: dict[str, object], stream: str, route: str
) -> None:
    adapter = make(exchange, **settings)
    btc = next(iter(adapter.instruments.values()))
    assert adapter.stream_name(btc, DEPTH) == stream
    assert adapter.route(DEPTH) == route


@pytest.mark.parametrize(
    ("exchange", "defaults", "offered_levels", "speeds"),
    [
        ("binance", DepthSettings(20, "100ms", 60.0, 100), range(1, 5001), ("100ms", "1000ms")),
        (
            "binance-futures",
            DepthSettings(20, "100ms", 60.0, 50),
            range(1, 1001),
            ("100ms", "250ms", "500ms"),
        ),
        ("upbit", DepthSettings(15, "realtime", 60.0, 15), (1, 5, 15, 30), ("realtime",)),
        ("bithumb", DepthSettings(15, "realtime", 60.0, 15), range(1, 31), ("realtime",)),
    ],
)
def test_each_exchange_documents_its_depth_defaults(
    exchange: str, defaults: DepthSettings, offered_levels: object, speeds: tuple[str, ...]
) -> None:
    adapter_type = adapter_class(exchange)
    assert adapter_type.depth_settings() == defaults
    assert adapter_type(KRW_MARKETS).depth == defaults  # what an adapter built without settings uses
    assert list(adapter_type.depth_levels) == list(offered_levels)  # type: ignore[call-overload]
    assert adapter_type.depth_speeds == speeds
    assert adapter_type.whole_books is (exchange in ("upbit", "bithumb"))


@pytest.mark.parametrize(
    ("exchange", "settings", "key"),
    [
        ("binance", {"levels": 5001}, "levels"),
        ("binance", {"speed": "250ms"}, "speed"),
        ("binance-futures", {"levels": 1001}, "levels"),
        ("binance-futures", {"speed": "1000ms"}, "speed"),
        ("upbit", {"levels": 10}, "levels"),
        ("upbit", {"speed": "100ms"}, "speed"),
        ("bithumb", {"levels": 31}, "levels"),
        ("binance", {"snapshot_interval_seconds": 0}, "snapshotIntervalSeconds"),
    ],
)
def test_settings_an_exchange_does_not_offer_are_refused(
    exchange: str, settings: dict[str, object], key: str
) -> None:
    with pytest.raises(DepthSettingError) as caught:
        adapter_class(exchange).depth_settings(**settings)  # type: ignore[arg-type]
    assert caught.value.key == key


def config(
    exchange: str, depth: dict[str, object] | None = None, data_types: list[str] | None = None
) -> dict:
    settings: dict[str, object] = {
        "wsEndpoint": "wss://example", "restEndpoint": "https://example", "symbols": ["BTC/KRW"],
        "dataTypes": data_types or ["trade"],
    }  # fmt: skip
    if depth is not None:
        settings["depth"] = depth
    return {"exchanges": {exchange: settings}}


def test_the_config_depth_block_takes_the_exchange_defaults_for_what_it_leaves_out() -> None:
    assert parse_config(config("binance")).depth_settings("binance") == DepthSettings(20, "100ms", 60.0, 100)
    chosen = parse_config(config("binance", {"levels": 200, "snapshotIntervalSeconds": 15}))
    assert chosen.depth_settings("binance") == DepthSettings(200, "100ms", 15.0, 500)
    assert parse_config(config("upbit", {"levels": 30})).depth_settings("upbit").levels == 30


@pytest.mark.parametrize(
    ("exchange", "depth", "message"),
    [
        (
            "binance",
            {"speed": "250ms"},
            "exchanges.binance.depth.speed: binance offers the speeds 100ms, 1000ms",
        ),
        ("upbit", {"levels": 20}, "exchanges.upbit.depth.levels: upbit offers 1, 5, 15, 30 levels"),
        (
            "bithumb",
            {"levels": 0},
            "exchanges.bithumb.depth.levels: Input should be greater than or equal to 1",
        ),
        ("binance", {"snapshotIntervalSeconds": -1}, "exchanges.binance.depth.snapshotIntervalSeconds"),
        ("binance", {"level": 5}, "exchanges.binance.depth.level: unknown key"),
    ],
)
def test_the_config_refuses_depth_settings_by_key(
    exchange: str, depth: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(config(exchange, depth))


def test_depth_is_offered_now_that_the_depth_engine_publishes_records() -> None:
    assert DEPTH_PUBLISHED
    for exchange in ("binance", "binance-futures", "upbit", "bithumb"):
        assert adapter_class(exchange).parses(DEPTH) and adapter_class(exchange).supports(DEPTH)
    chosen = parse_config(config("binance", data_types=["trade", "depth"]))
    assert [str(d) for d in chosen.exchanges["binance"].data_types] == ["trade", "depth"]


# -- Binance --------------------------------------------------------------------------------------

DOC_SPOT_DIFF = {"e": "depthUpdate", "E": 1672515782136, "s": "BNBBTC", "U": 157, "u": 160,
                 "b": [["0.0024", "10"]], "a": [["0.0026", "100"]]}  # fmt: skip
DOC_FUTURES_DIFF = {"e": "depthUpdate", "E": 123456789, "T": 123456788, "s": "BTCUSDT", "U": 157, "u": 160,
                    "pu": 149, "b": [["0.0024", "10"]], "a": [["0.0026", "100"]]}  # fmt: skip


@pytest.mark.parametrize("combined", [True, False], ids=["combined", "raw"])
def test_documented_spot_diff(combined: bool) -> None:
    adapter = make("binance")
    frame = {"stream": "bnbbtc@depth", "data": DOC_SPOT_DIFF} if combined else DOC_SPOT_DIFF
    payload = json.dumps(frame).encode()
    assert adapter.parse_frame(payload, RECEIVED_AT) == [
        DepthDiff(
            "BNB/BTC", 1672515782136, RECEIVED_AT, 157, 160, None, [("0.0024", "10")], [("0.0026", "100")]
        )
    ]
    assert adapter.control_events(payload) == []  # a diff is market data, not a control event


def test_documented_futures_diff_chains_by_pu() -> None:
    adapter = make("binance-futures")
    payload = json.dumps({"stream": "btcusdt@depth@500ms", "data": DOC_FUTURES_DIFF}).encode()
    [diff] = adapter.parse_frame(payload, RECEIVED_AT)
    assert diff == DepthDiff("BTC/USDT", 123456789, RECEIVED_AT, 157, 160, 149, [("0.0024", "10")],
                             [("0.0026", "100")])  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"stream": "bnbbtc@depth", "data": {**DOC_SPOT_DIFF, "b": [["0.0024"]]}}, "schema-mismatch"),
        ({"stream": "bnbbtc@depth", "data": {**DOC_SPOT_DIFF, "b": [[0.0024, "10"]]}}, "schema-mismatch"),
        ({"stream": "bnbbtc@depth", "data": {**DOC_SPOT_DIFF, "U": "157"}}, "schema-mismatch"),
        ({"stream": "btcusdt@depth", "data": DOC_SPOT_DIFF}, "symbol-mismatch"),
        ({"stream": "bnbbtc@depth5", "data": DOC_SPOT_DIFF}, "unsupported-data-type"),
        ({"stream": "bnbbtc@depth@250ms", "data": DOC_SPOT_DIFF}, "unsupported-data-type"),  # a futures speed
    ],
)
def test_spot_diffs_that_do_not_parse(payload: dict[str, object], reason: str) -> None:
    with pytest.raises(FrameError) as caught:
        make("binance").parse_frame(json.dumps(payload).encode(), RECEIVED_AT)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("exchange", "levels", "path", "limit", "weight"),
    [
        # The cheapest tier deeper than the levels published (room below them), the deepest at most.
        ("binance", 20, "/api/v3/depth", 100, 5),
        ("binance", 99, "/api/v3/depth", 100, 5),
        ("binance", 100, "/api/v3/depth", 500, 25),
        ("binance", 101, "/api/v3/depth", 500, 25),
        ("binance", 999, "/api/v3/depth", 1000, 50),
        ("binance", 1000, "/api/v3/depth", 5000, 250),
        ("binance", 5000, "/api/v3/depth", 5000, 250),
        ("binance-futures", 20, "/fapi/v1/depth", 50, 2),
        ("binance-futures", 50, "/fapi/v1/depth", 100, 5),
        ("binance-futures", 100, "/fapi/v1/depth", 500, 10),
        ("binance-futures", 101, "/fapi/v1/depth", 500, 10),
        ("binance-futures", 1000, "/fapi/v1/depth", 1000, 20),
    ],
)
def test_binance_snapshot_requests_take_the_most_levels_for_their_weight(
    exchange: str, levels: int, path: str, limit: int, weight: int
) -> None:
    adapter = make(exchange, levels=levels)
    assert adapter.depth is not None and adapter.depth.snapshot_limit == limit
    request = adapter.depth_snapshot_request(adapter.by_symbol["BTC/USDT"])
    params = {"symbol": "BTCUSDT", "limit": str(limit)}
    assert (request.path, request.params, request.weight) == (path, params, weight)
    assert request.tag == f"depth/BTCUSDT/{limit}"
    assert (
        parse_source("rest:" + request.tag) == request.described == RestTag("depth", "BTCUSDT", None, limit)
    )


def test_binance_snapshots_parse_with_and_without_event_time() -> None:
    levels = b'"bids":[["4.00000000","431.00000000"]],"asks":[["4.00000200","12.00000000"]]}'
    spot_body = b'{"lastUpdateId":1027024,' + levels
    tag = RestTag("depth", "BTCUSDT", None, 100)
    assert make("binance").parse_depth_snapshot(tag, spot_body, RECEIVED_AT) == DepthSnapshot(
        "BTC/USDT", RECEIVED_AT, RECEIVED_AT, 1027024, 100, [("4.00000000", "431.00000000")],
        [("4.00000200", "12.00000000")])  # fmt: skip
    futures_body = b'{"lastUpdateId":1027024,"E":1589436922972,"T":1589436922959,' + levels
    snapshot = make("binance-futures").parse_depth_snapshot(tag, futures_body, RECEIVED_AT)
    assert (snapshot.event_time, snapshot.received_at) == (1589436922972, RECEIVED_AT)
    for body, reason in ((b'{"bids":[],"asks":[]}', "schema-mismatch"), (b"<html>", "invalid-json")):
        with pytest.raises(FrameError) as caught:
            make("binance").parse_depth_snapshot(tag, body, RECEIVED_AT)
        assert caught.value.reason == reason
    with pytest.raises(FrameError) as caught:
        make("binance").parse_rest(tag, spot_body, RECEIVED_AT)  # market records only: not a depth reader
    assert caught.value.reason == "unsupported-rest"


# -- Upbit and Bithumb ------------------------------------------------------------------------------

UPBIT_BOOK = {"type": "orderbook", "code": "KRW-BTC", "timestamp": 1730336862082, "total_ask_size": 4.74,
              "total_bid_size": 0.29, "level": 0, "stream_type": "REALTIME",
              "orderbook_units": [
                  {"ask_price": 100473000, "bid_price": 100465000, "ask_size": 0.43, "bid_size": 0.02},
                  {"ask_price": 100474000, "bid_price": 100464000, "ask_size": 1e-08, "bid_size": 0},
              ]}  # fmt: skip


def test_an_upbit_orderbook_is_the_bbo_and_the_whole_book() -> None:
    bbo, book = make("upbit").parse_frame(json.dumps(UPBIT_BOOK).encode(), RECEIVED_AT)
    assert isinstance(bbo, MarketRecord) and isinstance(bbo.data, Bbo)
    assert bbo.data.bid_price == "100465000" and bbo.data.update_id == "1730336862082"
    # Sizes keep every digit sent (1e-08 → 0.00000001); a side's empty unit (size 0) is no level.
    assert book == DepthBook("BTC/KRW", 1730336862082, RECEIVED_AT, 1730336862082, [("100465000", "0.02")],
                             [("100473000", "0.43"), ("100474000", "0.00000001")])  # fmt: skip


@pytest.mark.parametrize("exchange", ["upbit", "bithumb"])
def test_a_symbol_with_bbo_and_depth_gets_one_book_at_the_most_levels(exchange: str) -> None:
    adapter = make(exchange, levels=5)
    btc, eth = adapter.by_symbol["BTC/KRW"], adapter.by_symbol["ETH/KRW"]
    streams = [adapter.stream_name(btc, DataType.parse("bbo")), adapter.stream_name(btc, DEPTH),
               adapter.stream_name(eth, DataType.parse("bbo")), "trade:KRW-BTC"]  # fmt: skip
    request = json.loads(adapter.subscribe_message(streams, 1))
    assert {"type": "orderbook", "codes": ["KRW-BTC.5", "KRW-ETH.1"]} in request


@pytest.mark.parametrize(
    ("exchange", "params", "limit"),
    [("upbit", {"markets": "KRW-BTC", "count": "15"}, 15), ("bithumb", {"markets": "KRW-BTC"}, None)],
)
def test_rest_orderbook_requests(exchange: str, params: dict[str, str], limit: int | None) -> None:
    adapter = make(exchange)
    request = adapter.depth_snapshot_request(adapter.by_symbol["BTC/KRW"])
    assert (request.path, request.params, request.weight, request.limit) == (
        "/v1/orderbook",
        params,
        1,
        limit,
    )
    assert parse_source("rest:" + request.tag) == request.described


def test_rest_orderbook_snapshots() -> None:
    body = [{**UPBIT_BOOK, "market": "KRW-BTC"}]
    del body[0]["code"], body[0]["type"]
    adapter = make("bithumb")
    tag = RestTag("depth", "KRW-BTC", None, None)
    snapshot = adapter.parse_depth_snapshot(tag, json.dumps(body).encode(), RECEIVED_AT)
    asks = [("100473000", "0.43"), ("100474000", "0.00000001")]
    assert snapshot == DepthSnapshot("BTC/KRW", 1730336862082, RECEIVED_AT, 1730336862082, None,
                                     [("100465000", "0.02")], asks)  # fmt: skip
    for wrong, reason in (([{**body[0], "market": "KRW-ETH"}], "symbol-mismatch"), ([], "schema-mismatch"),
                          ([{**body[0], "orderbook_units": "x"}], "schema-mismatch")):  # fmt: skip
        with pytest.raises(FrameError) as caught:
            adapter.parse_depth_snapshot(tag, json.dumps(wrong).encode(), RECEIVED_AT)
        assert caught.value.reason == reason


def test_a_bithumb_book_id_is_its_microsecond_timestamp() -> None:
    frame = {**UPBIT_BOOK, "timestamp": "1783657882348968"}
    _, book = BithumbAdapter(KRW_MARKETS).parse_frame(json.dumps(frame).encode(), RECEIVED_AT)
    assert isinstance(book, DepthBook)
    assert (book.update_id, book.event_time) == (1783657882348968, 1783657882348)
