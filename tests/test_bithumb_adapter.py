"""BithumbAdapter: Upbit's parsing with Bithumb's types, from the documented gen-2 payloads (§4.1).

The shared recording of Bithumb is from its legacy `pubwss` API, which this adapter does not speak;
the frames below are the live samples quoted in exchange-protocols.md §4.1.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.depth import DepthBook
from streams.exchanges import adapter_class
from streams.exchanges.base import DataType, FrameError, Instrument
from streams.exchanges.bithumb import BithumbAdapter
from streams.exchanges.upbit import UpbitAdapter
from streams.records import MarketRecord, Trade, decode_record, encode_record
from streams.rest import RestTag

RECEIVED_AT = 1_783_658_381_500
DOC_TRADE = (
    b'{"type":"trade","code":"KRW-BTC","trade_price":95539000,"trade_volume":0.00022664,"ask_bid":"ASK",'
    b'"prev_closing_price":94201000,"change":"RISE","change_price":1338000,"trade_date":"2026-07-10",'
    b'"trade_time":"13:39:41","trade_timestamp":1783658381138,"sequential_id":"862683813820523888",'
    b'"timestamp":1783658381398,"stream_type":"REALTIME"}'
)
DOC_ORDERBOOK = (
    b'{"type":"orderbook","code":"KRW-BTC","total_ask_size":4.7398,"total_bid_size":0.2889,'
    b'"orderbook_units":[{"ask_price":95340000,"bid_price":95339000,"ask_size":0.0007,"bid_size":0.0024}],'
    b'"level":1,"timestamp":"1783657882348968","stream_type":"SNAPSHOT"}'
)
DOC_TICKER = (
    b'{"type":"ticker","code":"KRW-BTC","opening_price":94223000,"high_price":95465000,"low_price":93601000,'
    b'"trade_price":95299000,"prev_closing_price":94201000,"change":"RISE","change_price":1098000,'
    b'"signed_change_price":1098000,"change_rate":0.01165593,"signed_change_rate":0.01165593,'
    b'"trade_volume":0.0094,"acc_trade_volume":151.44914647,"acc_trade_volume_24h":310.44065227,'
    b'"acc_trade_price":14330306973.41015,"acc_trade_price_24h":29226371799.56915,"trade_date":"20260710",'
    b'"trade_time":"124548","trade_timestamp":1783655148303,"ask_bid":"BID","acc_ask_volume":52.30413928,'
    b'"acc_bid_volume":99.14500719,"highest_52_week_price":179734000,"highest_52_week_date":"2025-10-09",'
    b'"lowest_52_week_price":81110000,"lowest_52_week_date":"2026-02-06","market_state":"ACTIVE",'
    b'"is_trading_suspended":false,"delisting_date":"","market_warning":"NONE","timestamp":1783655148485,'
    b'"stream_type":"REALTIME"}'
)


@pytest.fixture
def adapter() -> BithumbAdapter:
    return BithumbAdapter([Instrument("BTC/KRW", "KRW-BTC", "BTC", "KRW")])


def contract(items: list[Any]) -> dict[str, Any]:
    [record] = items
    assert isinstance(record, MarketRecord) and decode_record(encode_record(record)) == record
    return json.loads(encode_record(record))


def test_trade_with_a_string_sequential_id(adapter: BithumbAdapter) -> None:
    assert contract(adapter.parse_frame(DOC_TRADE, RECEIVED_AT)) == {
        "exchange": "bithumb", "symbol": "BTC/KRW", "type": "trade", "timestamp": 1783658381398,
        "receivedAt": RECEIVED_AT,
        "data": {"price": "95539000", "quantity": "0.00022664", "side": "sell",
                 "tradeId": "862683813820523888", "tradeTime": 1783658381138},
    }  # fmt: skip


def test_orderbook_microsecond_string_timestamp(adapter: BithumbAdapter) -> None:
    bbo, book = adapter.parse_frame(DOC_ORDERBOOK, RECEIVED_AT)
    record = contract([bbo])
    assert record["timestamp"] == 1783657882348  # µs string → ms
    assert record["data"] == {"bidPrice": "95339000", "bidQuantity": "0.0024", "askPrice": "95340000",
                              "askQuantity": "0.0007", "updateId": "1783657882348968"}  # fmt: skip
    # The same message is the whole book; its id is the µs timestamp.
    assert book == DepthBook("BTC/KRW", 1783657882348, RECEIVED_AT, 1783657882348968,
                             [("95339000", "0.0024")], [("95340000", "0.0007")])  # fmt: skip


def test_ticker(adapter: BithumbAdapter) -> None:
    assert contract(adapter.parse_frame(DOC_TICKER, RECEIVED_AT))["data"] == {
        "last": "95299000", "open": "94223000", "high": "95465000", "low": "93601000",
        "volume": "151.44914647", "quoteVolume": "14330306973.41015", "change": "1098000",
        "changePercent": "1.165593"}  # fmt: skip


def test_rest_ticks_with_string_ids(adapter: BithumbAdapter) -> None:
    body = (b'[{"market":"KRW-BTC","trade_date_utc":"2026-07-10","trade_time_utc":"04:39:41",'
            b'"timestamp":1783658381138,"trade_price":95539000,"trade_volume":0.00022664,'
            b'"prev_closing_price":94201000,"change_price":1338000,"ask_bid":"BID",'
            b'"sequential_id":"862683813820523888"}]')  # fmt: skip
    [record] = adapter.parse_rest(RestTag("trades", "KRW-BTC", None), body, RECEIVED_AT)
    assert record.data.trade_id == "862683813820523888" and record.data.side == "buy"  # type: ignore[union-attr]


def test_a_trade_stands_at_its_trade_time_not_its_unordered_id(adapter: BithumbAdapter) -> None:
    assert adapter.trade_marker(DOC_TRADE) == ("BTC/KRW", 1783658381138 * 10_000)
    [record] = adapter.parse_frame(DOC_TRADE, RECEIVED_AT)
    assert isinstance(record, MarketRecord) and isinstance(record.data, Trade)
    assert adapter.trade_position(record.data) == 1783658381138 * 10_000
    assert adapter.trade_marker(DOC_TRADE.replace(b'"862683813820523888"', b'"86x"')) is None
    assert adapter.trade_marker(DOC_ORDERBOOK) is None


def test_rest_history_pages_back_from_the_newest_trades(adapter: BithumbAdapter) -> None:
    btc = adapter.by_symbol["BTC/KRW"]
    assert BithumbAdapter.rest_history
    assert adapter.history_request(btc, None, None).params == {"market": "KRW-BTC", "count": "500"}
    assert adapter.history_request(btc, None, "862683813820523888").params["cursor"] == "862683813820523888"
    newest = adapter.trades_request(btc, 1783658381138 * 10_000, 1000)
    assert (newest.path, newest.params) == ("/v1/trades/ticks", {"market": "KRW-BTC", "count": "500"})
    older = adapter.older_trades_request(btc, "862683813820523888", 1000)
    assert older.params == {"market": "KRW-BTC", "count": "500", "cursor": "862683813820523888"}


def test_what_bithumb_offers(adapter: BithumbAdapter) -> None:
    assert adapter_class("bithumb") is BithumbAdapter and issubclass(BithumbAdapter, UpbitAdapter)
    assert BithumbAdapter.data_kinds == {"trade", "ticker", "bbo", "depth"}
    assert not BithumbAdapter.supports(DataType.parse("kline_1m"))  # no candles on the public WebSocket
    assert (
        BithumbAdapter.limits.max_connection_attempts,
        BithumbAdapter.limits.connection_attempt_window_seconds,
    ) == (10, 1)
    assert BithumbAdapter.instruments_path.startswith("/v1/market/all")
    assert not BithumbAdapter.acknowledges_subscriptions and BithumbAdapter.replaces_subscriptions
    assert BithumbAdapter.keepalive == (60.0, b"PING")
    assert adapter.stream_name(adapter.by_symbol["BTC/KRW"], DataType("bbo")) == "orderbook:KRW-BTC.1"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (DOC_TRADE.replace(b'"862683813820523888"', b'"8626x"'), "schema-mismatch"),
        (DOC_ORDERBOOK.replace(b'"1783657882348968"', b'"17836578823489.5"'), "schema-mismatch"),
        (DOC_TRADE.replace(b'"KRW-BTC"', b'"KRW-ETH"'), "unknown-symbol"),
        (b'{"type":"transaction","content":{"list":[]}}', "unknown-event"),  # the legacy API's shape
    ],
)
def test_malformed(adapter: BithumbAdapter, payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as caught:
        adapter.parse_frame(payload, RECEIVED_AT)
    assert caught.value.reason == reason
