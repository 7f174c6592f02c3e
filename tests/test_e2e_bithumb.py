"""End to end for Bithumb (gen-2, Upbit-compatible): string `sequential_id`s and µs orderbook times.

The same run as Upbit's (tests/test_e2e_upbit.py): every trade generated once every stream is
subscribed arrives exactly once with the simulator's values. Bithumb offers no candles on its
public WebSocket, so the data types are trade, ticker and bbo.

Bithumb's `sequential_id`s are unique but unordered (the simulator's too), so recovery works by trade
time: the backfill reads `trades/ticks` newest page first and pages back until it passes the last trade
seen, and the normalize agent drops the repeats by id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import msgspec
import pytest

from agents.backfill import RestWriter
from agents.embedded_broker import EmbeddedBroker
from agents.normalize import Normalizer
from agents.rest import RestClient
from agents.writer import TopicWriter
from simulator.server import Simulator as InProcessSimulator
from simulator.server import SimulatorConfig
from streams.continuity import FetchTrades, Seed
from streams.exchanges.bithumb import BithumbAdapter
from streams.records import Trade, decode_record
from tests.test_e2e_upbit import run_across_a_drop, run_upbit_compatible_exactly_once

pytestmark = pytest.mark.e2e


def test_bithumb_trades_arrive_exactly_once(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    result = run_upbit_compatible_exactly_once("bithumb", ["trade", "ticker", "bbo"], broker, tmp_path)
    record_property("summary", json.dumps({"trades": result.trades}))


def test_bithumb_loses_no_trade_across_a_drop(
    broker: EmbeddedBroker, tmp_path: Path, record_property
) -> None:
    """After a drop the worker reconnects and fills the trades made while it was away from
    `trades/ticks`, found by trade time although the ids are unordered: every trade arrives, none twice.
    """
    # Fast enough that the short reconnect misses trades; a page (500) still spans seconds.
    made, summary = run_across_a_drop("bithumb", broker, tmp_path, rate=100, trades_each_side=200)
    made_ids = [int(t["sequential_id"]) for t in made]
    assert made_ids != sorted(made_ids), "the simulator's Bithumb ids should not be ordered"
    record_property("summary", json.dumps(summary))
    print("BITHUMB DROP", json.dumps(summary))


class _Published:
    def __init__(self) -> None:
        self.trades: list[Trade] = []

    async def produce(self, topic: str, key: bytes, value: bytes) -> Awaitable[None]:
        if topic.startswith("market.trade."):
            data = decode_record(value).data
            assert isinstance(data, Trade)
            self.trades.append(data)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def declare(self, topic: str) -> None:
        return None


async def test_history_pages_back_over_a_gap_of_several_pages() -> None:
    """1200 trades missed (more than two pages) while the stream was down: the continuity engine pages
    `trades/ticks` back past the last trade published (the source's RestWriter carrying out its
    requests against the simulator), and publishes each missed trade once, in time order."""
    config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=2000, seed=11,
                             venue_symbols={"binance-futures": ["BTC/USDT"], "upbit": ["BTC/KRW"],
                                            "bithumb": ["BTC/KRW"]})  # fmt: skip
    async with InProcessSimulator(config) as sim, aiohttp.ClientSession() as session:
        # The Bithumb market starts generating once a client uses it.
        async with session.get(f"{sim.url}/bithumb{BithumbAdapter.instruments_path}") as response:
            adapter = BithumbAdapter(BithumbAdapter.parse_instruments(await response.read()))
        market = sim.venues["bithumb"].market
        deadline = asyncio.get_running_loop().time() + 10
        while market.trades_generated()["BTC/KRW"] < 1800:
            assert asyncio.get_running_loop().time() < deadline, "the simulator made too few trades"
            await asyncio.sleep(0.02)
        async with session.post(f"{sim.url}/_sim/pause"):
            pass
        async with session.get(f"{sim.url}/_sim/trades?exchange=bithumb&symbol=KRW-BTC") as response:
            rows = msgspec.json.decode(await response.read(), type=list[msgspec.Raw])
        assert len(rows) >= 1800
        btc = adapter.by_symbol["BTC/KRW"]
        seen = len(rows) - 1200
        truth = [msgspec.json.decode(row) for row in rows]
        last = truth[seen - 1]
        written: list[bytes] = []
        fetches: list[FetchTrades] = []

        async def send_raw(key: str, value: bytes) -> None:
            written.append(value)

        async def seeds(symbols: object) -> dict[str, Seed]:
            recent = tuple(str(row["sequential_id"]) for row in truth[seen - 500 : seen])
            position, price = last["timestamp"] * 10_000, str(last["trade_price"])
            seed = Seed(last_position=position, last_price=price, last_time=last["timestamp"],
                        recent_ids=recent)  # fmt: skip
            return {"BTC/KRW": seed}

        published = _Published()
        normalizer = Normalizer(
            adapter, TopicWriter(published.produce, published.declare), read_seeds=seeds, fetch=fetches.append
        )
        await normalizer.seed()
        rest = RestClient(adapter, f"{sim.url}/bithumb")
        try:
            writer = RestWriter(adapter, rest, "bithumb:0", "bithumb-0-rest", send_raw)
            normalizer.stream_down("bithumb:0", ["BTC/KRW"], truth[-1]["timestamp"])
            requests = 0
            while fetches:
                command = fetches.pop(0)
                requests += 1
                answer = await writer.fetch(adapter.history_request(btc, command.from_id, command.cursor),
                                            command.request_id)  # fmt: skip
                assert answer.body is not None
                await normalizer.handle(written)
                written.clear()
        finally:
            await rest.close()
        assert requests == 3  # 500 + 500 + the page reaching back
        assert [t.trade_id for t in published.trades] == [str(row["sequential_id"]) for row in truth[seen:]]
