"""The simulator's Binance USD-M futures dialect, through a real server and real clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from simulator.server import Simulator, SimulatorConfig
from streams.exchanges.base import DataType, Instrument
from streams.exchanges.binance_futures import BinanceFuturesAdapter
from streams.records import Kline, Ticker, Trade
from streams.rest import RestTag

WAIT = 5.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=50, seed=3,
                             venue_symbols={"binance-futures": ["BTC/USDT", "ETH/USDT"], "upbit": ["BTC/KRW"],
                                            "bithumb": ["BTC/KRW"]})  # fmt: skip
    async with Simulator(config) as simulator:
        yield simulator


async def get(simulator: Simulator, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(simulator.url + path) as response:
        return response.status, await response.json(content_type=None)


async def frames(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(count)]


async def subscribe(ws: ClientConnection, streams: list[str], request_id: int = 1) -> None:
    await ws.send(json.dumps({"method": "SUBSCRIBE", "params": streams, "id": request_id}))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        if reply.get("id") == request_id:
            assert reply == {"result": None, "id": request_id}
            return


async def adapter(simulator: Simulator) -> BinanceFuturesAdapter:
    async with (
        aiohttp.ClientSession() as session,
        session.get(simulator.url + "/fapi/v1/exchangeInfo") as response,
    ):
        return BinanceFuturesAdapter(BinanceFuturesAdapter.parse_instruments(await response.read()))


@pytest.mark.e2e
async def test_routed_streams_parse_with_the_adapter(sim: Simulator) -> None:
    parser = await adapter(sim)
    assert set(parser.by_symbol) == {"BTC/USDT", "ETH/USDT"}
    btc = parser.by_symbol["BTC/USDT"]
    market_streams = [parser.stream_name(btc, DataType.parse(t)) for t in ("trade", "kline_1m", "ticker")]
    async with (
        connect(sim.ws_url + "/market/stream", proxy=None) as market,
        connect(sim.ws_url + "/public/stream", proxy=None) as public,
    ):
        await subscribe(market, market_streams)
        await subscribe(public, [parser.stream_name(btc, DataType("bbo"))])
        kinds: dict[str, Any] = {}
        while len(kinds) < 4:
            for frame in await frames(market, 1) + await frames(public, 1):
                assert frame["stream"].split("@")[1] in {"aggTrade", "kline_1m", "ticker", "bookTicker"}
                [record] = parser.parse_frame(json.dumps(frame).encode(), 1)
                kinds[record.type] = record
    assert isinstance(kinds["trade"].data, Trade)
    assert isinstance(kinds["kline"].data, Kline) and kinds["kline"].data.interval == "1m"
    assert isinstance(kinds["ticker"].data, Ticker) and kinds["ticker"].data.bid_price is None
    assert kinds["bbo"].timestamp > 1_600_000_000_000  # futures bookTicker has an event time
    _, stats = await get(sim, "/_sim/stats?exchange=binance-futures")
    assert stats["violations"] == 0


@pytest.mark.e2e
async def test_a_stream_on_the_wrong_route_is_acknowledged_but_silent(sim: Simulator) -> None:
    async with connect(sim.ws_url + "/public/stream", proxy=None) as ws:
        await subscribe(ws, ["btcusdt@aggTrade"])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
    _, stats = await get(sim, "/_sim/stats?exchange=binance-futures")
    assert stats["violationsByReason"]["wrongRoute"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("stream", ["btcusdt@trade", "btcusdt@kline_1s", "btcusdt@depthfoo"])
async def test_spot_only_streams_are_invalid(sim: Simulator, stream: str) -> None:
    async with connect(sim.ws_url + "/market/ws", proxy=None) as ws:
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 9}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert reply == {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 9}


@pytest.mark.e2e
async def test_ten_messages_a_second_are_allowed_the_eleventh_closes(sim: Simulator) -> None:
    async with connect(sim.ws_url + "/market/ws", proxy=None) as ws:
        for n in range(10):
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": n}))
        assert [json.loads(await ws.recv())["id"] for _ in range(10)] == list(range(10))
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 10}))
        await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1008


@pytest.mark.e2e
async def test_rest_agg_trades_backfill_matches_the_stream_and_the_ground_truth(sim: Simulator) -> None:
    parser = await adapter(sim)
    btc = parser.by_symbol["BTC/USDT"]
    async with connect(sim.ws_url + "/market/stream", proxy=None) as ws:
        await subscribe(ws, ["btcusdt@aggTrade"])
        live = [json.loads(await asyncio.wait_for(ws.recv(), WAIT))["data"] for _ in range(20)]
    request = parser.trades_request(btc, live[0]["a"], 20)
    status, body = await get(
        sim, f"{request.path}?" + "&".join(f"{k}={v}" for k, v in request.params.items())
    )
    assert status == 200
    records = parser.parse_rest(RestTag("trades", "BTCUSDT", None), json.dumps(body).encode(), 1)
    assert [r.data.trade_id for r in records] == [str(t["a"]) for t in live]  # type: ignore[union-attr]
    assert [r.data.price for r in records] == [t["p"] for t in live]  # type: ignore[union-attr]
    _, truth = await get(
        sim, f"/_sim/trades?exchange=binance-futures&symbol=BTCUSDT&fromId={live[0]['a']}&limit=20"
    )
    assert truth == body
    status, klines = await get(sim, "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=2")
    # the newest bar may have opened a moment ago and hold no trade yet
    assert status == 200 and sum(Decimal(k[5]) for k in klines) > 0


@pytest.mark.e2e
async def test_exchange_info_lists_perpetuals_with_their_assets(sim: Simulator) -> None:
    status, info = await get(sim, "/fapi/v1/exchangeInfo")
    assert status == 200
    assert [(s["symbol"], s["contractType"], s["baseAsset"], s["quoteAsset"]) for s in info["symbols"]] == [
        ("BTCUSDT", "PERPETUAL", "BTC", "USDT"),
        ("ETHUSDT", "PERPETUAL", "ETH", "USDT"),
    ]
    assert BinanceFuturesAdapter.parse_instruments(json.dumps(info).encode())[0] == Instrument(
        "BTC/USDT", "BTCUSDT", "BTC", "USDT"
    )
