"""`python -m bench.clients`: the market producer alone, librdkafka against aiokafka's batches.

The 1,000-symbol targets fail on the embedded broker's CPU: librdkafka sends one produce request per
partition (its issue #1700), and with a topic per symbol nearly every record is a request of its own.
aiokafka puts every partition bound for a broker into one request. This runs the market producer
with nothing else, on a fresh embedded broker per run, the two clients alternating, each in a process
of its own:

- `librdkafka`: the worker's client and settings (`confluent_settings`, 5 requests in flight, a
  producer per 1,000 topics as `ConfluentDelivery` splits them), reports served every 10 ms;
- `aiokafka`: what accumulates for a topic over one linger (25 ms) becomes one batch
  (`create_batch` / `send_batch`); aiokafka's sender packs the ready batches into one request.

Records (230 bytes, one partition a topic, as market topics) are handed over every 5 ms in steps at
a fixed rate, spread over the topics; a record's latency is from its step to its acknowledgement.
CPU is the client process's (its threads included) and the broker's, over the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable

import uvloop
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from agents.embedded_broker import EmbeddedBroker
from agents.writer import ConfluentDelivery, confluent_settings
from bench.procfs import cpu_seconds
from bench.reader import create_topics

CLIENTS = ("librdkafka", "aiokafka")
LINGER_MS = 25  # the default config's kafka.producer
STEP = 0.005  # a normalize step's pace under load
REPORT_INTERVAL = 0.010
VALUE = b"x" * 230  # about a trade record
# (topics, records a second): 1,000 symbols' trades and bbo at 5 and 10 k/s, 100 symbols at 10 and
# 30 k/s, the quiet step's 20 symbols at 500/s.
LOADS = ((2000, 5000), (2000, 10000), (100, 10000), (100, 30000), (20, 500))


def _topics(count: int) -> list[str]:
    return [f"clients.{index}" for index in range(count)]


class _Latencies:
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.failed = 0

    def add(self, handed_over: float, count: int = 1) -> None:
        self.seconds.extend([time.monotonic() - handed_over] * count)


class _Librdkafka:
    def __init__(self, bootstrap: str, topics: list[str], latencies: _Latencies) -> None:
        settings = {
            **confluent_settings([bootstrap], LINGER_MS, "lz4"),
            "max.in.flight.requests.per.connection": 5,
        }
        per = ConfluentDelivery.TOPICS_PER_PRODUCER
        self._producers = [Producer(settings) for _ in range(0, len(topics), per)]
        self._producer_of = {topic: self._producers[index // per] for index, topic in enumerate(topics)}
        self._latencies = latencies
        self._task = asyncio.ensure_future(self._serve())

    def send(self, topic: str, handed_over: float) -> None:
        def on_delivery(error: object, _message: object) -> None:
            if error is None:
                self._latencies.add(handed_over)
            else:
                self._latencies.failed += 1

        self._producer_of[topic].produce(topic, VALUE, b"k", on_delivery=on_delivery)

    async def _serve(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            for producer in self._producers:
                producer.poll(0)

    async def close(self) -> None:
        self._task.cancel()
        for producer in self._producers:
            producer.flush(10)


class _Aiokafka:
    def __init__(self, producer: AIOKafkaProducer, latencies: _Latencies) -> None:
        self._producer = producer
        self._latencies = latencies
        self._window: dict[str, list[float]] = {}
        self._sent: list[asyncio.Future[object]] = []
        self._task = asyncio.ensure_future(self._windows())

    @classmethod
    async def start(cls, bootstrap: str, topics: list[str], latencies: _Latencies) -> _Aiokafka:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, compression_type="lz4", acks="all", max_batch_size=1_000_000
        )
        await producer.start()
        await asyncio.gather(*(producer.partitions_for(topic) for topic in topics))
        return cls(producer, latencies)

    def send(self, topic: str, handed_over: float) -> None:
        self._window.setdefault(topic, []).append(handed_over)

    async def _windows(self) -> None:
        while True:
            await asyncio.sleep(LINGER_MS / 1000)
            await self._send_window()

    async def _send_window(self) -> None:
        window, self._window = self._window, {}
        for topic, handed_over in window.items():
            batch = self._producer.create_batch()
            for _ in handed_over:
                batch.append(key=b"k", value=VALUE, timestamp=None)
            batch.close()
            sent = await self._producer.send_batch(batch, topic, partition=0)
            sent.add_done_callback(self._acknowledged(handed_over))

    def _acknowledged(self, handed_over: list[float]) -> Callable[[asyncio.Future[object]], None]:
        def done(sent: asyncio.Future[object]) -> None:
            if sent.cancelled() or sent.exception() is not None:
                self._latencies.failed += len(handed_over)
            else:
                for at in handed_over:
                    self._latencies.add(at)

        return done

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._send_window()
        await self._producer.stop()  # flushes


async def _run(
    client: str, bootstrap: str, broker_pid: int, topics: int, rate: int, warmup: float, duration: float
) -> dict[str, float]:
    names = _topics(topics)
    latencies = _Latencies()
    sender: _Librdkafka | _Aiokafka
    if client == "librdkafka":
        sender = _Librdkafka(bootstrap, names, latencies)
    else:
        sender = await _Aiokafka.start(bootstrap, names, latencies)
    cursor = handed_over = 0
    started = time.monotonic()
    measuring_from = started + warmup
    first = cpu = broker_cpu = 0.0
    counted_from = 0
    while (now := time.monotonic()) < measuring_from + duration:
        if not first and now >= measuring_from:
            first, cpu, broker_cpu, counted_from = (
                now,
                time.process_time(),
                cpu_seconds(broker_pid),
                len(latencies.seconds),
            )
        # What is due by now, so a step the client delays is made up at the next: both clients are
        # offered the same records whatever they cost the event loop.
        for _ in range(int((now - started) * rate) - handed_over):
            sender.send(names[cursor], now)
            handed_over += 1
            cursor = (cursor + 7) % topics  # spread over the topics, each in turn
        await asyncio.sleep(max(STEP - (time.monotonic() - now), 0.0))
    elapsed = time.monotonic() - first
    cpu, broker_cpu = time.process_time() - cpu, cpu_seconds(broker_pid) - broker_cpu
    await asyncio.sleep(1.0)  # the window's last acknowledgements
    await sender.close()
    measured = sorted(latencies.seconds[counted_from:])
    if not measured:
        raise RuntimeError(f"{client}: nothing acknowledged")

    def percentile(q: float) -> float:
        return measured[min(len(measured) - 1, int(q * len(measured)))] * 1000

    return {
        "acknowledged per second": len(measured) / elapsed,
        "p50 ms": percentile(0.50),
        "p99 ms": percentile(0.99),
        "client cpu percent": cpu / elapsed * 100,
        "broker cpu percent": broker_cpu / elapsed * 100,
        "failed": latencies.failed,
        # Over the whole run, warm-up included: every record handed over is acknowledged by the end.
        "unacknowledged": handed_over - len(latencies.seconds),
    }


def _one(client: str, topics: int, rate: int, warmup: float, duration: float) -> dict[str, float]:
    with EmbeddedBroker() as broker:
        create_topics(broker.bootstrap, _topics(topics))
        assert broker.pid is not None
        return uvloop.run(_run(client, broker.bootstrap, broker.pid, topics, rate, warmup, duration))


def run(
    loads: tuple[tuple[int, int], ...], rounds: int, warmup: float, duration: float
) -> list[tuple[str, int, int, dict[str, float]]]:
    """Each load, each client in a process of its own (a fresh broker each), alternating."""
    rows = []
    for topics, rate in loads:
        for _ in range(rounds):
            for client in CLIENTS:
                command = [
                    sys.executable, "-m", "bench.clients", "--client", client, "--load", f"{topics}:{rate}",
                    "--warmup", str(warmup), "--duration", str(duration),
                ]  # fmt: skip
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=warmup + duration + 120
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{client} at {topics}:{rate} failed: {done.stderr[-2000:]}")
                rows.append((client, topics, rate, json.loads(done.stdout.strip().splitlines()[-1])))
                print(_line(*rows[-1]), flush=True)
    return rows


HEADER = (
    "| client | topics | records/s offered | acknowledged/s | ack p50 / p99 ms"
    " | client CPU % | broker CPU % |\n"
    "|---|---:|---:|---:|---|---:|---:|"
)


def _line(client: str, topics: int, rate: int, found: dict[str, float]) -> str:
    failed = f" ({found['failed']:.0f} failed)" if found["failed"] else ""
    return (
        f"| {client}{failed} | {topics:,} | {rate:,} | {found['acknowledged per second']:,.0f} "
        f"| {found['p50 ms']:.0f} / {found['p99 ms']:.0f} | {found['client cpu percent']:.1f} "
        f"| {found['broker cpu percent']:.1f} |"
    )


def _load(text: str) -> tuple[int, int]:
    topics, _, rate = text.partition(":")
    return int(topics), int(rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each client runs a load (alternating)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument(
        "--load", type=_load, action="append", help="TOPICS:RATE (repeatable; default: the bench's steps)"
    )
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)  # one run, in its own process
    args = parser.parse_args(argv)
    loads = tuple(args.load or LOADS)
    if args.client:
        (topics, rate), *_ = loads
        print(json.dumps(_one(args.client, topics, rate, args.warmup, args.duration)), flush=True)
        return 0
    print(HEADER, flush=True)
    run(loads, args.rounds, args.warmup, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
