"""The simulator's order books over real sockets: diff streams, snapshots and whole books per dialect
agree with its ground truth (`/_sim/book`), and each depth fault breaks what Binance's procedure checks.

Books are rebuilt with the adapters' parsers and the documented procedure (tests/binance_book_sync.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from simulator.server import Simulator, SimulatorConfig
from streams.depth import DepthBook, DepthDiff
from streams.exchanges.base import DataType, ExchangeAdapter, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.exchanges.binance_futures import BinanceFuturesAdapter
from streams.exchanges.bithumb import BithumbAdapter
from streams.exchanges.upbit import UpbitAdapter
from streams.records import Bbo, MarketRecord
from tests.binance_book_sync import BinanceBookSync, ChainBroken, StaleSnapshot

pytestmark = pytest.mark.e2e

WAIT = 5.0
SPOT = [Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT"), Instrument("ETH/USDT", "ETHUSDT", "ETH", "USDT")]
KRW = [Instrument("BTC/KRW", "KRW-BTC", "BTC", "KRW"), Instrument("ETH/KRW", "KRW-ETH", "ETH", "KRW")]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(symbols=["BTC/USDT", "ETH/USDT"], trades_per_second=60, seed=3)
    async with Simulator(config) as simulator:
        yield simulator


async def http(sim: Simulator, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, sim.url + path, json=body) as reply,
    ):
        return reply.status, await reply.read()


async def get_json(sim: Simulator, path: str) -> Any:
    status, body = await http(sim, "GET", path)
    assert status == 200, body
    return json.loads(body)


class Client:
    """One Binance-style depth subscriber keeping books by the documented procedure."""

    def __init__(self, ws: ClientConnection, adapter: ExchangeAdapter, futures: bool) -> None:
        self.ws, self.adapter, self.futures = ws, adapter, futures
        self.books: dict[str, BinanceBookSync] = {}
        self.tickers: dict[tuple[str, int], Bbo] = {}  # bookTickers by symbol and update id
        self.tops_checked = 0

    def sync(self, symbol: str) -> BinanceBookSync:
        if symbol not in self.books:
            self.books[symbol] = BinanceBookSync(5000, chained_by_previous_id=self.futures)
        return self.books[symbol]

    async def pump(self, seconds: float) -> None:
        """Read frames for `seconds`: diffs go to their books (ChainBroken propagates)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                frame = await asyncio.wait_for(self.ws.recv(decode=False), left)
            except TimeoutError:
                return
            self.read(frame)

    def read(self, frame: bytes) -> None:
        for item in self.adapter.parse_frame(frame, 1):
            if isinstance(item, DepthDiff):
                sync = self.sync(item.symbol)
                if sync.on_diff(item):
                    assert not sync.book.crossed()
                    ticker = self.tickers.pop((item.symbol, item.last_update_id), None)
                    if ticker is not None:
                        self.check_top(sync, ticker)
            elif isinstance(item, MarketRecord) and isinstance(item.data, Bbo):
                sync = self.books.get(item.symbol)
                if sync is not None and sync.synced and sync.book.update_id == int(item.data.update_id):
                    self.check_top(sync, item.data)
                else:  # the diff with its update id may come later
                    self.tickers[(item.symbol, int(item.data.update_id))] = item.data

    def check_top(self, sync: BinanceBookSync, ticker: Bbo) -> None:
        """A bookTicker and the book at the same update id show the same best bid and ask."""
        assert sync.book.best_bid() == (ticker.bid_price, ticker.bid_quantity)
        assert sync.book.best_ask() == (ticker.ask_price, ticker.ask_quantity)
        self.tops_checked += 1

    async def snapshot(self, sim: Simulator, symbol: Instrument) -> None:
        """The REST snapshot the adapter asks for, applied by the procedure (StaleSnapshot propagates)."""
        request = self.adapter.depth_snapshot_request(symbol)
        query = "&".join(f"{key}={value}" for key, value in request.params.items())
        status, body = await http(sim, "GET", f"{request.path}?{query}")
        assert status == 200, body
        self.sync(symbol.symbol).on_snapshot(self.adapter.parse_depth_snapshot(request.described, body, 1))


@contextlib.asynccontextmanager
async def binance_client(
    sim: Simulator, futures: bool, symbols: list[Instrument], levels: int
) -> AsyncIterator[Client]:
    """A connection subscribed to the symbols' diff depth and bookTicker streams."""
    adapter_type = BinanceFuturesAdapter if futures else BinanceAdapter
    adapter = adapter_type(SPOT, adapter_type.depth_settings(levels=levels))
    route = adapter.route(DataType.parse("depth"))
    async with connect(sim.ws_url + route, proxy=None, open_timeout=WAIT) as ws:
        streams = [adapter.stream_name(s, DataType.parse(kind)) for s in symbols for kind in ("depth", "bbo")]
        await ws.send(adapter.subscribe_message(streams, 1).decode())
        yield Client(ws, adapter, futures)


async def compare_with_truth(sim: Simulator, sync: BinanceBookSync, exchange: str, symbol: str) -> None:
    """The rebuilt book holds exactly the ground truth's best levels at its update id."""
    truth = await get_json(
        sim, f"/_sim/book?exchange={exchange}&symbol={symbol}&updateId={sync.book.update_id}&levels=1000"
    )
    view = sync.book.top(1000)
    held_bids, held_asks = sync.book.depth
    assert [list(level) for level in view.bids.values()] == truth["bids"][:held_bids]
    assert [list(level) for level in view.asks.values()] == truth["asks"][:held_asks]
    if all(sync.book.complete):
        assert (held_bids, held_asks) == (len(truth["bids"]), len(truth["asks"]))


@pytest.mark.parametrize(("futures", "levels"), [(False, 5000), (True, 1000)], ids=["spot", "usd-m"])
async def test_diffs_on_a_snapshot_rebuild_the_ground_truth_book(
    sim: Simulator, futures: bool, levels: int
) -> None:
    exchange = "binance-futures" if futures else "binance"
    async with binance_client(sim, futures, SPOT, levels) as client:
        await client.pump(0.5)  # buffer diffs first, as the procedure says
        for symbol in SPOT:
            await client.snapshot(sim, symbol)
        await client.pump(1.5)
        for symbol in SPOT:
            sync = client.books[symbol.symbol]
            assert sync.synced and sync.applied >= 5
            await compare_with_truth(sim, sync, exchange, symbol.exchange_symbol)
        # spot's 5000-level snapshot is the whole 1000-level book; USD-M's 1000 may be cut short
        assert all(client.books["BTC/USDT"].book.complete) is (not futures)
        assert client.tops_checked > 0  # bookTickers at a diff's update id show the book's top


async def test_a_skipped_diff_breaks_one_symbols_chain_only(sim: Simulator) -> None:
    async with binance_client(sim, False, SPOT, 20) as client:
        await client.pump(0.3)
        for symbol in SPOT:
            await client.snapshot(sim, symbol)
        await client.pump(0.5)
        status, _ = await http(sim, "POST", "/_sim/faults/depth-skip", {"symbol": "BTCUSDT", "count": 1})
        assert status == 200
        with pytest.raises(ChainBroken, match="U"):
            await client.pump(3.0)
        eth = client.books["ETH/USDT"]
        applied = eth.applied
        # BTC's book is broken; ETH's chain goes on from where it was.
        client.books.pop("BTC/USDT")
        await client.pump(1.0)
        assert eth.applied > applied
        await compare_with_truth(sim, eth, "binance", "ETHUSDT")


@pytest.mark.parametrize("fault", ["stall", "drop"])
async def test_after_a_stall_or_a_drop_the_chain_is_broken_and_a_resync_is_exact(
    sim: Simulator, fault: str
) -> None:
    symbol = SPOT[0]
    with contextlib.suppress(ConnectionClosed):  # the drop closes the socket under the client
        async with binance_client(sim, False, [symbol], 5000) as client:
            await client.pump(0.3)
            await client.snapshot(sim, symbol)
            await client.pump(0.5)
            if fault == "stall":
                status, _ = await http(sim, "POST", "/_sim/faults/stall", {"seconds": 1})
                assert status == 200
                with pytest.raises(ChainBroken):
                    await client.pump(4.0)
            else:
                status, _ = await http(sim, "POST", "/_sim/faults/drop")
                assert status == 200
                with pytest.raises(ConnectionClosed):
                    await client.pump(4.0)
    # Resync on a new connection: buffer, snapshot, apply; the book is the ground truth again.
    async with binance_client(sim, False, [symbol], 5000) as client:
        await client.pump(0.3)
        await client.snapshot(sim, symbol)
        await client.pump(1.0)
        await compare_with_truth(sim, client.books["BTC/USDT"], "binance", "BTCUSDT")


async def test_a_stale_snapshot_is_older_than_the_buffered_diffs(sim: Simulator) -> None:
    symbol = SPOT[0]
    await get_json(sim, "/_sim/book?symbol=BTCUSDT")  # the book exists from now: it has a past
    await asyncio.sleep(1.5)
    async with binance_client(sim, False, [symbol], 20) as client:
        await client.pump(0.3)
        status, _ = await http(sim, "POST", "/_sim/faults/stale-snapshot", {"count": 1, "seconds": 1})
        assert status == 200
        with pytest.raises(StaleSnapshot):
            await client.snapshot(sim, symbol)
        await client.snapshot(sim, symbol)  # the next one is current
        await client.pump(1.0)
        await compare_with_truth(sim, client.books["BTC/USDT"], "binance", "BTCUSDT")


@pytest.mark.parametrize(
    ("exchange", "adapter_type", "levels"), [("upbit", UpbitAdapter, 15), ("bithumb", BithumbAdapter, 3)]
)
async def test_whole_books_are_the_ground_truth_at_their_timestamp(
    sim: Simulator, exchange: str, adapter_type: type[UpbitAdapter], levels: int
) -> None:
    adapter = adapter_type(KRW, adapter_type.depth_settings(levels=levels))
    btc = adapter.by_symbol["BTC/KRW"]
    streams = [
        adapter.stream_name(btc, DataType.parse("depth")),
        adapter.stream_name(btc, DataType.parse("bbo")),
    ]
    books: list[DepthBook] = []
    async with connect(f"{sim.ws_url}/{exchange}/websocket/v1", proxy=None, open_timeout=WAIT) as ws:
        await ws.send(adapter.subscribe_message(streams, 1).decode())
        while len(books) < 6:
            frame = await asyncio.wait_for(ws.recv(decode=False), WAIT)
            items = adapter.parse_frame(frame, 1)
            books += [item for item in items if isinstance(item, DepthBook)]
            bbo = [item for item in items if isinstance(item, MarketRecord)]
            if bbo:  # the bbo is the book's top, at the same id
                assert isinstance(bbo[0].data, Bbo) and bbo[0].data.update_id == str(books[-1].update_id)
    for book in books:
        # The `.N` count is honoured (one book for bbo and depth: the larger count).
        assert len(book.bids) == len(book.asks) == levels
        truth = await get_json(sim, f"/_sim/book?exchange={exchange}&symbol=KRW-BTC&updateId={book.update_id}"
                                    f"&levels={levels}")  # fmt: skip
        assert book.bids == [tuple(level) for level in truth["bids"]]
        assert book.asks == [tuple(level) for level in truth["asks"]]
    request = adapter.depth_snapshot_request(btc)
    query = "&".join(f"{k}={v}" for k, v in request.params.items())
    status, body = await http(sim, "GET", f"/{exchange}{request.path}?{query}")
    assert status == 200
    snapshot = adapter.parse_depth_snapshot(request.described, body, 1)
    at = f"updateId={snapshot.last_update_id}&levels={len(snapshot.bids)}"
    truth = await get_json(sim, f"/_sim/book?exchange={exchange}&symbol=KRW-BTC&{at}")
    assert snapshot.bids == [tuple(level) for level in truth["bids"]] and snapshot.bids


async def test_many_ids_are_looked_up_in_steps_each_as_it_is_alone(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/_sim/books` answers in steps, letting the streams go on between them: the answers keep the
    ids' order across steps, each as `/_sim/book` gives it alone."""
    monkeypatch.setattr("simulator.book.TRUTHS_PER_STEP", 10)
    ids: list[str] = []
    deadline = asyncio.get_running_loop().time() + 10
    while len(ids) < 35:
        assert asyncio.get_running_loop().time() < deadline, f"only {len(ids)} update ids in 10 s"
        now = await get_json(sim, "/_sim/book?symbol=BTCUSDT&levels=5")
        if now["updateId"] not in ids:
            ids.append(now["updateId"])
        await asyncio.sleep(0.01)
    wanted = [*ids[:20], "1", *ids[20:]]  # "1" was never a state of the book
    query = {"symbol": "BTCUSDT", "updateIds": wanted, "levels": 5}
    status, body = await http(sim, "POST", "/_sim/books", query)
    assert status == 200
    books = json.loads(body)["books"]
    assert len(books) == len(wanted) and books[20] is None
    for update_id, book in zip(wanted, books, strict=True):
        if update_id != "1":
            assert book == await get_json(sim, f"/_sim/book?symbol=BTCUSDT&updateId={update_id}&levels=5")
    for symbol, update_ids, expected in [("NOPE", ids, 400), ("NOPE", [], 400), ("BTCUSDT", [], 200)]:
        status, body = await http(sim, "POST", "/_sim/books", {"symbol": symbol, "updateIds": update_ids})
        assert status == expected
    assert json.loads(body) == {"books": []}


async def test_the_ground_truth_endpoint_refuses_what_it_does_not_know(sim: Simulator) -> None:
    assert (await http(sim, "GET", "/_sim/book?symbol=NOPE"))[0] == 400
    assert (await http(sim, "GET", "/_sim/book?symbol=BTCUSDT&updateId=1"))[0] == 404
    assert (await http(sim, "GET", "/_sim/book?exchange=nope&symbol=BTCUSDT"))[0] == 404
    assert (await http(sim, "POST", "/_sim/faults/depth-skip", {"symbol": "NOPE"}))[0] == 400
    now = await get_json(sim, "/_sim/book?symbol=BTC/USDT&levels=3")
    assert len(now["bids"]) == len(now["asks"]) == 3
    assert Decimal(now["bids"][0][0]) < Decimal(now["asks"][0][0])
