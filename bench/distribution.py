"""The distribution step of `make bench`: one worker collecting N symbols at a rate, with WebSocket
clients on `/ws/exchange` (by default 200 filtered to one symbol each, 5 on the full stream).

The clients run in a child process (aiohttp, so their frame parsing is C) and note for every data
message its symbol, trade id and when it arrived. Afterwards every market topic is read back with
each record's Kafka timestamp (CreateTime: the producer stamps it when the worker hands the record
over), which gives the latency from that timestamp to each client's receipt. The worker's CPU is
measured twice, before the clients connect (collection alone) and while they are served; the
difference per delivered message is what distribution costs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import EmbeddedBroker
from bench.procfs import CpuMeter
from bench.reader import MarketReader, create_topics
from bench.step import bench_symbols, percentiles
from streams.topics import market_topic
from tests.harness import Simulator, Worker, wait_for, write_config


class _TradeData(msgspec.Struct):
    tradeId: str


class _Trade(msgspec.Struct):
    symbol: str
    data: _TradeData


_decode = msgspec.json.Decoder(_Trade).decode


@dataclass
class ClientResult:
    symbol: str | None  # None: the full stream
    subscribed_at: int  # epoch ms when its `subscribed` reply arrived
    received: list[tuple[str, str, int]]  # (symbol, trade id, epoch ms received)
    close_code: int | None


@dataclass
class DistributionResult:
    symbols: int
    target_rate: int
    filtered_clients: int
    full_clients: int
    delivered_rate: float  # data messages all clients received per second in the window
    worker_cpu_alone: float  # % of a core, collection only
    worker_cpu_serving: float  # % of a core, collection and distribution
    broker_cpu_alone: float
    broker_cpu_serving: float
    clients_cpu: float  # the client process
    latency: dict[str, float]  # Kafka timestamp → client receipt, ms
    client_missing: int  # records appended after a client's subscription that it never got
    client_duplicates: int
    clients_dropped: int
    collector_lost: int  # trades the simulator sent that are not in Kafka
    sent_total: int
    load_average: float

    @property
    def distribution_us_per_message(self) -> float:
        extra = self.worker_cpu_serving - self.worker_cpu_alone
        return extra * 1e4 / self.delivered_rate if self.delivered_rate else 0.0

    @property
    def worker_us_per_message(self) -> float:
        return self.worker_cpu_serving * 1e4 / self.delivered_rate if self.delivered_rate else 0.0


# ---- the clients' process --------------------------------------------------------------------------------


def _clients_process(base_url: str, wanted: list[str | None], pipe: Connection) -> None:
    asyncio.run(_run_clients(base_url, wanted, pipe))


async def _run_clients(base_url: str, wanted: list[str | None], pipe: Connection) -> None:
    results = [ClientResult(symbol, 0, [], None) for symbol in wanted]
    subscribed = 0
    all_subscribed = asyncio.Event()

    async def client(session: aiohttp.ClientSession, result: ClientResult) -> None:
        nonlocal subscribed
        query = f"?types=trade&symbols={result.symbol}" if result.symbol else "?types=trade"
        async with session.ws_connect(base_url + query, max_msg_size=0, heartbeat=None) as ws:
            received = result.received
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                now = time.time_ns() // 1_000_000
                data = message.data
                if data.startswith('{"op"'):
                    if not result.subscribed_at:
                        result.subscribed_at = now
                        subscribed += 1
                        if subscribed == len(results):
                            all_subscribed.set()
                    continue
                trade = _decode(data)
                received.append((trade.symbol, trade.data.tradeId, now))
            result.close_code = ws.close_code

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.ensure_future(client(session, r)) for r in results]
        await asyncio.wait_for(all_subscribed.wait(), 60)
        pipe.send("subscribed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pipe.recv)  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(results)


# ---- the step -----------------------------------------------------------------------------------------


def run_distribution_step(
    symbols: int = 100, rate: int = 5000, filtered_clients: int = 200, full_clients: int = 5,
    warmup: float = 4.0, baseline: float = 8.0, duration: float = 12.0, log_dir: Path | None = None,
) -> DistributionResult:  # fmt: skip
    names = bench_symbols(symbols)
    topics = [market_topic("trade", "binance", name) for name in names]
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="collector-bench-distribution-"))
    wanted: list[str | None] = [names[i % symbols] for i in range(filtered_clients)]
    wanted += [None] * full_clients
    context = multiprocessing.get_context("spawn")
    with EmbeddedBroker() as broker:
        create_topics(broker.bootstrap, topics)
        live = MarketReader(broker.bootstrap, topics[:1], fetch_wait_ms=100)
        simulator = Simulator(names, rate=rate / symbols, seed=11, extra=["--history-limit", "1000"])
        worker: Worker | None = None
        clients: Any = None
        ours, theirs = context.Pipe()
        try:
            config = write_config(
                log_dir / f"distribution-{symbols}-{rate}.yaml", simulator, names, ["trade"],
                kafka={"brokers": [broker.bootstrap]}, logging={"level": "info", "format": "json"},
            )  # fmt: skip
            worker = Worker(config, broker.bootstrap, log_dir, "distribution")
            worker.wait_ready(90)
            wait_for(lambda: live.poll(0.2) > 0, 120, "the first market records")
            live.close()
            time.sleep(warmup)  # the rate settles before the baseline is measured

            alone = _measure(worker, broker, None, baseline)
            clients = context.Process(
                target=_clients_process,
                args=(f"ws://127.0.0.1:{worker.port}/ws/exchange", wanted, theirs),
                daemon=True,
            )
            clients.start()
            if not ours.poll(90) or ours.recv() != "subscribed":
                raise RuntimeError("the clients did not all subscribe in 90 s")
            time.sleep(1.0)  # the feed's first fetches of every topic are done
            start = time.time()
            serving = _measure(worker, broker, clients.pid, duration)
            end = time.time()
            load = os.getloadavg()[0]

            simulator.post("/_sim/pause")
            sent_total = simulator.get("/_sim/stats")["framesSent"].get("trade", 0)
            time.sleep(3.0)  # what is in flight reaches Kafka and the clients
            status, health = worker.request("/api/ws/infra-health")
            dropped = health.get("clientsDropped", 0) if status in (200, 503) else -1
            ours.send("stop")
            if not ours.poll(120):
                raise RuntimeError("the clients did not report")
            results: list[ClientResult] = ours.recv()
            stamped = _read_back(broker.bootstrap, topics)
        finally:
            if clients is not None:
                clients.join(timeout=10)
                if clients.is_alive():
                    clients.kill()
            if worker is not None:
                worker.stop()
            simulator.stop()

    start_ms, end_ms = int(start * 1000), int(end * 1000)
    by_symbol: dict[str, list[tuple[tuple[str, str], int]]] = {}
    for key, created in stamped.items():
        by_symbol.setdefault(key[0], []).append((key, created))
    latencies, in_window, missing, duplicates = [], 0, 0, 0
    for result in results:
        got: set[tuple[str, str]] = set()
        for symbol, trade_id, received_at in result.received:
            key = (symbol, trade_id)
            if key in got:
                duplicates += 1
            got.add(key)
            if start_ms <= received_at < end_ms:
                in_window += 1
                created = stamped.get(key)
                if created is not None:
                    latencies.append(received_at - created)
        # Appended after its subscription took effect (CreateTime is at or before the append).
        mine = by_symbol.get(result.symbol, []) if result.symbol else stamped.items()
        expected = {key for key, created in mine if created > result.subscribed_at}
        missing += len(expected - got)
    return DistributionResult(
        symbols=symbols, target_rate=rate, filtered_clients=filtered_clients, full_clients=full_clients,
        delivered_rate=in_window / (end - start),
        worker_cpu_alone=alone[0], worker_cpu_serving=serving[0],
        broker_cpu_alone=alone[1], broker_cpu_serving=serving[1], clients_cpu=serving[2],
        latency=percentiles(latencies), client_missing=missing, client_duplicates=duplicates,
        clients_dropped=dropped, collector_lost=max(0, sent_total - len(stamped)), sent_total=sent_total,
        load_average=load,
    )  # fmt: skip


def _measure(worker: Worker, broker: EmbeddedBroker, clients_pid: int | None, seconds: float) -> list[float]:
    """CPU % of one core of the worker, the broker and the clients' process over `seconds`."""
    meters = [CpuMeter(worker.process.pid), CpuMeter(broker.pid or 0)]
    if clients_pid is not None:
        meters.append(CpuMeter(clients_pid))
    began = time.time()
    for meter in meters:
        meter.start(began)
    time.sleep(seconds)
    ended = time.time()
    found = [meter.percent(ended) for meter in meters]
    return found + [0.0] * (3 - len(found))


def _read_back(bootstrap: str, topics: list[str]) -> dict[tuple[str, str], int]:
    """(symbol, trade id) → Kafka timestamp of every trade in the topics."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-distribution-{time.monotonic_ns()}",
        "enable.auto.commit": False, "fetch.wait.max.ms": 100,
    })  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, 0) for topic in topics])
    stamped: dict[tuple[str, str], int] = {}
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < 3.0:
            messages = consumer.consume(num_messages=20000, timeout=0.2)
            if messages:
                quiet_since = time.monotonic()
            for message in messages:
                if message.error():
                    continue
                trade = _decode(message.value() or b"")
                stamped[(trade.symbol, trade.data.tradeId)] = message.timestamp()[1]
    finally:
        consumer.close()
    return stamped


def _lat(values: dict[str, float]) -> str:
    return " / ".join(f"{values[k]:.0f}" for k in ("p50", "p95", "p99", "max") if k in values) or "-"


def distribution_table(results: list[DistributionResult]) -> str:
    lines = [
        "| symbols | target ev/s | clients: one symbol / full stream | delivered msg/s | "
        "Kafka timestamp→client ms p50/p95/p99/max | worker CPU % alone → serving | "
        "distribution CPU µs/msg | broker CPU % alone → serving | client process CPU % | "
        "missing at clients | duplicates | clients dropped | collector lost | load avg |",
        "|---:|---:|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.symbols} | {r.target_rate:,} | {r.filtered_clients} / {r.full_clients} | "
            f"{r.delivered_rate:,.0f} | {_lat(r.latency)} | "
            f"{r.worker_cpu_alone:.0f} → {r.worker_cpu_serving:.0f} | "
            f"{r.distribution_us_per_message:.1f} | {r.broker_cpu_alone:.0f} → {r.broker_cpu_serving:.0f} | "
            f"{r.clients_cpu:.0f} | {r.client_missing} | {r.client_duplicates} | {r.clients_dropped} | "
            f"{r.collector_lost} | {r.load_average:.1f} |"
        )
    return "\n".join(lines) + "\n"
