"""The Binance spot simulator, exercised through a real server and real clients."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from simulator.market import Market, bar_open_time
from simulator.server import Simulator, SimulatorConfig

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
DECIMAL_8 = re.compile(r"^\d+\.\d{8}$")
WAIT = 5.0  # the longest any single wait in these tests may take


class Dec:
    """Shape marker: a decimal string with Binance's 8 places."""


TRADE = {"e": str, "E": int, "s": str, "t": int, "p": Dec, "q": Dec, "T": int, "m": bool, "M": bool}
AGG_TRADE = {
    "e": str,
    "E": int,
    "s": str,
    "a": int,
    "p": Dec,
    "q": Dec,
    "f": int,
    "l": int,
    "T": int,
    "m": bool,
    "M": bool,
}
BOOK_TICKER = {"u": int, "s": str, "b": Dec, "B": Dec, "a": Dec, "A": Dec}
KLINE = {"e": str, "E": int, "s": str, "k": dict}
KLINE_BAR = {
    "t": int,
    "T": int,
    "s": str,
    "i": str,
    "f": int,
    "L": int,
    "o": Dec,
    "c": Dec,
    "h": Dec,
    "l": Dec,
    "v": Dec,
    "n": int,
    "x": bool,
    "q": Dec,
    "V": Dec,
    "Q": Dec,
    "B": str,
}
TICKER = {
    "e": str,
    "E": int,
    "s": str,
    "p": str,
    "P": str,
    "w": Dec,
    "x": Dec,
    "c": Dec,
    "Q": Dec,
    "b": Dec,
    "B": Dec,
    "a": Dec,
    "A": Dec,
    "o": Dec,
    "h": Dec,
    "l": Dec,
    "v": Dec,
    "q": Dec,
    "O": int,
    "C": int,
    "F": int,
    "L": int,
    "n": int,
}


def assert_shape(payload: dict[str, Any], shape: dict[str, type]) -> None:
    assert list(payload) == list(shape), f"keys {list(payload)} != {list(shape)}"
    for key, kind in shape.items():
        value = payload[key]
        if kind is Dec:
            assert isinstance(value, str) and DECIMAL_8.match(value), f"{key}={value!r}"
        elif kind is int:
            assert isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r}"
        else:
            assert isinstance(value, kind), f"{key}={value!r}"


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, trades_per_second=50, seed=7)) as simulator:
        yield simulator


def ws_connect(simulator: Simulator, path: str) -> connect:
    return connect(simulator.ws_url + path, proxy=None, open_timeout=WAIT, close_timeout=1)


async def recv(ws: ClientConnection, seconds: float = WAIT) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), seconds))


async def request(ws: ClientConnection, message: dict[str, Any] | str) -> Any:
    """Send a control message and return the reply to it, skipping market frames."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return await recv_until(ws, lambda m: "result" in m or "error" in m)


async def recv_until(ws: ClientConnection, predicate: Callable[[Any], bool]) -> Any:
    async with asyncio.timeout(WAIT):
        while True:
            message = json.loads(await ws.recv())
            if predicate(message):
                return message


async def get(simulator: Simulator, path: str) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
        session.get(simulator.url + path) as response,
    ):
        return response.status, dict(response.headers), await response.json()


async def post(simulator: Simulator, path: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
        session.post(simulator.url + path) as response,
    ):
        assert response.status == 200
        return await response.json()


# -- WebSocket protocol --------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_combined_subscribe_acks_then_sends_every_stream_type(sim: Simulator) -> None:
    streams = [
        "btcusdt@trade",
        "btcusdt@aggTrade",
        "btcusdt@bookTicker",
        "btcusdt@ticker",
        "btcusdt@kline_1s",
    ]
    async with ws_connect(sim, "/stream") as ws:
        subscribe = {"method": "SUBSCRIBE", "params": streams, "id": 1}
        assert await request(ws, subscribe) == {"result": None, "id": 1}
        seen: dict[str, dict[str, Any]] = {}
        final_kline = None
        async with asyncio.timeout(WAIT):
            while len(seen) < len(streams) or final_kline is None:
                message = await recv(ws)
                assert set(message) == {"stream", "data"}
                seen[message["stream"]] = message["data"]
                bar = message["data"].get("k", {})
                # A second without a trade closes an empty bar; compare one that has trades.
                if message["stream"].endswith("@kline_1s") and bar["x"] and bar["n"] > 0:
                    final_kline = bar

    assert_shape(seen["btcusdt@trade"], TRADE)
    assert_shape(seen["btcusdt@aggTrade"], AGG_TRADE)
    assert_shape(seen["btcusdt@bookTicker"], BOOK_TICKER)
    assert_shape(seen["btcusdt@ticker"], TICKER)
    assert_shape(seen["btcusdt@kline_1s"], KLINE)
    assert_shape(seen["btcusdt@kline_1s"]["k"], KLINE_BAR)
    assert seen["btcusdt@trade"]["e"] == "trade" and seen["btcusdt@trade"]["s"] == "BTCUSDT"
    assert seen["btcusdt@ticker"]["e"] == "24hrTicker"
    book = seen["btcusdt@bookTicker"]
    assert Decimal(book["b"]) < Decimal(book["a"])
    agg = seen["btcusdt@aggTrade"]
    assert agg["a"] == agg["f"] == agg["l"]

    # The closed bar agrees with the ground truth: every trade whose time falls inside it.
    assert final_kline["T"] - final_kline["t"] == 999
    _, _, truth = await get(sim, "/_sim/trades?symbol=BTCUSDT")
    in_bar = [t for t in truth if final_kline["t"] <= t["time"] <= final_kline["T"]]
    assert final_kline["n"] == len(in_bar) > 0
    assert (final_kline["f"], final_kline["L"]) == (in_bar[0]["id"], in_bar[-1]["id"])
    assert Decimal(final_kline["v"]) == sum(Decimal(t["qty"]) for t in in_bar)
    assert Decimal(final_kline["h"]) == max(Decimal(t["price"]) for t in in_bar)


@pytest.mark.e2e
async def test_raw_and_combined_urls_and_the_combined_property(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws/btcusdt@trade") as ws:
        assert (await recv(ws))["e"] == "trade"
        assert await request(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 2}) == {
            "result": False,
            "id": 2,
        }
        assert await request(ws, {"method": "SET_PROPERTY", "params": ["combined", True], "id": 3}) == {
            "result": None,
            "id": 3,
        }
        # The ack is queued after every raw frame, so everything after it is wrapped.
        assert (await recv(ws))["stream"] == "btcusdt@trade"

    async with ws_connect(sim, "/stream?streams=btcusdt@trade/ethusdt@aggTrade") as ws:
        streams = {(await recv(ws))["stream"] for _ in range(20)}
        assert streams == {"btcusdt@trade", "ethusdt@aggTrade"}
        assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": "list1"}) == {
            "result": ["btcusdt@trade", "ethusdt@aggTrade"],
            "id": "list1",
        }


@pytest.mark.e2e
async def test_unsubscribe_stops_frames_and_list_subscriptions_follows(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws") as ws:
        subscribe = {"method": "SUBSCRIBE", "params": ["btcusdt@trade", "ethusdt@aggTrade"], "id": 1}
        assert await request(ws, subscribe) == {"result": None, "id": 1}
        assert (await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2}))["result"] == [
            "btcusdt@trade",
            "ethusdt@aggTrade",
        ]
        unsubscribe = {"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 3}
        assert await request(ws, unsubscribe) == {"result": None, "id": 3}
        # Frames are queued in order, so once the ack is here no trade frame may follow it.
        kinds = {(await recv(ws))["e"] for _ in range(15)}
        assert kinds == {"aggTrade"}
        assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 4}) == {
            "result": ["ethusdt@aggTrade"],
            "id": 4,
        }
    stats = await post_free_stats(sim)
    assert stats["violations"] == 0


async def post_free_stats(simulator: Simulator) -> dict[str, Any]:
    status, _, stats = await get(simulator, "/_sim/stats")
    assert status == 200
    return stats


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("message", "reply"),
    [
        (
            "{not json",
            {
                "error": {
                    "code": 3,
                    "msg": "Invalid JSON: expected property name enclosed in "
                    "double quotes at line 1 column 2",
                }
            },
        ),
        (
            {"method": "FETCH", "id": 1},
            {
                "error": {
                    "code": 2,
                    "msg": "Invalid request: unknown variant `FETCH`, expected one of "
                    "`SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`",
                },
                "id": 1,
            },
        ),
        (
            {"params": [], "id": 2},
            {"error": {"code": 2, "msg": "Invalid request: missing field `method`"}, "id": 2},
        ),
        (
            {"method": "SUBSCRIBE", "params": [], "id": "not valid!"},
            {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}},
        ),
        (
            {"method": "SUBSCRIBE", "params": "btcusdt@trade", "id": 3},
            {
                "error": {
                    "code": 2,
                    "msg": "Invalid request: invalid type for `params`, expected a sequence",
                },
                "id": 3,
            },
        ),
        (
            {"method": "SUBSCRIBE", "params": ["btcusdt@trade", "dogeusdt@trade"], "id": 4},
            {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 4},
        ),
        (
            {"method": "SUBSCRIBE", "params": ["BTCUSDT@trade"], "id": 5},
            {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 5},
        ),
        (
            {"method": "LIST_SUBSCRIPTIONS", "params": ["x"], "id": 6},
            {"error": {"code": 2, "msg": "Invalid request: too many parameters"}, "id": 6},
        ),
        (
            {"method": "SET_PROPERTY", "params": ["compressed", True], "id": 7},
            {"error": {"code": 0, "msg": "Unknown property"}, "id": 7},
        ),
        (
            {"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 8},
            {"error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": 8},
        ),
    ],
)
async def test_bad_requests_get_binance_error_replies(
    sim: Simulator, message: dict[str, Any] | str, reply: dict[str, Any]
) -> None:
    async with ws_connect(sim, "/ws") as ws:
        assert await request(ws, message) == reply
        # The connection stays usable and nothing was subscribed by the failed request.
        assert await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 99}) == {"result": [], "id": 99}


@pytest.mark.e2e
async def test_server_pings_and_drops_a_client_that_never_pongs() -> None:
    config = SimulatorConfig(symbols=SYMBOLS, trades_per_second=5, ping_interval=0.3, pong_timeout=0.8)
    async with Simulator(config) as simulator, aiohttp.ClientSession() as session:
        async with session.ws_connect(simulator.ws_url + "/ws", autoping=False) as silent:
            ping = await silent.receive(timeout=WAIT)
            assert ping.type is aiohttp.WSMsgType.PING and ping.data  # Binance pings carry a payload
            async with asyncio.timeout(WAIT):
                while (message := await silent.receive()).type is aiohttp.WSMsgType.PING:
                    pass
            assert message.type is aiohttp.WSMsgType.CLOSE

        # A client that pongs (aiohttp does it for us) outlives several pong timeouts.
        async with session.ws_connect(simulator.ws_url + "/ws/btcusdt@trade") as polite:
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.0
            while loop.time() < until:
                assert (await polite.receive(timeout=WAIT)).type is aiohttp.WSMsgType.TEXT
        stats = simulator.stats()
    assert stats["pongTimeouts"] == 1
    assert stats["framesSent"]["ping"] >= 8
    assert stats["violations"] == 0


@pytest.mark.e2e
async def test_ten_messages_in_a_second_is_a_violation_and_a_disconnect(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws") as ws:
        for request_id in range(10):
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": request_id}))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(WAIT):
                while True:
                    await ws.recv()
        assert ws.close_code == 1008
    stats = await post_free_stats(sim)
    assert stats["violations"] == 1
    assert stats["violationsByReason"]["messageRate"] == 1


@pytest.mark.e2e
async def test_more_than_1024_streams_is_a_violation() -> None:
    symbols = [f"C{i}/USDT" for i in range(52)]  # 52 symbols x 20 stream kinds = 1040 streams
    async with Simulator(SimulatorConfig(symbols=symbols, trades_per_second=1)) as simulator:
        intervals = [
            "1s",
            "1m",
            "3m",
            "5m",
            "15m",
            "30m",
            "1h",
            "2h",
            "4h",
            "6h",
            "8h",
            "12h",
            "1d",
            "3d",
            "1w",
            "1M",
        ]
        kinds = ["trade", "aggTrade", "ticker", "bookTicker", *(f"kline_{i}" for i in intervals)]
        streams = [f"c{i}usdt@{kind}" for i in range(52) for kind in kinds][:1025]
        async with ws_connect(simulator, "/ws") as ws:
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1}))
            with pytest.raises(ConnectionClosed):
                await recv_until(ws, lambda _: False)
        stats = simulator.stats()
    assert stats["violationsByReason"] == {"messageRate": 0, "streamLimit": 1}


@pytest.mark.e2e
async def test_pause_stops_generation_and_resume_restarts_it(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws/btcusdt@trade") as ws:
        await recv(ws)
        paused = await post(sim, "/_sim/pause")
        last_id = (await get(sim, "/_sim/trades?symbol=BTCUSDT"))[2][-1]["id"]
        # Frames already in flight may still arrive, none newer than the pause; then silence.
        with pytest.raises(TimeoutError):
            while True:
                assert (await recv(ws, seconds=0.5))["t"] <= last_id
        stats = await post_free_stats(sim)
        assert stats["paused"] is True
        assert stats["tradesGenerated"] == paused["tradesGenerated"]

        await post(sim, "/_sim/resume")
        assert (await recv(ws))["t"] == last_id + 1  # the tape continues where it stopped


@pytest.mark.e2e
async def test_disconnect_drops_every_connection_without_a_close_frame(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws/btcusdt@trade") as first, ws_connect(sim, "/stream") as second:
        await recv(first)
        assert await post(sim, "/_sim/disconnect") == {"disconnected": 2}
        for ws in (first, second):
            with pytest.raises(ConnectionClosed):
                await recv_until(ws, lambda _: False)
            assert ws.protocol.close_rcvd is None
    assert (await post_free_stats(sim))["connections"] == {"open": 0, "total": 2}


@pytest.mark.e2e
async def test_stop_announces_server_shutdown_and_is_idempotent() -> None:
    simulator = Simulator(SimulatorConfig(symbols=SYMBOLS))
    await simulator.start()
    async with ws_connect(simulator, "/stream?streams=btcusdt@trade") as ws:
        await simulator.stop()
        shutdown = await recv_until(ws, lambda m: m["stream"] == "!serverShutdown")
        assert shutdown["data"]["e"] == "serverShutdown"
        with pytest.raises(ConnectionClosed):
            await recv_until(ws, lambda _: False)
        assert ws.close_code == 1001
    await simulator.stop()


# -- REST ------------------------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_rest_trades_match_the_websocket(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws/btcusdt@trade") as ws:
        frames = [await recv(ws) for _ in range(20)]
    ids = [frame["t"] for frame in frames]
    assert ids == list(range(ids[0], ids[0] + 20))

    _, _, historical = await get(sim, f"/api/v3/historicalTrades?symbol=BTCUSDT&fromId={ids[0]}&limit=20")
    assert [(t["id"], t["price"], t["qty"], t["time"], t["isBuyerMaker"]) for t in historical] == [
        (f["t"], f["p"], f["q"], f["T"], f["m"]) for f in frames
    ]
    assert all(Decimal(t["quoteQty"]) == Decimal(t["price"]) * Decimal(t["qty"]) for t in historical)

    _, _, aggregates = await get(sim, f"/api/v3/aggTrades?symbol=BTCUSDT&fromId={ids[0]}&limit=20")
    assert [(a["a"], a["f"], a["l"], a["p"], a["q"], a["T"], a["m"]) for a in aggregates] == [
        (f["t"], f["t"], f["t"], f["p"], f["q"], f["T"], f["m"]) for f in frames
    ]
    start, end = frames[3]["T"], frames[10]["T"]
    _, _, by_time = await get(sim, f"/api/v3/aggTrades?symbol=BTCUSDT&startTime={start}&endTime={end}")
    assert all(start <= a["T"] <= end for a in by_time) and frames[5]["t"] in {a["a"] for a in by_time}

    _, _, latest = await get(sim, "/api/v3/trades?symbol=BTCUSDT&limit=5")
    assert len(latest) == 5 and latest[-1]["id"] >= ids[-1]
    _, _, truth = await get(sim, "/_sim/trades?symbol=BTC/USDT")
    assert [t["id"] for t in truth] == list(range(truth[0]["id"], truth[-1]["id"] + 1))
    assert historical == [t for t in truth if ids[0] <= t["id"] <= ids[-1]]


@pytest.mark.e2e
async def test_rest_klines_ticker_and_depth_agree_with_the_ground_truth(sim: Simulator) -> None:
    async with ws_connect(sim, "/ws/btcusdt@bookTicker") as ws:
        book = await recv(ws)
        await post(sim, "/_sim/pause")  # freeze the market so every answer describes the same state
        with pytest.raises(TimeoutError):  # the last frame in flight is the book as it stays
            while True:
                book = await recv(ws, seconds=0.5)
    _, _, truth = await get(sim, "/_sim/trades?symbol=BTCUSDT")
    prices = [Decimal(t["price"]) for t in truth]

    first_bar = bar_open_time("1s", truth[0]["time"])
    _, _, klines = await get(sim, f"/api/v3/klines?symbol=BTCUSDT&interval=1s&startTime={first_bar}")
    assert all(len(row) == 12 for row in klines)
    for row in klines:
        in_bar = [t for t in truth if row[0] <= t["time"] <= row[6]]
        if in_bar:
            assert row[1] == in_bar[0]["price"] and row[4] == in_bar[-1]["price"]
            assert Decimal(row[2]) == max(Decimal(t["price"]) for t in in_bar)
            assert Decimal(row[3]) == min(Decimal(t["price"]) for t in in_bar)
        assert row[8] == len(in_bar)
        assert Decimal(row[5]) == sum((Decimal(t["qty"]) for t in in_bar), Decimal(0))
        assert Decimal(row[7]) == sum((Decimal(t["quoteQty"]) for t in in_bar), Decimal(0))
    assert sum(row[8] for row in klines) == len(truth)
    # Ask for the last trade's minute by start time: wall time keeps running while the market is
    # paused, so "the latest bar" may already be the next, empty minute.
    last_minute = bar_open_time("1m", truth[-1]["time"])
    _, _, one_minute = await get(
        sim, f"/api/v3/klines?symbol=BTCUSDT&interval=1m&startTime={last_minute}&limit=1"
    )
    assert one_minute[0][0] == last_minute and one_minute[0][4] == truth[-1]["price"]

    _, _, ticker = await get(sim, "/api/v3/ticker/24hr?symbol=BTCUSDT")
    assert (ticker["firstId"], ticker["lastId"]) == (truth[0]["id"], truth[-1]["id"])
    assert ticker["count"] == len(truth)
    assert ticker["lastPrice"] == truth[-1]["price"] and ticker["openPrice"] == truth[0]["price"]
    assert (Decimal(ticker["highPrice"]), Decimal(ticker["lowPrice"])) == (max(prices), min(prices))
    assert Decimal(ticker["volume"]) == sum(Decimal(t["qty"]) for t in truth)
    assert (ticker["bidPrice"], ticker["askPrice"]) == (book["b"], book["a"])
    _, _, tickers = await get(sim, '/api/v3/ticker/24hr?symbols=["BTCUSDT","ETHUSDT"]&type=MINI')
    assert [t["symbol"] for t in tickers] == ["BTCUSDT", "ETHUSDT"] and "bidPrice" not in tickers[0]

    _, _, depth = await get(sim, "/api/v3/depth?symbol=BTCUSDT&limit=10")
    assert depth["lastUpdateId"] == book["u"]
    assert depth["bids"][0][0] == book["b"] and depth["asks"][0][0] == book["a"]
    bids = [Decimal(price) for price, _ in depth["bids"]]
    asks = [Decimal(price) for price, _ in depth["asks"]]
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
    assert len(bids) == len(asks) == 10


@pytest.mark.e2e
async def test_exchange_info_and_rest_errors(sim: Simulator) -> None:
    status, _, info = await get(sim, "/api/v3/exchangeInfo")
    assert status == 200 and info["rateLimits"][0]["rateLimitType"] == "REQUEST_WEIGHT"
    assert [(s["symbol"], s["status"], s["baseAsset"], s["quoteAsset"]) for s in info["symbols"]] == [
        ("BTCUSDT", "TRADING", "BTC", "USDT"),
        ("ETHUSDT", "TRADING", "ETH", "USDT"),
    ]
    _, _, one = await get(sim, "/api/v3/exchangeInfo?symbol=ETHUSDT")
    assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]

    for path, code in [
        ("/api/v3/exchangeInfo?symbol=DOGEUSDT", -1121),
        ("/api/v3/trades?symbol=NOPE", -1121),
        ("/api/v3/trades", -1102),
        ("/api/v3/trades?symbol=BTCUSDT&limit=abc", -1100),
        ("/api/v3/klines?symbol=BTCUSDT&interval=7m", -1120),
        ("/api/v3/klines?symbol=BTCUSDT&interval=1m&startTime=5&endTime=4", -1023),
        ('/api/v3/ticker/24hr?symbols=["BTCUSDT","XYZUSDT"]', -1121),
    ]:
        status, _, body = await get(sim, path)
        assert (status, body["code"]) == (400, code), path
        assert isinstance(body["msg"], str)


@pytest.mark.e2e
async def test_weight_header_tracks_the_documented_weights() -> None:
    config = SimulatorConfig(symbols=SYMBOLS, rest_weight_limit=300)
    async with Simulator(config) as simulator:
        used = []
        for path in [
            "/api/v3/ping",
            "/api/v3/trades?symbol=BTCUSDT",
            "/api/v3/depth?symbol=BTCUSDT&limit=5000",
            "/api/v3/exchangeInfo",
            "/api/v3/klines?symbol=BTCUSDT&interval=1m",
        ]:
            status, headers, _ = await get(simulator, path)
            assert status == 200
            used.append(int(headers["X-MBX-USED-WEIGHT-1M"]))
        assert used == [1, 26, 276, 296, 298]
        status, headers, body = await get(simulator, "/api/v3/trades?symbol=BTCUSDT")
        assert (status, body["code"]) == (429, -1003)
        assert int(headers["Retry-After"]) > 0
        assert headers["X-MBX-USED-WEIGHT-1M"] == "298"


# -- the market itself ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def generate(market: Market, clock: FakeClock, steps: list[float]) -> None:
    for step in steps:
        clock.now += step
        market.tick()


def test_same_seed_same_trades_whatever_the_timing() -> None:
    fields = ("symbol", "id", "price", "quantity", "taker_side")
    tapes = []
    for seed, steps in [(3, [0.01] * 400), (3, [0.37, 1.2, 0.05, 2.38]), (4, [4.0])]:
        clock = FakeClock()
        market = Market(["BTC/USDT", "XYZ/KRW"], seed=seed, trades_per_second=50, clock=clock)
        generate(market, clock, steps)
        tapes.append(
            [
                [tuple(getattr(trade, f) for f in fields) for trade in market.trades(symbol)]
                for symbol in market.instruments
            ]
        )
    # 4 s at 50/s, give or take the last trade, which float rounding of the clock may postpone.
    assert all(199 <= len(trades) <= 200 for tape in tapes for trades in tape)
    common = min(len(trades) for tape in tapes for trades in tape)
    assert [trades[:common] for trades in tapes[0]] == [trades[:common] for trades in tapes[1]]
    assert [trades[:common] for trades in tapes[0]] != [trades[:common] for trades in tapes[2]]
    assert tapes[0][0][0][1] >= 1000  # ids start at a seeded offset


def test_pause_makes_no_trades_and_books_stay_crossed_free() -> None:
    clock = FakeClock()
    market = Market(["ETH/BTC"], seed=1, trades_per_second=100, clock=clock)
    generate(market, clock, [0.5])
    market.pause()
    generate(market, clock, [10.0])
    market.resume()
    generate(market, clock, [0.5])
    assert market.trades_generated() == {"ETH/BTC": 100}
    times = [t.time for t in market.trades("ETH/BTC")]
    assert times == sorted(times)
    quote = market.quote("ETH/BTC")
    assert quote.bid_ticks < quote.ask_ticks


def test_history_limit_keeps_the_newest_trades() -> None:
    clock = FakeClock()
    market = Market(["BTC/USDT"], seed=1, trades_per_second=100, clock=clock, history_limit=50)
    generate(market, clock, [0.5] * 6)
    kept = market.trades("BTC/USDT")
    assert len(kept) == 50 and market.trades_generated() == {"BTC/USDT": 300}
    assert kept[-1].id - kept[0].id == 49
    stats = market.rolling_stats("BTC/USDT", int(clock.now * 1000))
    assert stats.count == 50 and stats.first_id == kept[0].id
    # The 24 h window follows each forgotten trade out as it goes: its figures are the kept trades'.
    assert (stats.high, stats.low) == (max(t.price_ticks for t in kept), min(t.price_ticks for t in kept))
    assert stats.volume == sum(t.quantity_lots for t in kept)


# -- command line -----------------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_cli_prints_its_address_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulator",
        "--port",
        "0",
        "--symbols",
        "BTC/USDT",
        "--rate",
        "5",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        address = r"simulator listening on (http://127\.0\.0\.1:(\d+)) \(ws://127\.0\.0\.1:\2\)\n"
        match = re.fullmatch(address, line)
        assert match, line
        async with aiohttp.ClientSession() as session, session.get(match[1] + "/api/v3/time") as response:
            assert "serverTime" in await response.json()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
