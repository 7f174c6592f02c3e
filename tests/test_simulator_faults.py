"""Simulator faults and limit enforcement, driven over the /_sim/faults endpoints like the e2e tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulator.server import Simulator, SimulatorConfig

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
WAIT = 5.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, trades_per_second=100, seed=3)) as simulator:
        yield simulator


async def post(sim: Simulator, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(sim.url + path, json=body or {}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def get(sim: Simulator, path: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session, session.get(sim.url + path) as response:
        return response.status, dict(response.headers), await response.json()


async def subscribed(sim: Simulator, stream: str = "btcusdt@trade") -> ClientConnection:
    ws = await connect(sim.ws_url + "/stream", ping_interval=None)
    await ws.send(json.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1}))
    while json.loads(await asyncio.wait_for(ws.recv(), WAIT)).get("id") != 1:
        pass
    return ws


async def test_drop_cuts_every_connection_without_a_close_frame(sim: Simulator) -> None:
    ws = await subscribed(sim)
    answer = await post(sim, "/_sim/faults/drop")
    assert answer["dropped"] == 1 and answer["counts"]["drops"] == 1
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    assert closed.value.rcvd is None  # no close frame: the TCP connection just went away


async def test_a_stalled_connection_stays_open_but_silent_while_new_ones_get_data(sim: Simulator) -> None:
    stalled = await subscribed(sim)
    await asyncio.wait_for(stalled.recv(), WAIT)  # trades flow before the stall
    assert (await post(sim, "/_sim/faults/stall", {"seconds": 1.5}))["stalled"] == 1
    # Drain what was already on the wire, then nothing more arrives while the stall lasts.
    with pytest.raises(TimeoutError):
        while True:
            await asyncio.wait_for(stalled.recv(), 0.5)
    fresh = await subscribed(sim)
    assert json.loads(await asyncio.wait_for(fresh.recv(), WAIT))["stream"] == "btcusdt@trade"
    await fresh.close()
    assert stalled.state.name == "OPEN"
    assert json.loads(await asyncio.wait_for(stalled.recv(), WAIT))["stream"] == "btcusdt@trade"  # ends
    await stalled.close()


async def test_refused_handshakes_fail_with_503_until_the_window_ends(sim: Simulator) -> None:
    await post(sim, "/_sim/faults/refuse", {"seconds": 0.5})
    with pytest.raises(InvalidStatus) as refused:
        await connect(sim.ws_url + "/stream")
    assert refused.value.response.status_code == 503
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:  # handshakes succeed again once the window has passed
        try:
            ws = await subscribed(sim)
            break
        except InvalidStatus:
            assert asyncio.get_running_loop().time() < deadline, "still refused after the window"
            await asyncio.sleep(0.05)
    await ws.close()
    status = await get(sim, "/_sim/faults")
    assert status[2]["counts"]["refusedHandshakes"] >= 1 and not status[2]["refusing"]


async def test_shutdown_announces_server_shutdown_then_closes_after_the_grace(sim: Simulator) -> None:
    ws = await subscribed(sim)
    await post(sim, "/_sim/faults/shutdown", {"grace": 0.3})
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
    assert any(f.get("stream") == "!serverShutdown" and f["data"]["e"] == "serverShutdown" for f in frames)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    ws2 = await subscribed(sim)  # the simulator itself keeps serving
    await ws2.close()


async def test_rest_faults_answer_with_retry_after_and_count_clients_that_ignore_it(sim: Simulator) -> None:
    await post(sim, "/_sim/faults/rest", {"status": 429, "seconds": 5, "retryAfter": 2})
    status, headers, body = await get(sim, "/api/v3/trades?symbol=BTCUSDT&limit=1")
    assert (status, headers["Retry-After"], body["code"]) == (429, "2", -1003)
    status, headers, _ = await get(sim, "/api/v3/trades?symbol=BTCUSDT&limit=1")  # ignoring Retry-After
    assert status == 418 and int(headers["Retry-After"]) >= 1
    faults = (await get(sim, "/_sim/faults"))[2]
    assert faults["violations"]["restDuringRetryAfter"] == 1
    stats = (await get(sim, "/_sim/stats"))[2]
    assert stats["violations"] == 1  # counted with the WebSocket limits
    await post(sim, "/_sim/faults/clear")
    assert (await get(sim, "/api/v3/trades?symbol=BTCUSDT&limit=1"))[0] == 200


async def test_handshakes_beyond_the_per_ip_attempt_limit_are_refused_and_counted(sim: Simulator) -> None:
    await post(sim, "/_sim/faults/limits", {"connectAttempts": 2, "window": 60})
    first, second = await connect(sim.ws_url + "/stream"), await connect(sim.ws_url + "/stream")
    with pytest.raises(InvalidStatus) as refused:
        await connect(sim.ws_url + "/stream")
    assert refused.value.response.status_code == 429
    faults = (await get(sim, "/_sim/faults"))[2]
    assert faults["violations"]["connectionAttempts"] == 1
    await first.close()
    await second.close()


@pytest.mark.parametrize("body", [{"seconds": -1}, {"seconds": "x"}, {"status": 500}])
async def test_fault_parameters_are_checked(sim: Simulator, body: dict[str, Any]) -> None:
    path = "/_sim/faults/rest" if "status" in body else "/_sim/faults/stall"
    async with aiohttp.ClientSession() as session, session.post(sim.url + path, json=body) as response:
        assert response.status == 400
