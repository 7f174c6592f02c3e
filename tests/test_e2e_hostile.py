"""End to end with hostile frames: the simulator injects garbage into a running worker's connections.

Non-UTF-8 (text and binary frames), a multi-MB frame, deeply nested JSON, wrong types, unknown event
types and values that break validation rules are sent while trades flow. The worker must stay up,
dead-letter each bad frame with the right reason, drop a replayed trade as a duplicate, and deliver
every generated trade exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from agents.embedded_broker import EmbeddedBroker
from agents.normalize import MAX_DEAD_LETTER_FRAME
from simulator.server import Simulator as InProcessSimulator
from simulator.server import SimulatorConfig
from streams.deadletter import decode_dead_letter
from streams.events import decode_event
from streams.records import decode_record
from tests.harness import Simulator, TopicReader, Worker, trades_made_until, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
EXCHANGE_SYMBOLS = {"BTC/USDT": "BTCUSDT", "ETH/USDT": "ETHUSDT"}
TRADES_PER_SYMBOL = 120
HUGE_BYTES = 4 * 1024 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def hostile_frames() -> list[tuple[str, bytes, bool, str]]:
    """(name, payload, as a binary frame, expected dead-letter reason)."""
    stamp = now_ms()
    trade = {"e": "trade", "E": stamp, "s": "BTCUSDT", "t": 10**15, "p": "1.5", "q": "2", "T": stamp,
             "m": False, "M": True}  # fmt: skip

    def on_trade_stream(data: Any) -> bytes:
        return json.dumps({"stream": "btcusdt@trade", "data": data}, separators=(",", ":")).encode()

    huge = b'{"stream":"btcusdt@trade","data":"' + b"x" * HUGE_BYTES + b'"}'
    return [
        ("non-utf8-binary", b"\xff\xfe\x00\x81hostile\xc3\x28", True, "invalid-json"),
        ("non-utf8-inside-text", on_trade_stream({**trade, "s": "BTC"}).replace(b"BTC", b"BT\xff", 1), False,
         "invalid-json"),
        ("huge", huge, False, "schema-mismatch"),
        ("deeply-nested", b'{"x":' * 200_000 + b"1" + b"}" * 200_000, False, "invalid-json"),
        ("deeply-nested-list", b"[" * 200_000 + b"]" * 200_000, True, "schema-mismatch"),
        ("wrong-type-price", on_trade_stream({**trade, "p": 1.5}), False, "schema-mismatch"),
        ("wrong-type-id", on_trade_stream({**trade, "t": "ten"}), False, "schema-mismatch"),
        ("unknown-event-type", json.dumps({"e": "marginCall", "E": stamp}).encode(), False, "unknown-event"),
        ("unknown-stream", json.dumps({"stream": "btcusdt@weird", "data": {}}).encode(), False,
         "unknown-stream"),
        ("negative-price", on_trade_stream({**trade, "p": "-1.5"}), False, "invalid-price"),
        ("from-the-future", on_trade_stream({**trade, "E": stamp + 3_600_000}), False,
         "implausible-timestamp"),
        ("crossed-book", json.dumps({"stream": "btcusdt@bookTicker", "data": {
            "u": 5, "s": "BTCUSDT", "b": "101", "B": "1", "a": "100", "A": "1"}}).encode(), False,
         "crossed-book"),
    ]  # fmt: skip


def inject(simulator: Simulator, payload: bytes, binary: bool = False) -> int:
    body = {"data": base64.b64encode(payload).decode(), "binary": binary, "stream": "btcusdt@trade"}
    return int(simulator.post("/_sim/inject", body)["sent"])


def _generated(simulator: Simulator) -> dict[str, int]:
    return simulator.get("/_sim/stats")["tradesGenerated"]


def test_hostile_frames_are_dead_lettered_and_no_trade_is_lost(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    simulator = Simulator(SYMBOLS, rate=40)
    before = simulator.post("/_sim/pause")["tradesGenerated"]
    worker = Worker(
        write_config(tmp_path / "c.yaml", simulator, SYMBOLS, ["trade"]), broker.bootstrap, tmp_path
    )
    reader = TopicReader(broker.bootstrap)
    try:
        worker.wait_ready()
        wait_for(lambda: len(simulator.get("/_sim/stats")["subscriptions"]) >= 1
                 and sum(map(len, simulator.get("/_sim/stats")["subscriptions"].values())) == 2,
                 30, "both trade streams subscribed")  # fmt: skip
        simulator.post("/_sim/resume")
        wait_for(lambda: all(n > before[s] for s, n in _generated(simulator).items()), 30, "first trades")

        frames = hostile_frames()
        for _, payload, binary, _ in frames:
            assert inject(simulator, payload, binary) == 1
        # Replay a trade the worker has already published: a duplicate, dropped without a dead letter.
        published = wait_for(lambda: _published_ids(reader, "BTC/USDT"), 30, "a published BTC trade")
        replayed = min(published, key=int)
        truth_row = simulator.get(f"/_sim/trades?symbol=BTCUSDT&fromId={replayed}&limit=1")[0]
        replay = json.dumps({"stream": "btcusdt@trade", "data": {
            "e": "trade", "E": now_ms(), "s": "BTCUSDT", "t": truth_row["id"], "p": truth_row["price"],
            "q": truth_row["qty"], "T": truth_row["time"], "m": truth_row["isBuyerMaker"], "M": True,
        }}).encode()  # fmt: skip
        assert inject(simulator, replay) == 1

        truth = trades_made_until(simulator, before, TRADES_PER_SYMBOL, EXCHANGE_SYMBOLS)
        expected_total = sum(len(rows) for rows in truth.values())

        def delivered() -> int:
            reader.follow("market.")
            reader.follow("deadletter.")
            reader.follow("collector.events")
            reader.poll(0.3)
            return sum(len(r) for t, r in reader.records.items() if t.startswith("market.trade."))

        wait_for(lambda: delivered() >= expected_total, 60, f"{expected_total} trades in Kafka")
        wait_for(lambda: delivered() and len(reader.records.get("deadletter.binance", [])) >= len(frames),
                 30, "every dead letter")  # fmt: skip
        reader.poll(1.0)  # anything beyond the expected counts would be a duplicate: read it too

        assert worker.process.poll() is None, "the worker died"
        for symbol in SYMBOLS:
            records = [decode_record(m.value()) for m in reader.records.get(_topic(symbol), [])]
            ids = Counter(r.data.trade_id for r in records)  # type: ignore[union-attr]
            assert not [i for i, n in ids.items() if n > 1], f"{symbol}: duplicates"
            assert set(ids) == {str(row["id"]) for row in truth[symbol]}, f"{symbol}: lost or foreign trades"

        letters = [decode_dead_letter(m.value()) for m in reader.records["deadletter.binance"]]
        assert Counter(d.reason for d in letters) == Counter(reason for *_, reason in frames)
        by_frame = {(d.frame.encode() if d.frame is not None else base64.b64decode(d.frame_base64 or "")): d
                    for d in letters}  # fmt: skip
        for name, payload, _, reason in frames:
            kept = payload[:MAX_DEAD_LETTER_FRAME]  # a huge frame's dead letter keeps its beginning
            assert kept in by_frame, f"{name} not dead-lettered with its bytes"
            assert by_frame[kept].reason == reason, name
        events = [decode_event(m.value()) for m in reader.records.get("collector.events", [])]
        assert not [e for e in events if e.type == "gap"], "a gap was reported in a lossless stream"
        assert [e.type for e in events].count("disconnected") == 0, "hostile frames cost a connection"
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert code == 0, worker.log()[-3000:]
    assert "Traceback" not in worker.log(), worker.log()[-5000:]


def _topic(symbol: str) -> str:
    return f"market.trade.binance.{symbol.replace('/', '-').lower()}"


def _published_ids(reader: TopicReader, symbol: str) -> set[str]:
    reader.follow("market.")
    reader.poll(0.2)
    return {decode_record(m.value()).data.trade_id for m in reader.records.get(_topic(symbol), [])}  # type: ignore[union-attr]


def test_inject_sends_the_bytes_untouched_as_text_or_binary_to_subscribers() -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            config = SimulatorConfig(symbols=["BTC/USDT"], trades_per_second=0.001)
            sim = await stack.enter_async_context(InProcessSimulator(config))
            subscribed = await stack.enter_async_context(
                websockets.connect(f"{sim.ws_url}/stream", max_size=None)
            )
            other = await stack.enter_async_context(websockets.connect(f"{sim.ws_url}/stream", max_size=None))
            http = await stack.enter_async_context(aiohttp.ClientSession())
            await subscribed.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 1}))
            assert json.loads(await subscribed.recv()) == {"result": None, "id": 1}

            async def post(body: Any) -> tuple[int, Any]:
                async with http.post(f"{sim.url}/_sim/inject", json=body) as response:
                    return response.status, await response.json()

            payload = b"\xff\xfe binary"
            assert await post({"data": base64.b64encode(payload).decode(), "binary": True}) == (
                200,
                {"sent": 2},
            )
            assert await subscribed.recv(decode=False) == payload
            assert await other.recv(decode=False) == payload
            big = b"[" + b"1," * 1_000_000 + b"1]"  # larger than aiohttp's default 1 MB request body
            status, body = await post({"data": base64.b64encode(big).decode(), "stream": "btcusdt@trade"})
            assert (status, body) == (200, {"sent": 1})
            assert await subscribed.recv(decode=False) == big
            assert sim.binance.inject(b"x", stream="ethusdt@trade") == 0
            for bad in ({}, {"data": "not base64!"}, {"data": "eA==", "binary": "yes"}, [1]):
                status, body = await post(bad)
                assert status == 400 and "error" in body

    asyncio.run(asyncio.wait_for(scenario(), 20))
