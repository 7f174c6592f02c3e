"""`python -m bench.idempotence`: what an idempotent librdkafka producer costs the embedded broker, for
raw batches and for market records, in interleaved A/B runs.

Raw batches: 10 KB records at 1,500/s over 8 partitions, `linger.ms` 1, one request in flight (the
raw producer's settings). Market records: 250-byte records at 5,000/s spread over N one-partition
topics, `linger.ms` 25, 5 requests in flight (the market producer's). Each run starts a fresh broker
and reports the broker's CPU share and the acknowledgement latency (produce call → delivery report).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.embedded_broker import EmbeddedBroker
from bench.procfs import cpu_seconds


@dataclass(frozen=True)
class Load:
    name: str
    topics: list[tuple[str, int]]  # (topic, partitions)
    size: int
    rate: int  # records per second
    linger_ms: int
    in_flight: int


def raw_load() -> Load:
    return Load("raw", [("raw.bench", 8)], 10_000, 1_500, 1, 1)


def market_load(topics: int) -> Load:
    return Load(f"market-{topics}", [(f"market.bench.{i}", 1) for i in range(topics)], 250, 5_000, 25, 5)


def run(load: Load, idempotent: bool, seconds: float) -> dict[str, float]:
    with EmbeddedBroker() as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for future in admin.create_topics([NewTopic(t, p, 1) for t, p in load.topics]).values():
            future.result(60)
        producer = Producer({
            "bootstrap.servers": broker.bootstrap, "linger.ms": load.linger_ms, "compression.type": "lz4",
            "acks": "all", "enable.idempotence": idempotent, "batch.size": 1_000_000,
            "max.in.flight.requests.per.connection": load.in_flight,
        })  # fmt: skip
        for topic, partitions in load.topics:  # warm-up: metadata and (idempotent) producer ids
            for partition in range(partitions):
                producer.produce(topic, b"w", partition=partition)
        producer.flush(60)
        latencies: list[float] = []
        assert broker.pid is not None
        cpu_before, started, sent = cpu_seconds(broker.pid), time.monotonic(), 0
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * load.rate)
            while sent < due:
                topic, partitions = load.topics[sent % len(load.topics)]
                at = time.monotonic()
                producer.produce(
                    topic, b"x" * load.size, partition=sent % partitions,
                    on_delivery=lambda error, message, at=at: latencies.append(time.monotonic() - at),
                )  # fmt: skip
                sent += 1
            producer.poll(0.002)
        producer.flush(120)
        elapsed = time.monotonic() - started
        latencies.sort()
        return {
            "records": sent,
            "broker CPU %": round((cpu_seconds(broker.pid) - cpu_before) / elapsed * 100),
            "ack p50 ms": round(latencies[len(latencies) // 2] * 1000),
            "ack p99 ms": round(latencies[int(len(latencies) * 0.99)] * 1000),
        }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--topics", default="20,100,1000", help="market topic counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pairs", type=int, default=2, help="A/B pairs per load")
    args = parser.parse_args()
    loads = [raw_load(), *(market_load(int(n)) for n in args.topics.split(","))]
    for load in loads:
        for _ in range(args.pairs):
            for idempotent in (False, True):
                figures = run(load, idempotent, args.seconds)
                shown = "  ".join(f"{k} {v}" for k, v in figures.items())
                print(f"{load.name:12} idempotent={idempotent!s:5}  {shown}", flush=True)


if __name__ == "__main__":
    main()
