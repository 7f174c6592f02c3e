"""The simulator's Upbit dialect (and the Bithumb one that shares it), through a real server and clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from agents.connection import Link
from simulator.limits import GroupRateLimit
from simulator.server import Simulator, SimulatorConfig
from simulator.upbit import BITHUMB, UPBIT
from streams.exchanges.base import DataType
from streams.exchanges.bithumb import BithumbAdapter
from streams.exchanges.upbit import UpbitAdapter
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.rest import RestTag

WAIT = 5.0
ADAPTERS = {"upbit": UpbitAdapter, "bithumb": BithumbAdapter}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=40, seed=5,
                             venue_symbols={"binance-futures": ["BTC/USDT"], "upbit": ["BTC/KRW", "ETH/KRW"],
                                            "bithumb": ["BTC/KRW", "ETH/KRW"]})  # fmt: skip
    async with Simulator(config) as simulator:
        yield simulator


async def get(simulator: Simulator, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(simulator.url + path) as response:
        return response.status, await response.read()


async def adapter_for(simulator: Simulator, exchange: str) -> UpbitAdapter:
    adapter_type = ADAPTERS[exchange]
    status, body = await get(simulator, f"/{exchange}{adapter_type.instruments_path}")
    assert status == 200
    return adapter_type(adapter_type.parse_instruments(body))


async def receive(ws: ClientConnection) -> bytes:
    frame = await asyncio.wait_for(ws.recv(decode=False), WAIT)
    assert isinstance(frame, bytes)
    return frame


def ws(simulator: Simulator, exchange: str) -> connect:
    return connect(f"{simulator.ws_url}/{exchange}/websocket/v1", proxy=None, open_timeout=WAIT)


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["upbit", "bithumb"])
async def test_every_data_type_arrives_as_binary_frames_the_adapter_reads(
    sim: Simulator, exchange: str
) -> None:
    adapter = await adapter_for(sim, exchange)
    btc = adapter.by_symbol["BTC/KRW"]
    streams = [adapter.stream_name(btc, DataType.parse(t)) for t in ("trade", "ticker", "bbo")]
    if adapter.supports(DataType.parse("kline_1s")):
        streams.append(adapter.stream_name(btc, DataType.parse("kline_1s")))
    wanted = {"trade": Trade, "ticker": Ticker, "bbo": Bbo} | (
        {"kline": Kline} if exchange == "upbit" else {})  # fmt: skip
    seen: dict[str, Any] = {}
    async with ws(sim, exchange) as client:
        await client.send(adapter.subscribe_message(streams, 1).decode())
        while set(seen) != set(wanted):
            frame = await receive(client)  # every frame is binary
            for record in adapter.parse_frame(frame, 1):
                if isinstance(record, MarketRecord):  # an orderbook is also a DepthBook (depth)
                    seen[record.type] = record
    for kind, data_class in wanted.items():
        assert isinstance(seen[kind].data, data_class) and seen[kind].symbol == "BTC/KRW"
    if exchange == "bithumb":
        assert len(seen["bbo"].data.update_id) == 16  # the µs timestamp string


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["upbit", "bithumb"])
async def test_a_request_replaces_the_whole_set(sim: Simulator, exchange: str) -> None:
    async with ws(sim, exchange) as client:
        await client.send(json.dumps([{"ticket": "a"}, {"type": "trade", "codes": ["KRW-BTC", "KRW-ETH"]}]))
        codes = {json.loads(await receive(client))["code"] for _ in range(30)}
        assert codes == {"KRW-BTC", "KRW-ETH"}
        await client.send(json.dumps([{"ticket": "b"}, {"type": "trade", "codes": ["KRW-ETH"],
                                                         "is_only_realtime": True}]))  # fmt: skip
        stats = json.loads((await get(sim, f"/_sim/stats?exchange={exchange}"))[1])
        while list(stats["subscriptions"].values()) != [["trade:KRW-ETH"]]:
            await asyncio.sleep(0.02)
            stats = json.loads((await get(sim, f"/_sim/stats?exchange={exchange}"))[1])
        # Frames queued before the new request may still arrive; after a few, only KRW-ETH remains.
        later = [json.loads(await receive(client))["code"] for _ in range(40)]
        assert later[-10:] == ["KRW-ETH"] * 10


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("request_text", "name"),
    [
        ("not json", "WRONG_FORMAT"),
        ('{"ticket":"x"}', "WRONG_FORMAT"),
        ('[{"type":"trade","codes":["KRW-BTC"]}]', "NO_TICKET"),
        ('[{"ticket":"x"},{"format":"DEFAULT"}]', "NO_TYPE"),
        ('[{"ticket":"x"},{"type":"trade","codes":[]}]', "NO_CODES"),
        ('[{"ticket":"x"},{"type":"trade","codes":["KRW-DOGE"]}]', "INVALID_PARAM"),
        ('[{"ticket":"x"},{"type":"depth","codes":["KRW-BTC"]}]', "INVALID_PARAM"),
    ],
)
async def test_bad_requests_get_named_errors(sim: Simulator, request_text: str, name: str) -> None:
    adapter = await adapter_for(sim, "upbit")
    async with ws(sim, "upbit") as client:
        await client.send(request_text)
        frame = await receive(client)
        assert json.loads(frame)["error"]["name"] == name
        [event] = adapter.control_events(frame)
        assert event.message.startswith(name)  # type: ignore[union-attr]


@pytest.mark.e2e
async def test_ping_gets_status_up_and_an_idle_connection_is_closed(sim: Simulator) -> None:
    upbit = sim.venues["upbit"]
    upbit.idle_timeout = 0.6
    upbit._next_housekeeping = 0.0
    async with ws(sim, "upbit") as client:
        await client.send("PING")
        assert json.loads(await receive(client)) == {"status": "UP"}
    async with ws(sim, "upbit") as idle:
        await asyncio.wait_for(idle.wait_closed(), WAIT)
    stats = json.loads((await get(sim, "/_sim/stats?exchange=upbit"))[1])
    assert stats["idleCloses"] >= 1


@pytest.mark.e2e
async def test_more_than_five_requests_a_second_close_the_connection(sim: Simulator) -> None:
    async with ws(sim, "upbit") as client:
        for n in range(6):
            await client.send(json.dumps([{"ticket": str(n)}, {"type": "ticker", "codes": ["KRW-BTC"]}]))
        await asyncio.wait_for(client.wait_closed(), WAIT)
        assert client.close_code == 1008


@pytest.mark.e2e
@pytest.mark.parametrize("exchange", ["upbit", "bithumb"])
async def test_rest_ticks_page_back_by_cursor_and_match_the_stream(sim: Simulator, exchange: str) -> None:
    adapter = await adapter_for(sim, exchange)
    btc = adapter.by_symbol["BTC/KRW"]
    async with ws(sim, exchange) as client:
        await client.send(json.dumps([{"ticket": "t"}, {"type": "trade", "codes": ["KRW-BTC"],
                                                         "is_only_realtime": True}]))  # fmt: skip
        live = [adapter.parse_frame(await receive(client), 1)[0] for _ in range(30)]
    first = adapter.trades_request(btc, None, 500)
    status, body = await get(sim, f"/{exchange}{first.path}?market=KRW-BTC&count=500")
    assert status == 200
    newest = json.loads(body)
    assert [t["timestamp"] for t in newest] == sorted((t["timestamp"] for t in newest), reverse=True)
    cursor = newest[9]["sequential_id"]
    _, older = await get(sim, f"/{exchange}{first.path}?market=KRW-BTC&count=5&cursor={cursor}")
    assert [t["sequential_id"] for t in json.loads(older)] == [t["sequential_id"] for t in newest[10:15]]
    records = adapter.parse_rest(RestTag("trades", "KRW-BTC", None), body, 1)
    by_id = {r.data.trade_id: r.data for r in records}  # type: ignore[union-attr]
    for record in live:
        assert by_id[record.data.trade_id] == record.data  # type: ignore[union-attr]
    _, truth = await get(sim, f"/_sim/trades?exchange={exchange}&symbol=KRW-BTC")
    truth_ids = {str(t["sequential_id"]) for t in json.loads(truth, parse_float=Decimal)}
    assert {r.data.trade_id for r in live} <= truth_ids  # type: ignore[union-attr]
    if exchange == "bithumb":
        assert all(isinstance(t["sequential_id"], str) for t in newest)
    else:
        assert all(isinstance(t["sequential_id"], int) for t in newest)
    status, tickers = await get(sim, f"/{exchange}/v1/ticker?markets=KRW-BTC")
    assert status == 200
    [ticker] = adapter.parse_rest(RestTag("ticker", "KRW-BTC", None), tickers, 1)
    assert Decimal(ticker.data.last) > 0  # type: ignore[union-attr]
    _, both = await get(sim, f"/{exchange}/v1/ticker?markets=KRW-BTC,KRW-ETH")
    assert [row["market"] for row in json.loads(both)] == ["KRW-BTC", "KRW-ETH"]


class _QuickKeepalive(UpbitAdapter):
    keepalive = (0.2, b"PING")


@pytest.mark.e2e
async def test_the_collectors_link_sends_whole_sets_and_keeps_the_connection_alive(sim: Simulator) -> None:
    """agents.connection.Link honours Upbit's traits: no acks, whole-set requests, text PING keepalive."""
    adapter = _QuickKeepalive((await adapter_for(sim, "upbit")).instruments.values())
    events: list[str] = []

    async def send_raw(key: str, value: bytes) -> None:
        pass

    async def emit(kind: str, detail: dict[str, Any], connection_id: str | None = None) -> None:
        events.append(kind)

    link = Link(adapter, f"{sim.ws_url}/upbit/websocket/v1", "upbit-test", "upbit-0", send_raw, emit,
                silence_timeout=5.0)  # fmt: skip
    await link.open()

    async def subscriptions() -> list[list[str]]:
        return list(json.loads((await get(sim, "/_sim/stats?exchange=upbit"))[1])["subscriptions"].values())

    try:
        assert await link.subscribe(["trade:KRW-BTC", "ticker:KRW-BTC"])  # settled without any ack
        assert await subscriptions() == [["ticker:KRW-BTC", "trade:KRW-BTC"]]
        assert await link.subscribe(["trade:KRW-ETH"])  # the request names the old streams too
        assert sorted((await subscriptions())[0]) == ["ticker:KRW-BTC", "trade:KRW-BTC", "trade:KRW-ETH"]
        assert await link.unsubscribe(["ticker:KRW-BTC"])  # no unsubscribe: the remaining set instead
        assert sorted((await subscriptions())[0]) == ["trade:KRW-BTC", "trade:KRW-ETH"]
        assert link.subscribed == {"trade:KRW-BTC", "trade:KRW-ETH"}

        async def status_replies() -> int:
            stats = json.loads((await get(sim, "/_sim/stats?exchange=upbit"))[1])
            return int(stats["framesSent"].get("status", 0))

        for _ in range(100):
            if await status_replies() >= 2:
                break
            await asyncio.sleep(0.05)
        assert await status_replies() >= 2  # each PING the link sent was answered {"status":"UP"}
    finally:
        await link.close()
    assert "subscribe-requested" in events


@pytest.mark.e2e
async def test_rest_candles_match_the_streamed_bar(sim: Simulator) -> None:
    adapter = await adapter_for(sim, "upbit")
    btc = adapter.by_symbol["BTC/KRW"]
    async with ws(sim, "upbit") as client:
        await client.send(
            adapter.subscribe_message([adapter.stream_name(btc, DataType.parse("kline_1m"))], 1).decode()
        )
        [streamed] = adapter.parse_frame(await receive(client), 1)  # the current bar, once it has trades
    request = adapter.klines_request(btc, "1m", 0, 5)
    status, body = await get(sim, f"/upbit{request.path}?market=KRW-BTC&count=5")
    assert status == 200
    records = adapter.parse_rest(RestTag("klines", "KRW-BTC", "1m"), body, 1)
    assert records and records[-1].data.start_time == streamed.data.start_time  # type: ignore[union-attr]
    assert Decimal(records[-1].data.volume) >= Decimal(streamed.data.volume)  # type: ignore[union-attr]
    status, _ = await get(sim, "/bithumb/v1/candles/minutes/1?market=KRW-BTC")
    assert status == 404  # Bithumb's candles are not simulated (its WebSocket has none)


@pytest.mark.e2e
async def test_streamed_candles_close_with_the_bars_final_state(sim: Simulator) -> None:
    """Candles have no closed flag: the adapter closes a bar when the next starts. The simulator pushes
    a bar's final state as the next bar starts, so the closing record equals the REST candle."""
    adapter = await adapter_for(sim, "upbit")
    btc = adapter.by_symbol["BTC/KRW"]
    closed = []
    async with ws(sim, "upbit") as client:
        await client.send(
            adapter.subscribe_message([adapter.stream_name(btc, DataType.parse("kline_1s"))], 1).decode()
        )
        while len(closed) < 2:
            closed += [r for r in adapter.parse_frame(await receive(client), 1) if r.data.closed]  # type: ignore[union-attr]
    status, body = await get(sim, "/upbit/v1/candles/seconds?market=KRW-BTC&count=30")
    assert status == 200
    rest = {
        r.data.start_time: r.data for r in adapter.parse_rest(RestTag("klines", "KRW-BTC", "1s"), body, 1)
    }  # type: ignore[union-attr]
    for record in closed:
        bar = record.data
        final = rest[bar.start_time]  # type: ignore[union-attr]
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == (  # type: ignore[union-attr]
            final.open,
            final.high,
            final.low,
            final.close,
            final.volume,
        )


# -- REST limits, enforced the way Upbit does --------------------------------------------------------


async def _concurrent_gets(
    simulator: Simulator, path: str, count: int
) -> list[tuple[int, dict[str, str], bytes]]:
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, dict[str, str], bytes]:
            async with session.get(simulator.url + path) as response:
                return response.status, dict(response.headers), await response.read()

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.e2e
async def test_upbit_rest_allows_ten_a_second_per_group_then_429_without_retry_after_then_418(
    sim: Simulator,
) -> None:
    answers = await _concurrent_gets(sim, "/upbit/v1/trades/ticks?market=KRW-BTC", 11)
    served = [headers for status, headers, _ in answers if status == 200]
    [(status, headers, body)] = [answer for answer in answers if answer[0] != 200]
    assert len(served) == 10 and status == 429
    assert sorted(h["Remaining-Req"] for h in served) == [
        f"group=trade; min=1800; sec={n}" for n in range(10)
    ]
    assert "Retry-After" not in headers and headers["Remaining-Req"] == "group=trade; min=1800; sec=0"
    assert json.loads(body)["error"]["name"] == "too_many_requests"
    status, body = await get(sim, "/upbit/v1/ticker?markets=KRW-BTC")  # another group has its own count
    assert status == 200
    # A client that keeps going is banned: 418, with the block time in the message.
    async with aiohttp.ClientSession() as session:
        limits = {"restPerSecond": 1, "restBanAfter": 2, "restBanSeconds": 30}
        async with session.post(f"{sim.url}/_sim/faults/limits?exchange=upbit", json=limits) as response:
            assert (await response.json())["restLimits"]["restBanAfter"] == 2
    answers = await _concurrent_gets(sim, "/upbit/v1/candles/minutes/1?market=KRW-BTC", 4)
    assert sorted(status for status, _, _ in answers) == [200, 418, 418, 429]
    banned = next(body for status, _, body in answers if status == 418)
    assert "blocked for 30 seconds" in json.loads(banned)["error"]["message"]
    stats = json.loads((await get(sim, "/_sim/stats?exchange=upbit"))[1])
    assert stats["violationsByReason"]["restRate"] == 2 and stats["violationsByReason"]["restDuringBan"] == 2
    assert stats["violations"] == 4 and stats["rest"]["rejected"] == 4
    assert list(stats["faults"]["violations"].values()) == [0, 0]


def test_a_group_rate_limit_counts_per_client_and_group_and_bans_after_repeated_refusals() -> None:
    limit = GroupRateLimit(2, ban_after=3, ban_seconds=10.0)
    assert [limit.check("a", "trade", 0.0).remaining for _ in range(2)] == [1, 0]
    assert limit.check("a", "trade", 0.5).outcome == "over"
    assert limit.check("a", "ticker", 0.5).outcome == "ok"  # another group
    assert limit.check("b", "trade", 0.5).outcome == "ok"  # another client
    # A second later the two calls left the window; the refused one never took a place in it.
    assert [limit.check("a", "trade", 1.0).outcome for _ in range(3)] == ["ok", "ok", "over"]
    assert limit.check("a", "trade", 1.1).outcome == "over"  # third refusal within a minute: banned
    verdict = limit.check("a", "ticker", 1.2)
    assert (verdict.outcome, verdict.ban_left) == ("banned", pytest.approx(9.9))
    assert limit.banned(1.2) == {"a": pytest.approx(9.9)}
    assert limit.check("a", "ticker", 11.1).outcome == "ok"  # the ban is over
    limit.check("a", "trade", 11.2), limit.check("a", "trade", 11.2)
    limit.clear()
    assert limit.check("a", "trade", 11.3).outcome == "over" and not limit.banned(11.3)


def test_upbit_and_bithumb_rest_limits_are_the_documented_ones() -> None:
    assert (UPBIT.rest_per_second, BITHUMB.rest_per_second) == (10, 150)
    assert (UPBIT.rest_ban_status, BITHUMB.rest_ban_status) == (418, 429)
    assert (UPBIT.remaining_req_header, BITHUMB.remaining_req_header) == (True, False)
    assert dict(BITHUMB.rest_groups) == {"market": "other"}
