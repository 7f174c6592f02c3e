"""Connection groups against the in-process simulator: live subscription changes, shutdown, silence,
rollover and takeover, with every raw record run through the real normalizer and its continuity
engine (history requests carried out by the source, as on a worker) so that "exactly once" is checked
on what would be published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import aiohttp
import pytest

from agents.adapters import fetch_instruments
from agents.normalize import Normalizer, RawInput
from agents.source import ExchangeSource
from agents.writer import TopicWriter
from simulator.server import Simulator, SimulatorConfig
from streams.config import ExchangeConfig
from streams.continuity import Seed, Settings
from streams.events import CollectorEvent, decode_event
from streams.exchanges.binance import BinanceAdapter
from streams.raw import decode_batch
from streams.records import Trade, decode_record
from streams.topics import EVENTS

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
WAIT = 15.0


async def until(condition: Callable[[], Any], what: str, within: float = WAIT) -> Any:
    deadline = time.monotonic() + within
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


class Harness:
    """One ExchangeSource and a normalizer wired as a worker wires them: raw records are normalized as
    they come, the engine's history requests go to the source, its stream news to the engine."""

    def __init__(
        self,
        sim: Simulator,
        adapter: BinanceAdapter,
        last_published: dict[str, int],
        engine: Settings | None = None,
        **connections: Any,
    ):
        self.sim = sim
        self.adapter = adapter
        self.raw: list[tuple[str, bytes]] = []
        self.events: list[CollectorEvent] = []
        self.published: list[tuple[str, bytes, bytes]] = []
        settings = ExchangeConfig(
            wsEndpoint=sim.ws_url,
            restEndpoint=sim.url,
            symbols=SYMBOLS,
            dataTypes=["trade"],
            connections={"max": 5, "streamsPerConnection": 1000, **connections},
        )

        async def get_adapter() -> BinanceAdapter:
            return adapter

        async def send_raw(key: str, value: bytes) -> None:
            self.raw.append((key, value))

        async def emit(event: CollectorEvent) -> None:
            self.events.append(event)

        async def produce(topic: str, key: bytes, value: bytes) -> Awaitable[None]:
            self.published.append((topic, key, value))
            if topic == EVENTS:
                self.events.append(decode_event(value))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        async def declare(topic: str) -> None:
            return None

        async def seeds(symbols: Collection[str]) -> dict[str, Seed]:
            return {s: Seed(last_id=i, last_time=0) for s, i in last_published.items() if s in symbols}

        def stream(group: str, symbols: list[str], down: bool) -> None:
            now = int(time.time() * 1000)
            (self.normalizer.stream_down if down else self.normalizer.stream_up)(group, symbols, now)

        def refused(symbol: str, request_id: str, retry_after_ms: int) -> None:
            self.normalizer.refused(symbol, request_id, retry_after_ms, int(time.time() * 1000))

        self.source = ExchangeSource("binance", settings, get_adapter, send_raw, emit, stream, refused)
        self.normalizer = Normalizer(
            adapter,
            TopicWriter(produce, declare),
            read_seeds=seeds,
            fetch=self.source.fetch_history,
            settings=engine,
        )
        self._normalized = 0
        self._running = asyncio.ensure_future(self._normalize_continuously())

    async def _normalize_continuously(self) -> None:
        while True:
            pending = [RawInput(value, key) for key, value in self.raw[self._normalized :]]
            self._normalized += len(pending)
            if pending:
                await self.normalizer.handle(pending)
            await self.normalizer.tick(int(time.time() * 1000))
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._running.cancel()
        await asyncio.wait([self._running])
        for group in list(self.source.groups()):
            await self.source.release_group(group)
        await self.source.rest.close()

    def sim_connections(self) -> dict[str, list[str]]:
        return self.sim.binance.stats()["subscriptions"]

    def events_of(self, kind: str) -> list[CollectorEvent]:
        return [e for e in self.events if e.type == kind]

    def published_ids(self) -> dict[str, list[int]]:
        """Trade ids published so far, per symbol."""
        ids: dict[str, list[int]] = {}
        for topic, _, value in self.published:
            if topic.startswith("market.trade."):
                record = decode_record(value)
                assert isinstance(record.data, Trade)
                ids.setdefault(record.symbol, []).append(int(record.data.trade_id))
        return ids

    def generated_ids(self, symbol: str, after: int) -> list[int]:
        history = self.sim.market.history(symbol)
        return [t.id for t in history.slice(history.begin, history.end) if t.id > after]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, trades_per_second=40, seed=5)) as simulator:
        yield simulator


@pytest.fixture
async def adapter(sim: Simulator) -> BinanceAdapter:
    async with aiohttp.ClientSession() as session:
        return BinanceAdapter(await fetch_instruments(BinanceAdapter, sim.url, session))


@pytest.mark.e2e
async def test_live_changes_subscribe_and_unsubscribe_without_reconnecting_anything(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    harness = Harness(sim, adapter, {}, streamsPerConnection=3)
    source = harness.source
    try:
        await source.assign_group("binance:0", ["btcusdt@trade", "btcusdt@ticker"])
        await source.assign_group("binance:1", ["ethusdt@trade"])
        await until(
            lambda: (
                sorted(map(sorted, harness.sim_connections().values()))
                == [["btcusdt@ticker", "btcusdt@trade"], ["ethusdt@trade"]]
            ),
            "two connections",
        )
        before = set(harness.sim_connections())

        await source.assign_group("binance:0", ["btcusdt@trade", "btcusdt@kline_1m", "btcusdt@bookTicker"])
        expected = {"btcusdt@trade", "btcusdt@kline_1m", "btcusdt@bookTicker"}
        await until(lambda: expected in map(set, harness.sim_connections().values()), "the changed group")
        assert set(harness.sim_connections()) == before  # same connections: nothing reconnected

        # Beyond streamsPerConnection the group gets a second connection; the first keeps its own.
        await source.assign_group("binance:0", [*expected, "btcusdt@ticker"])
        await until(lambda: len(harness.sim_connections()) == 3, "a second connection for the group")
        assert before <= set(harness.sim_connections())
        status = source.groups()
        assert status["binance:0"].streams == 4 and len(status["binance:0"].connections) == 2
        assert [c.state for c in status["binance:1"].connections] == ["connected"]

        await source.release_group("binance:0")
        await until(lambda: len(harness.sim_connections()) == 1, "the group's connections closed")
        assert "binance:0" not in source.groups()
        assert {key for key, _ in harness.raw} == {"binance:0", "binance:1"}  # raw records keyed by group
        assert sim.binance.stats()["violations"] == 0
        assert harness.events_of("unsubscribed") and harness.events_of("subscribed")
    finally:
        await harness.close()


@pytest.mark.e2e
async def test_a_link_answers_the_exchange_pings_and_outlives_its_pong_timeout() -> None:
    """Binance drops a connection that leaves its pings unanswered; the link never pings by itself."""
    config = SimulatorConfig(
        symbols=SYMBOLS, trades_per_second=5, seed=5, ping_interval=0.3, pong_timeout=0.8
    )
    async with Simulator(config) as simulator, aiohttp.ClientSession() as session:
        adapter = BinanceAdapter(await fetch_instruments(BinanceAdapter, simulator.url, session))
        harness = Harness(simulator, adapter, {})
        try:
            await harness.source.assign_group("binance:0", ["btcusdt@trade"])
            await until(lambda: harness.sim_connections(), "a connection")
            first = set(harness.sim_connections())
            # Eight pings: several pong timeouts long.
            await until(lambda: simulator.binance.stats()["framesSent"].get("ping", 0) >= 8, "eight pings")
            stats = simulator.binance.stats()
            assert stats["pongTimeouts"] == 0 and stats["violations"] == 0
            assert set(harness.sim_connections()) == first  # the same connection all along
        finally:
            await harness.close()


@pytest.mark.e2e
async def test_server_shutdown_reconnects_at_once_and_backfills_the_gap_exactly_once(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    harness = Harness(sim, adapter, {})
    source = harness.source
    try:
        await source.assign_group("binance:0", ["btcusdt@trade", "ethusdt@trade"])
        await until(lambda: harness.sim_connections(), "connected")
        await until(lambda: len(harness.published_ids()) == 2, "trades of both symbols")
        old = set(harness.sim_connections())
        sim.binance.send_server_shutdown()
        await until(
            lambda: (
                harness.sim_connections().keys() - old
                and all(len(v) == 2 for v in harness.sim_connections().values())
            ),
            "a new connection",
        )
        assert harness.events_of("server-shutdown")
        assert [e.detail["retryIn"] for e in harness.events_of("disconnected")] == [0.0]  # no backoff
        await check_exactly_once(harness)
    finally:
        await harness.close()


@pytest.mark.e2e
async def test_a_silent_connection_is_recycled_and_rest_fills_what_it_missed(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    harness = Harness(sim, adapter, {}, silenceTimeoutSeconds=0.5)
    source = harness.source
    try:
        await source.assign_group("binance:0", ["btcusdt@trade", "ethusdt@trade"])
        await until(lambda: len(harness.published_ids()) == 2, "trades of both symbols")
        old = set(harness.sim_connections())
        sim.binance.faults.stall(sim.binance.open_connections(), 30)
        await until(lambda: harness.events_of("stale"), "the stale connection")
        await until(lambda: harness.sim_connections().keys() - old, "a new connection")
        gaps = await until(lambda: harness.events_of("gap"), "the gap events")
        assert all(g.detail["outcome"] == "repaired" and g.detail["missing"] > 0 for g in gaps)
        await check_exactly_once(harness)
    finally:
        await harness.close()


@pytest.mark.e2e
async def test_rollover_is_make_before_break_and_loses_and_duplicates_nothing(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    harness = Harness(sim, adapter, {}, lifetimeSeconds=1.0)
    source = harness.source
    try:
        await source.assign_group("binance:0", ["btcusdt@trade", "ethusdt@trade"])
        await until(lambda: len(harness.events_of("rollover")) >= 2, "two rollovers")
        for rollover in harness.events_of("rollover"):
            # The new connection was subscribed before the old one closed.
            new_subscribed = [
                e for e in harness.events_of("subscribed") if e.connection_id == rollover.connection_id
            ]
            assert new_subscribed and new_subscribed[0].time <= rollover.time
        assert not harness.events_of("disconnected")
        await check_exactly_once(harness)
        assert harness.normalizer.duplicates > 0  # the overlap existed and was dropped
    finally:
        await harness.close()


@pytest.mark.e2e
async def test_a_group_taken_over_backfills_from_the_last_published_id_before_live_frames(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    await until(lambda: sim.market.trades_generated()["BTC/USDT"] > 40, "trade history")
    history = sim.market.history("BTC/USDT")
    last_published = history.at(history.begin + 20).id  # another worker published up to here
    harness = Harness(sim, adapter, {"BTC/USDT": last_published})
    source = harness.source
    try:
        await source.assign_group("binance:0", ["btcusdt@trade"])
        gaps = await until(lambda: harness.events_of("gap"), "the gap repaired from history")
        assert gaps[0].detail["firstMissingId"] == str(last_published + 1)
        assert any(decode_batch(v).source == "rest:trades/BTCUSDT" for _, v in harness.raw)
        ids = await check_exactly_once(harness, {"BTC/USDT": last_published})
        assert ids["BTC/USDT"][0] == last_published + 1
    finally:
        await harness.close()


@pytest.mark.e2e
async def test_a_quiet_symbol_taken_over_is_backfilled_without_waiting_for_its_next_trade(
    sim: Simulator, adapter: BinanceAdapter
) -> None:
    await until(lambda: sim.market.trades_generated()["BTC/USDT"] > 40, "trade history")
    sim.market.pause()  # quiet from now on: no live trade will show the gap
    history = sim.market.history("BTC/USDT")
    last_published = history.at(history.begin + 20).id  # the worker that died published up to here
    harness = Harness(sim, adapter, {"BTC/USDT": last_published}, engine=Settings(quiet_start_ms=1_000))
    try:
        await harness.source.assign_group("binance:0", ["btcusdt@trade"])
        gap = (await until(lambda: harness.events_of("gap"), "the quiet symbol's gap repaired"))[0]
        first_missing = str(last_published + 1)
        assert (gap.detail["reason"], gap.detail["firstMissingId"]) == ("quiet start", first_missing)
        published = harness.published_ids()["BTC/USDT"]
        assert published == harness.generated_ids("BTC/USDT", last_published)
    finally:
        sim.market.resume()
        await harness.close()


async def check_exactly_once(harness: Harness, after: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Every trade generated (after `after`, else from the first published) is published once, in order."""
    await until(lambda: all(harness.sim_connections().values()), "subscribed")
    newest = {
        s: harness.sim.market.history(s).first_id + harness.sim.market.history(s).end - 1 for s in SYMBOLS
    }
    published: dict[str, list[int]] = {}

    def caught_up() -> bool:
        nonlocal published
        published = harness.published_ids()
        return bool(published) and all(newest[s] <= ids[-1] for s, ids in published.items())

    await until(caught_up, "the published trades to catch up")
    for symbol, ids in published.items():
        start = (after or {}).get(symbol, ids[0] - 1)
        assert ids == sorted(set(ids)), f"{symbol}: duplicates or disorder"
        expected = [i for i in harness.generated_ids(symbol, start) if i <= ids[-1]]
        assert ids == expected, f"{symbol}: {len(set(expected) - set(ids))} trades missing"
    return published
