"""Recorded Binance depth traffic, spot and USD-M: the adapters' diffs and REST snapshots line up.

The recordings (tests/fixtures/recorded, line format in its README) hold diff depth streams of four
symbols each and, fetched while the streams ran, a REST snapshot per symbol. Applied by Binance's
documented procedure (tests/binance_book_sync.py), every symbol's chain holds from its snapshot to
the end of the recording and its book never crosses; where a bookTicker names the book's exact update
id, its best bid and ask are the book's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from streams.book import OrderBook
from streams.depth import DepthDiff, DepthSnapshot
from streams.exchanges.base import ExchangeAdapter, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.exchanges.binance_futures import BinanceFuturesAdapter
from streams.records import Bbo, MarketRecord
from streams.rest import RestTag
from streams.validation import depth_problem
from tests.binance_book_sync import BinanceBookSync

RECORDED = Path(__file__).resolve().parent / "fixtures" / "recorded"
SPOT = {"NKNUSDT": ("NKN", "USDT"), "BLZETH": ("BLZ", "ETH"), "LRCBTC": ("LRC", "BTC"),
        "RUNEEUR": ("RUNE", "EUR")}  # fmt: skip
FUTURES = {s: (s[:-4], "USDT") for s in ("SUSHIUSDT", "AKROUSDT", "KEEPUSDT", "CTKUSDT")}


def millis(seconds: str) -> int:
    return int(Decimal(seconds) * 1000)


def adapter_for(kind: type[ExchangeAdapter], markets: dict[str, tuple[str, str]]) -> ExchangeAdapter:
    return kind([Instrument(f"{b}/{q}", s, b, q) for s, (b, q) in markets.items()])


def frames(name: str) -> list[tuple[int, bytes]]:
    lines = (RECORDED / name).read_text().splitlines()
    return [(millis(t), f.encode()) for t, _, f in (line.partition(": ") for line in lines[1:] if line)]


def snapshots(name: str, adapter: ExchangeAdapter) -> list[DepthSnapshot]:
    """Each REST response line (`URL -> time: body`) read the way the depth engine reads one."""
    parsed = []
    for line in filter(None, (RECORDED / name).read_text().splitlines()):
        url, _, rest = line.partition(" -> ")
        seconds, _, body = rest.partition(": ")
        query = parse_qs(urlparse(url).query)
        tag = RestTag("depth", query["symbol"][0], None, int(query["limit"][0]))
        parsed.append(adapter.parse_depth_snapshot(tag, body.encode(), millis(seconds)))
    return parsed


@dataclass
class Replay:
    books: dict[str, BinanceBookSync]
    bbo_checked: int = 0
    # bookTickers by symbol and update id: they arrive before the diff that contains their update
    tickers: dict[str, dict[int, Bbo]] = field(default_factory=dict)


def replay(ws: str, http: str, adapter: ExchangeAdapter, futures: bool) -> Replay:
    """Frames and snapshots in receive order, each symbol's book kept by Binance's procedure."""
    events: list[tuple[int, int, object]] = [(t, 1, frame) for t, frame in frames(ws)]
    events += [(s.received_at, 0, s) for s in snapshots(http, adapter)]
    events.sort(key=lambda event: (event[0], event[1]))
    result = Replay({})
    for _, _, event in events:
        if isinstance(event, DepthSnapshot):
            assert depth_problem(event) is None
            result.books.setdefault(event.symbol, _sync(futures)).on_snapshot(event)
            continue
        assert isinstance(event, bytes)
        for item in adapter.parse_frame(event, 0):
            if isinstance(item, DepthDiff):
                assert depth_problem(item) is None
                sync = result.books.setdefault(item.symbol, _sync(futures))
                if sync.on_diff(item):  # raises ChainBroken if the chain breaks
                    assert not sync.book.crossed(), f"{item.symbol} crossed at {item.last_update_id}"
                    ticker = result.tickers.get(item.symbol, {}).pop(item.last_update_id, None)
                    result.bbo_checked += ticker is not None and _same_top(sync, ticker)
            elif isinstance(item, MarketRecord) and isinstance(item.data, Bbo):
                result.tickers.setdefault(item.symbol, {})[int(item.data.update_id)] = item.data
    return result


def _sync(futures: bool) -> BinanceBookSync:
    return BinanceBookSync(5000, chained_by_previous_id=futures)


def _same_top(sync: BinanceBookSync, bbo: Bbo) -> bool:
    """The book at a bookTicker's update id shows the bookTicker's best bid and ask."""
    assert sync.book.best_bid() == (bbo.bid_price, bbo.bid_quantity)
    assert sync.book.best_ask() == (bbo.ask_price, bbo.ask_quantity)
    return True


@pytest.mark.parametrize(
    ("ws", "http", "adapter", "futures", "markets"),
    [
        ("BINANCE.ws.1.0", "BINANCE.http.0.0", BinanceAdapter, False, SPOT),
        ("BINANCE_FUTURES.ws.1.0", "BINANCE_FUTURES.http.0.0", BinanceFuturesAdapter, True, FUTURES),
    ],
    ids=["spot", "usd-m"],
)
def test_recorded_diffs_continue_the_recorded_snapshots(
    ws: str, http: str, adapter: type[ExchangeAdapter], futures: bool, markets: dict[str, tuple[str, str]]
) -> None:
    result = replay(ws, http, adapter_for(adapter, markets), futures)
    assert set(result.books) == {f"{b}/{q}" for b, q in markets.values()}
    for symbol, sync in result.books.items():
        assert sync.synced and sync.applied >= 1, symbol  # RUNE/EUR is quiet: one diff after its snapshot
        bids, asks = sync.book.depth
        assert bids > 100 and asks > 100  # the snapshots' 1000 levels, less what the diffs removed
    assert sum(sync.applied for sync in result.books.values()) > 150
    assert result.bbo_checked > 10


def test_recorded_snapshots_parse_to_their_bodies() -> None:
    adapter = adapter_for(BinanceAdapter, SPOT)
    for line, snapshot in zip(
        filter(None, (RECORDED / "BINANCE.http.0.0").read_text().splitlines()),
        snapshots("BINANCE.http.0.0", adapter),
        strict=True,
    ):
        body = json.loads(line.split(": ", 1)[1])
        assert snapshot.last_update_id == body["lastUpdateId"] and snapshot.limit == 1000
        assert snapshot.bids == [tuple(level) for level in body["bids"]]
        assert snapshot.asks == [tuple(level) for level in body["asks"]]
        assert snapshot.event_time == snapshot.received_at  # spot snapshots carry no time
    futures = snapshots("BINANCE_FUTURES.http.0.0", adapter_for(BinanceFuturesAdapter, FUTURES))
    first = json.loads((RECORDED / "BINANCE_FUTURES.http.0.0").read_text().splitlines()[0].split(": ", 1)[1])
    assert (futures[0].symbol, futures[0].event_time, futures[0].last_update_id) == (
        "SUSHI/USDT",
        first["E"],
        first["lastUpdateId"],
    )


def test_a_small_book_keeps_exact_levels_through_the_recording() -> None:
    """A 20-level book fed the same stream holds exactly the 20 best levels of the full book,
    as long as it still knows that many (it never shows a level it does not know)."""
    adapter = adapter_for(BinanceAdapter, SPOT)
    full = replay("BINANCE.ws.1.0", "BINANCE.http.0.0", adapter, False).books["NKN/USDT"].book
    small = OrderBook(20)
    snapshot = next(s for s in snapshots("BINANCE.http.0.0", adapter) if s.symbol == "NKN/USDT")
    small.replace(snapshot.bids, snapshot.asks, snapshot.last_update_id, snapshot.limit)
    for _, frame in frames("BINANCE.ws.1.0"):
        for item in adapter.parse_frame(frame, 0):
            if not isinstance(item, DepthDiff) or item.symbol != "NKN/USDT":
                continue
            if item.last_update_id > snapshot.last_update_id:
                small.apply(item.bids, item.asks, item.last_update_id)
    assert small.update_id == full.update_id
    held_bids, held_asks = small.depth
    view, truth = small.top(20), full.top(20)
    assert list(view.bids.values()) == list(truth.bids.values())[:held_bids]
    assert list(view.asks.values()) == list(truth.asks.values())[:held_asks]
    assert held_bids >= 10 and held_asks >= 10
