"""Simulator faults and limit enforcement, driven over the /_sim/faults endpoints like the e2e tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulator import invented
from simulator.faults import Faults
from simulator.market import Market
from simulator.server import Simulator, SimulatorConfig
from simulator.upbit import Bithumb, Upbit

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


@pytest.mark.e2e
async def test_drop_cuts_every_connection_without_a_close_frame(sim: Simulator) -> None:
    ws = await subscribed(sim)
    answer = await post(sim, "/_sim/faults/drop")
    assert answer["dropped"] == 1 and answer["counts"]["drops"] == 1
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    assert closed.value.rcvd is None  # no close frame: the TCP connection just went away


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
@pytest.mark.parametrize("body", [{"seconds": -1}, {"seconds": "x"}, {"status": 500}])
async def test_fault_parameters_are_checked(sim: Simulator, body: dict[str, Any]) -> None:
    path = "/_sim/faults/rest" if "status" in body else "/_sim/faults/stall"
    async with aiohttp.ClientSession() as session, session.post(sim.url + path, json=body) as response:
        assert response.status == 400


# -- every dialect: stall then resume, skipped trades, invented trades, throttle then refuse -----------
#
# These talk to a simulator over real sockets with aiohttp's client, which shows WebSocket pings and
# tells a close frame from a dropped connection.

DIALECTS = ["binance", "binance-futures", "upbit", "bithumb"]
FAR_IDS = {"binance": 9000000000425, "binance-futures": 9000000000425, "upbit": 90000000000000425,
           "bithumb": "900000000000000425"}  # fmt: skip


@dataclass(frozen=True)
class Dialect:
    """How a test subscribes one symbol's trades on a dialect and reads a trade frame."""

    path: str
    subscribe: str
    code: str  # the symbol in the dialect's spelling
    id_key: str  # in frames
    event_key: str
    truth_id: str  # in ground-truth rows
    truth_price: str


def _binance_subscribe(stream: str) -> str:
    return json.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1})


def _upbit_subscribe(*codes: str) -> str:
    return json.dumps([{"ticket": "t"}, {"type": "trade", "codes": list(codes), "is_only_realtime": True}])


DIALECT = {
    "binance": Dialect("/ws", _binance_subscribe("btcusdt@trade"), "BTCUSDT", "t", "e", "id", "price"),
    "binance-futures": Dialect("/market/ws", _binance_subscribe("btcusdt@aggTrade"), "BTCUSDT", "a", "e",
                               "a", "p"),
    "upbit": Dialect("/upbit/websocket/v1", _upbit_subscribe("KRW-BTC"), "KRW-BTC", "sequential_id", "type",
                     "sequential_id", "trade_price"),
    "bithumb": Dialect("/bithumb/websocket/v1", _upbit_subscribe("KRW-BTC"), "KRW-BTC", "sequential_id",
                       "type", "sequential_id", "trade_price"),
}  # fmt: skip


def _decode(message: aiohttp.WSMessage) -> dict[str, Any] | None:
    """A text or binary frame's JSON (numbers exact), without the combined-stream envelope."""
    if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
        return None
    data = message.data if isinstance(message.data, str) else message.data.decode()
    decoded = json.loads(data, parse_float=Decimal)
    return decoded.get("data", decoded) if "stream" in decoded else decoded


def _is_trade(frame: dict[str, Any] | None) -> bool:
    return frame is not None and ("t" in frame or "a" in frame or "sequential_id" in frame)


async def _frames_for(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[aiohttp.WSMessage]:
    """Every message that arrives within `seconds` (fewer if the connection ends)."""
    loop = asyncio.get_running_loop()
    deadline, messages = loop.time() + seconds, []
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(ws.receive(), left)
        except TimeoutError:
            break
        messages.append(message)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
    return messages


async def _until_quiet(ws: aiohttp.ClientWebSocketResponse, quiet: float = 0.3) -> list[dict[str, Any]]:
    """The trade frames that arrive until none has come for `quiet` seconds."""
    trades: list[dict[str, Any]] = []
    while batch := await _frames_for(ws, quiet):
        trades += [frame for frame in map(_decode, batch) if _is_trade(frame)]  # type: ignore[misc]
        if not any(_is_trade(_decode(m)) for m in batch):
            break
    return trades


async def _trades(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    trades: list[dict[str, Any]] = []
    while len(trades) < count:
        frame = _decode(await asyncio.wait_for(ws.receive(), WAIT))
        if _is_trade(frame):
            trades.append(frame)  # type: ignore[arg-type]
    return trades


async def _json(sim: Simulator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, sim.url + path, json=body) as response,
    ):
        assert response.status == 200, await response.text()
        return json.loads(await response.read(), parse_float=Decimal)


def _generated(sim: Simulator, exchange: str) -> dict[str, int]:
    return dict(sim.venues[exchange].market.trades_generated())


async def _until_generated(sim: Simulator, exchange: str, more_than: dict[str, int], count: int) -> None:
    async def enough() -> None:
        # The market has no event to wait on; it ticks every 10 ms, so polling at 20 ms is enough.
        while any(n - more_than[s] < count for s, n in _generated(sim, exchange).items()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(enough(), WAIT)


@pytest.fixture
async def pinging() -> AsyncIterator[Simulator]:
    """A simulator whose Binance server pings every 0.2 s."""
    config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=100, seed=3, ping_interval=0.2)
    async with Simulator(config) as simulator:
        yield simulator


@pytest.mark.e2e
@pytest.mark.parametrize("keepalive", [True, False])
async def test_a_stall_withholds_the_trades_made_meanwhile_then_resumes_with_later_ids(
    pinging: Simulator, keepalive: bool
) -> None:
    sim = pinging
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sim.ws_url + "/ws", autoping=False) as ws,
    ):
        await ws.send_str(DIALECT["binance"].subscribe)
        before = await _trades(ws, 3)
        answer = await post(sim, "/_sim/faults/stall", {"seconds": 2.0, "keepalive": keepalive})
        assert (answer["stalled"], answer["keepalive"]) == (1, keepalive)
        assert answer["endsAt"] - answer["startedAt"] == pytest.approx(2.0)
        before += await _until_quiet(ws, 0.3)  # what was on the wire already
        during = await _frames_for(ws, 0.8)
        assert not [m for m in during if m.type is aiohttp.WSMsgType.TEXT], "a data frame during the stall"
        pings = [m for m in during if m.type is aiohttp.WSMsgType.PING]
        assert len(pings) >= 2 if keepalive else not pings  # keepalive goes on only if asked for
        [after] = await _trades(ws, 1)  # the same connection carries the trades again
    last_before = max(trade["t"] for trade in before)
    withheld = range(last_before + 1, after["t"])
    assert len(withheld) > 10, "the ids jump over the trades made during the stall"
    truth = {row["id"] for row in await _json(sim, "GET", "/_sim/trades?symbol=BTCUSDT")}
    assert set(withheld) <= truth  # they were real trades, never sent on this connection
    if keepalive:
        counts = (await get(sim, "/_sim/faults"))[2]["counts"]
        assert counts["withheldFrames"] == len(withheld)


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["upbit", "bithumb"])
async def test_upbit_style_stall_still_answers_ping_with_status_up(sim: Simulator, exchange: str) -> None:
    dialect = DIALECT[exchange]
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sim.ws_url + dialect.path, autoping=False) as ws,
    ):
        await ws.send_str(dialect.subscribe)
        before = await _trades(ws, 3)
        answer = await post(
            sim, f"/_sim/faults/stall?exchange={exchange}", {"seconds": 2.0, "keepalive": True}
        )
        assert (answer["exchange"], answer["stalled"]) == (exchange, 1)
        before += await _until_quiet(ws, 0.3)
        await ws.send_str("PING")
        await ws.ping(b"still there?")
        during = await _frames_for(ws, 0.8)
        assert [_decode(m) for m in during if m.type is aiohttp.WSMsgType.BINARY] == [{"status": "UP"}]
        assert [m.data for m in during if m.type is aiohttp.WSMsgType.PONG] == [b"still there?"]
        [after] = await _trades(ws, 1)
    truth = [
        row["sequential_id"]
        for row in await _json(sim, "GET", f"/_sim/trades?exchange={exchange}&symbol=KRW-BTC")
    ]
    last_before = truth.index(before[-1]["sequential_id"])
    assert truth.index(after["sequential_id"]) > last_before + 10  # the trades in between never came


@pytest.mark.e2e
async def test_skipping_the_next_trades_of_one_symbol_leaves_a_hole_only_there(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(sim.ws_url + "/ws") as ws:
        await post(sim, "/_sim/pause")
        await ws.send_str(
            json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade", "ethusdt@trade"], "id": 1})
        )
        assert json.loads(await asyncio.wait_for(ws.receive_str(), WAIT)) == {"result": None, "id": 1}
        generated = _generated(sim, "binance")
        answer = await post(sim, "/_sim/faults/skip", {"symbol": "BTCUSDT", "count": 5})
        assert answer["symbols"] == ["BTC/USDT"] and answer["skipping"]["BTC/USDT"]["remaining"] == 5
        await post(sim, "/_sim/resume")
        await _until_generated(sim, "binance", generated, 40)
        await post(sim, "/_sim/pause")
        received = await _until_quiet(ws)
    for symbol, code in (("BTC/USDT", "BTCUSDT"), ("ETH/USDT", "ETHUSDT")):
        truth = [row["id"] for row in await _json(sim, "GET", f"/_sim/trades?symbol={code}")][
            generated[symbol] :
        ]
        got = [trade["t"] for trade in received if trade["s"] == code]
        skipped = [row["id"] for row in await _json(sim, "GET", f"/_sim/faults/skipped?symbol={code}")]
        if symbol == "BTC/USDT":
            assert skipped == truth[:5]  # the next five trades, and only those
        else:
            assert skipped == []
        assert got == [i for i in truth if i not in skipped]


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["upbit", "bithumb", "binance-futures"])
async def test_skipping_every_symbol_for_a_while_withholds_real_trades_the_ids_do_not_reveal(
    sim: Simulator, exchange: str
) -> None:
    dialect = DIALECT[exchange]
    codes = ("KRW-BTC", "KRW-ETH") if exchange != "binance-futures" else ("BTCUSDT", "ETHUSDT")
    futures_streams = ["btcusdt@aggTrade", "ethusdt@aggTrade"]
    subscribe = (
        json.dumps({"method": "SUBSCRIBE", "params": futures_streams, "id": 1})
        if exchange == "binance-futures"
        else _upbit_subscribe(*codes)
    )
    async with aiohttp.ClientSession() as session, session.ws_connect(sim.ws_url + dialect.path) as ws:
        await ws.send_str(subscribe)
        await _trades(ws, 4)  # subscribed, and the market is running
        await post(sim, "/_sim/pause")
        await _until_quiet(ws)
        generated = _generated(sim, exchange)
        answer = await post(sim, f"/_sim/faults/skip?exchange={exchange}", {"seconds": 0.4})
        assert answer["endsAt"] is not None and set(answer["skipping"]) == set(generated)
        await post(sim, "/_sim/resume")
        await _until_generated(sim, exchange, generated, 100)  # a second at 100 trades/s: past the skip
        await post(sim, "/_sim/pause")
        received = {trade[dialect.id_key] for trade in await _until_quiet(ws)}
    for code, symbol in zip(codes, generated, strict=True):
        rows = await _json(sim, "GET", f"/_sim/trades?exchange={exchange}&symbol={code}")
        window = [row[dialect.truth_id] for row in rows][generated[symbol] :]
        skipped = [
            row[dialect.truth_id]
            for row in await _json(sim, "GET", f"/_sim/faults/skipped?exchange={exchange}&symbol={code}")
        ]
        assert skipped, f"{code}: nothing skipped"
        assert skipped == window[: len(skipped)]  # the first trades after the skip began, all real
        assert set(window) - set(skipped) == received & set(window)  # everything else was sent
        assert not received & set(skipped)


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", DIALECTS)
async def test_invented_trades_reach_the_stream_and_never_the_ground_truth(
    sim: Simulator, exchange: str
) -> None:
    dialect = DIALECT[exchange]
    query = f"?exchange={exchange}"
    async with aiohttp.ClientSession() as session, session.ws_connect(sim.ws_url + dialect.path) as ws:
        await ws.send_str(dialect.subscribe)
        await _trades(ws, 5)  # the market has made some trades to lie about
        await post(sim, "/_sim/pause")
        await _until_quiet(ws)
        answers = [
            await post(
                sim, f"/_sim/faults/invent{query}", {"symbol": dialect.code, "ids": ids, "eventType": event}
            )
            for ids, event in (("far", None), ("lower", None), ("next", "megaTrade"))
        ]
        frames = await _until_quiet(ws)
    far, lower, following = frames
    truth = await _json(sim, "GET", f"/_sim/trades{query}&symbol={dialect.code}")
    truth_ids = [row[dialect.truth_id] for row in truth]
    invented = await _json(sim, "GET", f"/_sim/invented{query}&symbol={dialect.code}")
    assert [row[dialect.truth_id] for row in invented] == [frame[dialect.id_key] for frame in frames]
    assert [row[dialect.truth_id] for answer in answers for row in answer["trades"]] == [
        frame[dialect.id_key] for frame in frames
    ]
    assert [(row["ids"], row["eventType"], row["sentTo"]) for row in invented] == [
        ("far", None, 1), ("lower", None, 1), ("next", "megaTrade", 1)]  # fmt: skip
    real = {(row[dialect.truth_id], Decimal(str(row[dialect.truth_price]))) for row in truth}
    assert not real & {(row[dialect.truth_id], Decimal(str(row[dialect.truth_price]))) for row in invented}
    # (a) far outside the sequence, at price 1
    assert Decimal(str(invented[0][dialect.truth_price])) == 1
    assert far[dialect.id_key] == FAR_IDS[exchange]
    # (b) below the newest real id, and not a real trade
    assert int(lower[dialect.id_key]) < int(truth_ids[-1])
    if exchange.startswith("binance"):  # an id that exists, with another price
        assert lower[dialect.id_key] in truth_ids
        real_row = truth[truth_ids.index(lower[dialect.id_key])]
        assert Decimal(real_row[dialect.truth_price]) != Decimal(lower["p"])
        if exchange == "binance":  # and REST history tells the real trade
            path = f"/api/v3/historicalTrades?symbol=BTCUSDT&fromId={lower['t']}&limit=1"
            assert (await get(sim, path))[2] == [real_row]
    else:  # a sequential_id never issued: the exchange's history does not know it
        assert lower[dialect.id_key] not in truth_ids
        status, _, page = await get(
            sim, f"/{exchange}/v1/trades/ticks?market=KRW-BTC&count=5&cursor={lower['sequential_id']}"
        )
        assert (status, page) == (200, [])
    # (c) an unknown event type, otherwise a trade
    assert following[dialect.event_key] == "megaTrade"
    if exchange.startswith("binance"):
        assert following[dialect.id_key] == truth_ids[-1] + 1  # the id the next real trade will take
    counts = (await get(sim, f"/_sim/faults{query}"))[2]["counts"]
    assert counts["inventedTrades"] == 3


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["binance", "upbit"])
async def test_rest_throttled_then_connections_drop_and_handshakes_are_refused(
    sim: Simulator, exchange: str
) -> None:
    dialect = DIALECT[exchange]
    query = f"?exchange={exchange}"
    rest = (
        "/api/v3/trades?symbol=BTCUSDT&limit=1"
        if exchange == "binance"
        else "/upbit/v1/trades/ticks?market=KRW-BTC"
    )
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(sim.ws_url + dialect.path)
        await ws.send_str(dialect.subscribe)
        await _trades(ws, 1)
        body = {"restSeconds": 0.6, "retryAfter": 1, "dropAfter": 0.6, "refuseSeconds": 0.8}
        answer = await post(sim, f"/_sim/faults/throttle-then-refuse{query}", body)
        assert answer["rest"]["active"] and answer["dropAt"] - answer["startedAt"] == pytest.approx(0.6)
        async with session.get(sim.url + rest) as response:
            assert response.status == 429
            if exchange == "binance":
                assert response.headers["Retry-After"] == "1"
            else:  # Upbit says nothing of when to come back, only that nothing is left
                assert "Retry-After" not in response.headers
                assert response.headers["Remaining-Req"] == "group=trade; min=1800; sec=0"
        closing = await _frames_for(ws, WAIT)
        assert closing[-1].type in (
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )  # dropped, no close frame
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(sim.ws_url + dialect.path)
        assert refused.value.status == 503
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:  # handshakes succeed again once the refusal has run out
            try:
                again = await session.ws_connect(sim.ws_url + dialect.path)
                break
            except aiohttp.WSServerHandshakeError:
                assert asyncio.get_running_loop().time() < deadline, "still refused"
                await asyncio.sleep(0.05)
        await again.close()
        async with session.get(sim.url + rest) as response:
            assert response.status == 200
    faults = (await get(sim, f"/_sim/faults{query}"))[2]
    assert faults["counts"]["drops"] == 1 and faults["counts"]["refusedHandshakes"] >= 1
    assert faults["counts"]["restFaultAnswers"] == 1 and faults["violations"]["restDuringRetryAfter"] == 0


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["binance-futures", "upbit", "bithumb"])
async def test_drop_refuse_shutdown_and_rest_faults_work_on_every_dialect(
    sim: Simulator, exchange: str
) -> None:
    dialect = DIALECT[exchange]
    query = f"?exchange={exchange}"
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(sim.ws_url + dialect.path)
        await ws.send_str(dialect.subscribe)
        await _trades(ws, 1)
        assert (await post(sim, f"/_sim/faults/drop{query}"))["dropped"] == 1
        assert (await _frames_for(ws, WAIT))[-1].type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

        ws = await session.ws_connect(sim.ws_url + dialect.path)
        await ws.send_str(dialect.subscribe)
        await _trades(ws, 1)
        notified = (await post(sim, f"/_sim/faults/shutdown{query}", {"grace": 0.2}))["notified"]
        messages = await _frames_for(ws, WAIT)
        events = [frame.get("e") for frame in map(_decode, messages) if frame is not None]
        assert messages[-1].type is aiohttp.WSMsgType.CLOSE and messages[-1].data == 1001
        if exchange == "binance-futures":
            assert notified == 1 and "serverShutdown" in events
        else:  # Upbit and Bithumb announce nothing: the close frame is all
            assert notified == 0 and "serverShutdown" not in events

        await post(sim, f"/_sim/faults/refuse{query}", {"seconds": 30})
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(sim.ws_url + dialect.path)
        assert refused.value.status == 503

        await post(sim, f"/_sim/faults/rest{query}", {"status": 429, "seconds": 30, "retryAfter": 2})
        rest = ("/fapi/v1/trades?symbol=BTCUSDT" if exchange == "binance-futures"
                else f"/{exchange}/v1/trades/ticks?market=KRW-BTC")  # fmt: skip
        async with session.get(sim.url + rest) as response:
            status, headers, body = response.status, response.headers, await response.read()
        assert status == 429
        if exchange == "binance-futures":
            assert headers["Retry-After"] == "2" and json.loads(body)["code"] == -1003
        elif exchange == "upbit":
            assert "Retry-After" not in headers and json.loads(body)["error"]["name"] == "too_many_requests"
        else:
            assert "Retry-After" not in headers and body == b""
        cleared = await post(sim, f"/_sim/faults/clear{query}")
        assert not cleared["refusing"] and not cleared["rest"]["active"]
        again = await session.ws_connect(sim.ws_url + dialect.path)
        await again.close()
    other = (await get(sim, "/_sim/faults"))[2]["counts"]  # Binance spot's faults were not touched
    assert other["drops"] == other["shutdowns"] == other["refusedHandshakes"] == 0


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/_sim/faults/drop?exchange=kraken", {}, 404),
        ("/_sim/faults/skip", {}, 400),
        ("/_sim/faults/skip", {"count": 0}, 400),
        ("/_sim/faults/skip", {"symbol": "DOGEUSDT", "count": 1}, 400),
        ("/_sim/faults/invent", {"symbol": "BTCUSDT", "ids": "sideways"}, 400),
        ("/_sim/faults/invent", {"ids": "far"}, 400),
        ("/_sim/faults/invent", {"symbol": "BTCUSDT", "eventType": 7}, 400),
        ("/_sim/faults/stall", {"keepalive": "yes"}, 400),
        ("/_sim/faults/limits", {"restPerSecond": 5}, 400),  # Binance counts weight, not requests
        ("/_sim/faults/throttle-then-refuse", {"status": 503}, 400),
    ],
)
async def test_new_fault_parameters_are_checked(
    sim: Simulator, path: str, body: dict[str, Any], status: int
) -> None:
    async with aiohttp.ClientSession() as session, session.post(sim.url + path, json=body) as response:
        assert response.status == status


# -- pure parts: no socket, no clock ------------------------------------------------------------------


def test_a_skip_by_count_ends_after_that_many_trades_and_one_by_time_when_its_time_is_up() -> None:
    faults = Faults()
    faults.skip(["BTC/USDT"], count=2, seconds=None, now=0.0)
    faults.skip(["ETH/USDT"], count=None, seconds=1.0, now=0.0)
    assert [faults.skips("BTC/USDT", i, 5.0) for i in (1, 2, 3)] == [True, True, False]
    assert [faults.skips("ETH/USDT", i, t) for i, t in ((7, 0.5), (8, 0.99), (9, 1.0), (10, 0.5))] == [
        True, True, False, False]  # fmt: skip
    assert faults.skipped == {"BTC/USDT": [1, 2], "ETH/USDT": [7, 8]} and not faults.skipping
    faults.skip(["BTC/USDT"], count=100, seconds=0.5, now=10.0)  # whichever ends first
    assert faults.skips("BTC/USDT", 4, 10.4) and not faults.skips("BTC/USDT", 5, 10.5)
    assert faults.counts["skippedTrades"] == 5


def _market_with_trades(symbol: str, seconds: float = 2.0) -> Market:
    market = Market([symbol], seed=4, trades_per_second=20, clock=lambda: 1_700_000_000.0)
    market.tick(now=1_700_000_000.0 + seconds)
    return market


def test_binance_invented_ids_are_far_a_real_id_with_other_values_or_the_next_one() -> None:
    market = _market_with_trades("BTC/USDT")
    instrument, history = market.instruments["BTC/USDT"], market.history("BTC/USDT")
    newest = history.last()
    assert newest is not None and history.total == 40
    far = [invented.binance_trade(instrument, history, "far", i, i, 0) for i in range(2)]
    assert [t.id for t in far] == [9_000_000_000_425, 9_000_000_000_426]
    assert far[0].price == "1.00" and far[0].quantity_lots == instrument.mean_quantity
    lower = invented.binance_trade(instrument, history, "lower", 0, 0, 0)
    real = history.at(history.index_of_id(lower.id))
    assert lower.id == newest.id - 1 and lower.time == real.time
    assert (lower.price, lower.quantity) != (real.price, real.quantity)
    following = invented.binance_trade(instrument, history, "next", 1, 5, 0)
    assert following.id == newest.id + 2 and following.price == newest.price
    with pytest.raises(invented.InventError):
        invented.binance_trade(instrument, history, "lower", 0, 39, 0)  # there is no 41st trade below


@pytest.mark.parametrize("flavor", ["upbit", "bithumb"])
def test_upbit_style_invented_ids_were_never_issued(flavor: str) -> None:
    market = _market_with_trades("BTC/KRW", seconds=5.0)
    dialect = Upbit(market) if flavor == "upbit" else Bithumb(market)
    instrument, history = market.instruments["BTC/KRW"], market.history("BTC/KRW")
    newest = history.last()
    assert newest is not None
    issued = {
        str(dialect.truth_row(instrument, trade)["sequential_id"]) for trade in market.trades("BTC/KRW")
    }
    rows = {ids: dialect.invent(instrument, ids, 3, None) for ids in ("far", "lower", "next")}
    values = [str(row["sequential_id"]) for found in rows.values() for row in found]
    assert len(set(values)) == 9 and not set(values) & issued
    assert all(dialect.index_of_sequential_id(instrument, value) is None for value in values)
    newest_id = int(dialect.truth_row(instrument, newest)["sequential_id"])
    assert all(int(row["sequential_id"]) < newest_id for row in rows["lower"])
    assert all(row["sentTo"] == 0 for found in rows.values() for row in found)  # nobody subscribed
    assert history.total == 100  # inventing made no trade


def test_invented_rows_are_kept_per_symbol_and_counted() -> None:
    faults = Faults()
    faults.record_invented("BTC/USDT", [{"id": 1}, {"id": 2}])
    assert faults.state()["invented"] == {"BTC/USDT": 2} and faults.counts["inventedTrades"] == 2
