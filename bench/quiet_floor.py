"""`python -m bench.quiet_floor`: what the quiet step's feed costs any collector built from our parts.

The quiet target (a worker at ≤ 8 % of a core at 500 events/s) counts the whole worker process. Part
of that is paid before the collector does anything of its own: reading the frames (with aiohttp, as
the collector's links do), and handing each to a librdkafka producer, a topic per symbol, with the
worker's producer settings. This runs those parts alone, each in a process of its own, on the
bench's quiet feed (the simulator, 20 symbols at 25 trades a second, over the default config's five
connections), and reports their CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import uvloop
from confluent_kafka import Producer

from agents.connection import BINARY, TEXT, connect_websocket
from agents.embedded_broker import EmbeddedBroker
from agents.writer import confluent_settings
from bench.reader import create_topics
from bench.step import bench_symbols
from streams.config import ConnectionsConfig
from tables.subscription_rules import group_index, groups_per_exchange
from tests.harness import Simulator

SYMBOLS = 20
RATE = 500  # events a second over all symbols, as the bench's quiet step
# The default config's connection groups: symbols spread over them as the collector does.
CONNECTIONS = groups_per_exchange(ConnectionsConfig().max)
LINGER_MS = 25  # the default config's kafka.producer
REPORT_INTERVAL = 0.010  # how often the producer part serves delivery reports, as the worker's timer
PARTS = ("reader", "producer", "one-topic")
LABELS = {
    "reader": "aiohttp reader alone",
    "producer": f"reader + librdkafka producer (a topic per symbol, linger {LINGER_MS} ms, lz4)",
    # What the topic-per-symbol contract costs: librdkafka sends a request per partition.
    "one-topic": "the same, every frame to one topic",
}
ONE_TOPIC = "floor.all"


def _stream(symbol: str) -> str:
    return symbol.replace("/", "").lower() + "@trade"


def _topic(stream: bytes) -> str:
    return "floor." + stream.split(b"@", 1)[0].decode()


class _Tally:
    """Frames read, handed to the producer, and acknowledged by the broker."""

    def __init__(self) -> None:
        self.read = self.produced = self.acknowledged = 0

    def on_delivery(self, error: object, message: object) -> None:
        # The worker also serves a report per record (agents/writer.py): the floor counts it too.
        if error is None:
            self.acknowledged += 1


async def _read(
    url: str, streams: list[str], producer: Producer | None, one_topic: bool, tally: _Tally
) -> None:
    session, ws = await connect_websocket(url)
    try:
        await ws.send_str(json.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1}))
        while True:
            message = await ws.receive()
            if message.type is not TEXT and message.type is not BINARY:
                raise ConnectionError(f"the simulator ended a connection: {message}")
            payload = message.data
            tally.read += 1
            # A combined-stream frame starts {"stream":"<name>", ...; the ack does not.
            if producer is not None and payload.startswith(b'{"stream":"'):
                topic = ONE_TOPIC if one_topic else _topic(payload[11 : payload.index(b'"', 11)])
                producer.produce(topic, payload, on_delivery=tally.on_delivery)
                tally.produced += 1
    finally:
        await ws.close()
        await session.close()


async def _serve_reports(producer: Producer) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        producer.poll(0)


async def _part(part: str, url: str, bootstrap: str, warmup: float, duration: float) -> dict[str, float]:
    groups: dict[int, list[str]] = {}
    for symbol in bench_symbols(SYMBOLS):
        groups.setdefault(group_index(symbol, CONNECTIONS), []).append(_stream(symbol))
    producing = part != "reader"
    producer = Producer(confluent_settings([bootstrap], LINGER_MS, "lz4")) if producing else None
    tally = _Tally()
    tasks = [
        asyncio.create_task(_read(url + "/stream", streams, producer, part == "one-topic", tally))
        for streams in groups.values()
    ]
    if producer is not None:
        tasks.append(asyncio.create_task(_serve_reports(producer)))
    await asyncio.sleep(warmup)
    frames, cpu, wall = tally.read, time.process_time(), time.monotonic()
    await asyncio.sleep(duration)
    elapsed = time.monotonic() - wall
    result = {
        "frames per second": (tally.read - frames) / elapsed,
        "cpu percent": (time.process_time() - cpu) / elapsed * 100,
    }
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"{part}: {task.exception()!r}")
    if producer is not None:
        producer.flush(10)
    result["unacknowledged"] = tally.produced - tally.acknowledged
    return result


def run(rounds: int, warmup: float, duration: float) -> list[tuple[str, dict[str, float]]]:
    """Each part in a process of its own, alternating, `rounds` times."""
    rows: list[tuple[str, dict[str, float]]] = []
    simulator = Simulator(
        bench_symbols(SYMBOLS), rate=RATE / SYMBOLS, seed=11, extra=["--history-limit", "1000"]
    )
    try:
        with EmbeddedBroker() as broker:
            create_topics(
                broker.bootstrap,
                [ONE_TOPIC, *sorted({_topic(_stream(s).encode()) for s in bench_symbols(SYMBOLS)})],
            )
            for _ in range(rounds):
                for part in PARTS:
                    command = [
                        sys.executable, "-m", "bench.quiet_floor", "--part", part, "--url", simulator.ws,
                        "--bootstrap", broker.bootstrap, "--warmup", str(warmup), "--duration", str(duration),
                    ]  # fmt: skip
                    done = subprocess.run(
                        command, capture_output=True, text=True, timeout=warmup + duration + 60
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"{part} failed: {done.stderr[-2000:]}")
                    rows.append((part, json.loads(done.stdout.strip().splitlines()[-1])))
                    print(_line(*rows[-1]), flush=True)
    finally:
        simulator.stop()
    return rows


HEADER = "| part | frames/s | CPU % of a core |\n|---|---:|---:|"


def _line(part: str, found: dict[str, float]) -> str:
    return f"| {LABELS[part]} | {found['frames per second']:.0f} | {found['cpu percent']:.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quiet_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each part runs (alternating)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in its own process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        found = uvloop.run(_part(args.part, args.url, args.bootstrap, args.warmup, args.duration))
        print(json.dumps(found), flush=True)
        return 0
    print(HEADER, flush=True)
    run(args.rounds, args.warmup, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
