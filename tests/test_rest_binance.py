"""REST history through the Binance adapter, raw-source tags, and the pure backfill decisions."""

from __future__ import annotations

import msgspec
import pytest

from streams.exchanges.base import FrameError, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.records import Kline, Ticker, Trade
from streams.rest import (
    Gap,
    RestTag,
    backfill_complete,
    interval_ms,
    kline_backfill_start,
    parse_source,
    trade_gap,
)

BTC = Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT")
ETH = Instrument("ETH/USDT", "ETHUSDT", "ETH", "USDT")


@pytest.fixture
def adapter() -> BinanceAdapter:
    return BinanceAdapter([BTC, ETH])


def test_requests_name_the_endpoint_weight_and_a_tag_the_raw_record_carries(adapter: BinanceAdapter) -> None:
    history = adapter.trades_request(BTC, 101, 1000)
    assert (history.path, history.weight) == ("/api/v3/historicalTrades", 25)
    assert history.params == {"symbol": "BTCUSDT", "fromId": "101", "limit": "1000"}
    assert adapter.trades_request(BTC, None, 10).path == "/api/v3/trades"
    klines = adapter.klines_request(ETH, "1m", 1_700_000_000_000, 1000)
    assert klines.params["startTime"] == "1700000000000" and klines.weight == 2
    assert klines.tag == "klines/ETHUSDT/1m"
    assert parse_source("rest:" + klines.tag) == RestTag("klines", "ETHUSDT", "1m")
    assert parse_source("rest:" + history.tag) == RestTag("trades", "BTCUSDT", None)
    assert parse_source("rest:" + adapter.ticker_request(BTC).tag) == RestTag("ticker", "BTCUSDT", None)


@pytest.mark.parametrize(
    "source",
    [
        "ws",
        "rest:",
        "rest:trades",
        "rest:klines/BTCUSDT",
        "rest:depth",
        "rest:depth/BTCUSDT/x",
        "rest:trades/BTCUSDT/x",
    ],
)
def test_sources_that_name_no_known_request_are_not_rest_tags(source: str) -> None:
    assert parse_source(source) is None


def test_rest_trades_become_trade_records_with_the_streams_ids(adapter: BinanceAdapter) -> None:
    body = msgspec.json.encode(
        [
            {
                "id": 7,
                "price": "100.10",
                "qty": "0.5",
                "quoteQty": "50.05",
                "time": 1_700_000_000_123,
                "isBuyerMaker": True,
                "isBestMatch": True,
            },
            {
                "id": 8,
                "price": "100.20",
                "qty": "1.0",
                "quoteQty": "100.2",
                "time": 1_700_000_000_200,
                "isBuyerMaker": False,
                "isBestMatch": True,
            },
        ]
    )
    records = adapter.parse_rest(RestTag("trades", "BTCUSDT", None), body, 1_700_000_001_000)
    assert [r.data for r in records] == [
        Trade("100.10", "0.5", "sell", "7", 1_700_000_000_123),
        Trade("100.20", "1.0", "buy", "8", 1_700_000_000_200),
    ]
    assert all(
        r.symbol == "BTC/USDT" and r.type == "trade" and r.received_at == 1_700_000_001_000 for r in records
    )
    assert records[0].timestamp == 1_700_000_000_123


def test_rest_klines_are_closed_only_when_their_bar_ended_before_they_were_fetched(
    adapter: BinanceAdapter,
) -> None:
    row = [60_000, "1.0", "2.0", "0.5", "1.5", "10", 119_999, "15", 4, "5", "7.5", "0"]
    body = msgspec.json.encode([row, [120_000, *row[1:6], 179_999, *row[7:]]])
    records = adapter.parse_rest(RestTag("klines", "ETHUSDT", "1m"), body, 150_000)
    bars = [r.data for r in records]
    assert all(isinstance(b, Kline) for b in bars)
    assert [(b.start_time, b.closed) for b in bars] == [(60_000, True), (120_000, False)]  # type: ignore[union-attr]
    assert bars[0] == Kline("1m", 60_000, 119_999, "1.0", "2.0", "0.5", "1.5", "10", "15", 4, True)


def test_a_rest_ticker_becomes_a_ticker_record_and_must_answer_the_symbol_asked(
    adapter: BinanceAdapter,
) -> None:
    ticker = {
        "symbol": "BTCUSDT",
        "priceChange": "1.0",
        "priceChangePercent": "1.000",
        "lastPrice": "101.0",
        "openPrice": "100.0",
        "highPrice": "102.0",
        "lowPrice": "99.0",
        "volume": "5",
        "quoteVolume": "505",
        "bidPrice": "100.9",
        "bidQty": "1",
        "askPrice": "101.1",
        "askQty": "2",
        "closeTime": 1_700_000_000_000,
    }
    [record] = adapter.parse_rest(RestTag("ticker", "BTCUSDT", None), msgspec.json.encode(ticker), 1)
    assert (
        isinstance(record.data, Ticker)
        and record.data.last == "101.0"
        and record.timestamp == 1_700_000_000_000
    )
    with pytest.raises(FrameError) as mismatch:
        adapter.parse_rest(RestTag("ticker", "ETHUSDT", None), msgspec.json.encode(ticker), 1)
    assert mismatch.value.reason == "symbol-mismatch"


@pytest.mark.parametrize(
    ("tag", "body", "reason"),
    [
        (RestTag("trades", "BTCUSDT", None), b"<html>", "invalid-json"),
        (RestTag("trades", "BTCUSDT", None), b'{"code": -1003, "msg": "x"}', "schema-mismatch"),
        (RestTag("klines", "BTCUSDT", "1m"), b"[[1, 2]]", "schema-mismatch"),
        (RestTag("trades", "XYZUSDT", None), b"[]", "unknown-symbol"),
    ],
)
def test_unreadable_rest_bodies_are_frame_errors(
    adapter: BinanceAdapter, tag: RestTag, body: bytes, reason: str
) -> None:
    with pytest.raises(FrameError) as error:
        adapter.parse_rest(tag, body, 0)
    assert error.value.reason == reason


def test_the_trade_marker_reads_symbol_and_id_from_trade_frames_only(adapter: BinanceAdapter) -> None:
    trade = (
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":4242,"p":"1.0",'
        b'"q":"1.0","T":1,"m":false,"M":true}}'
    )
    assert adapter.trade_marker(trade) == ("BTC/USDT", 4242)
    ticker = b'{"stream":"btcusdt@ticker","data":{"e":"24hrTicker","s":"BTCUSDT"}}'
    assert adapter.trade_marker(ticker) is None
    assert adapter.trade_marker(b'{"result":null,"id":1}') is None
    assert adapter.trade_marker(b'{"stream":"btcusdt@trade","data":{"t":"x"}}') is None
    raw = b'{"e":"trade","E":1,"s":"ETHUSDT","t":9,"p":"1.0","q":"1.0","T":1,"m":true,"M":true}'
    assert adapter.trade_marker(raw) == ("ETH/USDT", 9)


def test_the_gap_runs_from_after_the_last_id_seen_to_before_the_first_live_id() -> None:
    assert trade_gap(100, 150) == Gap(101, 149)
    assert trade_gap(100, 150).size == 49  # type: ignore[union-attr]
    assert trade_gap(100, 101) is None  # contiguous
    assert trade_gap(100, 90) is None  # overlap: the deduper drops the repeats
    assert trade_gap(None, 150) is None  # nothing seen before: nothing to continue
    assert trade_gap(100, None) == Gap(101, -1)  # no live trade yet: fetch up to the newest


def test_backfill_ends_at_the_live_stream_or_when_the_exchange_has_nothing_newer() -> None:
    assert backfill_complete(next_id=150, first_live=150, page_size=1000, page_limit=1000)
    assert not backfill_complete(next_id=149, first_live=150, page_size=1000, page_limit=1000)
    assert backfill_complete(next_id=120, first_live=None, page_size=19, page_limit=1000)
    assert not backfill_complete(next_id=1101, first_live=None, page_size=1000, page_limit=1000)


def test_kline_backfill_starts_at_the_bar_open_when_the_connection_went_down() -> None:
    assert interval_ms("1s") == 1000 and interval_ms("15m") == 900_000 and interval_ms("1d") == 86_400_000
    assert kline_backfill_start(1_700_000_123_456, "1m") == 1_700_000_100_000
    assert kline_backfill_start(1_700_000_123_456, "1s") == 1_700_000_123_000
    assert kline_backfill_start(1_700_000_123_456, "1M") < 1_700_000_123_456 - 28 * 86_400_000
