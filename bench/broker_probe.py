"""`python -m bench.broker_probe`: how the embedded broker's fetch slows down as a partition fills.

The embedded broker (Tansu, memory storage) keeps every record batch as its own object and never
deletes any. This probe writes one-record batches into one partition and, at each size on the
ladder, times what a consumer at the end of the partition waits for a newly produced record and
how much broker CPU that costs. The collector writes a raw batch every few milliseconds per
connection, so how these figures grow decides how long a worker can run on this broker.
"""

from __future__ import annotations

import argparse
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from agents.embedded_broker import EmbeddedBroker
from bench.procfs import cpu_seconds
from bench.reader import create_topics
from bench.step import percentiles

TOPIC = "probe"
LADDER = (1_000, 5_000, 10_000, 20_000, 30_000, 40_000)
GIVE_UP_S = 5.0  # a record not fetched within this is counted as not fetched at all


def _fill(producer: Producer, count: int) -> None:
    """`count` batches of one record each: flushing after every record keeps them apart."""
    for _ in range(count):
        producer.produce(TOPIC, b"x" * 200)
        producer.flush(10)


def _probe(producer: Producer, consumer: Consumer, broker_pid: int, rounds: int) -> dict[str, float]:
    waits: list[int] = []
    missed = 0
    cpu_before = cpu_seconds(broker_pid)
    started = time.monotonic()
    for _ in range(rounds):
        producer.produce(TOPIC, b"y" * 200)
        producer.flush(10)
        sent = time.monotonic()
        message = consumer.poll(GIVE_UP_S)
        if message is None or message.error():
            missed += 1
            continue
        waits.append(round((time.monotonic() - sent) * 1000))
    elapsed = time.monotonic() - started
    found = {f"fetch {k} ms": float(v) for k, v in percentiles(waits).items()}
    found["not fetched"] = missed
    found["broker CPU ms per record"] = round((cpu_seconds(broker_pid) - cpu_before) * 1000 / rounds, 2)
    found["seconds"] = round(elapsed, 1)
    return found


def run(ladder: tuple[int, ...] = LADDER, rounds: int = 40) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with EmbeddedBroker() as broker:
        create_topics(broker.bootstrap, [TOPIC])
        producer = Producer(
            {"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "enable.idempotence": False}
        )
        consumer = Consumer({
            "bootstrap.servers": broker.bootstrap, "group.id": "probe", "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,  # what the collector's Faust consumer uses
        })  # fmt: skip
        stored = 0
        for size in ladder:
            _fill(producer, size - stored)
            stored = size
            # Read from the true end: the broker's ListOffsets(LATEST) is off by one batch.
            consumer.assign([TopicPartition(TOPIC, 0, stored)])
            rows.append((stored, _probe(producer, consumer, broker.pid or 0, rounds)))
            stored += rounds
            print(_line(*rows[-1]), flush=True)
            if rows[-1][1]["not fetched"] == rounds:
                break  # past the cliff: bigger sizes only take longer to show the same
        consumer.close()
    return rows


HEADER = (
    "| batches in the partition | fetch of a new record p50 / p99 / max ms | not fetched in 5 s "
    "| broker CPU ms per record |\n|---:|---|---:|---:|"
)


def _line(stored: int, found: dict[str, float]) -> str:
    waits = " / ".join(
        f"{found[f'fetch {k} ms']:.0f}" for k in ("p50", "p99", "max") if f"fetch {k} ms" in found
    )
    return (
        f"| {stored:,} | {waits or '-'} | {found['not fetched']:.0f} | {found['broker CPU ms per record']} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)), help="batch counts to probe at")
    parser.add_argument("--rounds", type=int, default=40, help="records fetched at each size")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    run(tuple(int(part) for part in args.ladder.split(",")), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
