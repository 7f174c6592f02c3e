"""Bithumb's own rules in the simulator: 10 connects/s, then 429 with an empty body, then a block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from simulator.server import Simulator, SimulatorConfig
from simulator.upbit import BITHUMB, UPBIT


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=5,
                             venue_symbols={"binance-futures": ["BTC/USDT"], "upbit": ["BTC/KRW"],
                                            "bithumb": ["BTC/KRW"]})  # fmt: skip
    async with Simulator(config) as simulator:
        yield simulator


async def connect_statuses(simulator: Simulator, exchange: str, attempts: int) -> list[tuple[int, bytes]]:
    """Open `attempts` WebSocket handshakes at once; (status, body) of each (101 for an upgrade)."""
    async with aiohttp.ClientSession() as session:

        async def attempt() -> tuple[int, bytes]:
            try:
                ws = await session.ws_connect(f"{simulator.url}/{exchange}/websocket/v1")
            except aiohttp.WSServerHandshakeError as error:
                return error.status, b""
            await ws.close()
            return 101, b""

        return await asyncio.gather(*(attempt() for _ in range(attempts)))


@pytest.mark.e2e
async def test_connect_limits_differ_between_upbit_and_bithumb(sim: Simulator) -> None:
    assert (UPBIT.connects_per_second, BITHUMB.connects_per_second) == (5, 10)
    bithumb = [status for status, _ in await connect_statuses(sim, "bithumb", 14)]
    assert bithumb.count(101) == 10 and bithumb.count(429) == 4
    upbit = [status for status, _ in await connect_statuses(sim, "upbit", 8)]
    assert upbit.count(101) == 5 and upbit.count(429) == 3


@pytest.mark.e2e
async def test_bithumb_answers_429_with_an_empty_body_and_blocks_a_client_that_keeps_going(
    sim: Simulator,
) -> None:
    bithumb = sim.venues["bithumb"]
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.get(f"{sim.url}/bithumb/websocket/v1"):
                pass  # plain GETs count as connects too: the limit is checked before the upgrade
        statuses = []
        for _ in range(BITHUMB.block_after or 0):
            async with session.get(f"{sim.url}/bithumb/websocket/v1") as response:
                statuses.append((response.status, await response.read()))
        assert statuses == [(429, b"")] * (BITHUMB.block_after or 0)
        assert bithumb._blocked_until, "the client is blocked"
        blocked_for = max(bithumb._blocked_until.values()) - asyncio.get_running_loop().time()
        assert blocked_for > 500  # ten minutes, give or take this test's own time
        bithumb._connects.clear()  # a new second: the limit alone would let it in again
        async with session.get(f"{sim.url}/bithumb/websocket/v1") as response:
            assert (response.status, await response.read()) == (429, b"")


@pytest.mark.e2e
async def test_bithumb_rest_over_its_limit_gets_429_with_an_empty_body_and_no_header(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as session:
        # 150 a second is the real limit; three keep the test fast and the second-long window certain.
        async with session.post(f"{sim.url}/_sim/faults/limits?exchange=bithumb", json={"restPerSecond": 3}):
            pass

        async def one(path: str) -> tuple[int, dict[str, str], bytes]:
            async with session.get(sim.url + path) as response:
                return response.status, dict(response.headers), await response.read()

        answers = await asyncio.gather(*(one("/bithumb/v1/trades/ticks?market=KRW-BTC") for _ in range(4)))
        assert sorted(status for status, _, _ in answers) == [200, 200, 200, 429]
        assert all(
            "Remaining-Req" not in headers and "Retry-After" not in headers for _, headers, _ in answers
        )
        assert [body for status, _, body in answers if status == 429] == [b""]
        status, _, _ = await one("/bithumb/v1/market/all")  # the "other" category counts apart
        assert status == 200
    bithumb = sim.venues["bithumb"]
    assert bithumb.violations["restRate"] == 1 and bithumb.rest_rejected == 1
