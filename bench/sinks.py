"""`python -m bench.sinks` (`make bench-sinks`, part of `make bench`): Kafka → PostgreSQL and
Kafka → Redis, one sink process, the embedded broker and the databases on the same machine.

For each sink, on a fresh broker and fresh servers (Debian's binaries, PostgreSQL with fsync on):

- steady: a producer process writes `--rate` trades/s over `--symbols` market topics for
  `--duration` s while the sink runs, as a worker with `collection: false` would; reported: the rate
  stored during the window, the sink's lag (max and at the end), how long it took to finish after
  the producer stopped, and CPU of the sink process and of the database. It passes when the sink
  stored ≥ 97 % of the rate during the window and everything within 10 s after it.
- drain: `--backlog` trades are in the topics before the sink starts; reported: the rate at which it
  stores them (first stored batch to last), i.e. its ceiling.

The sink runs in this process exactly as in a worker (agents/sinks: its own consumer group, batches
of `batchRows`/`batchMs`, commit after the database commit).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procfs import cpu_seconds, machine
from bench.report import machine_line

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:sinks:begin -->", "<!-- bench:sinks:end -->"
T0 = 1_700_000_000_000


def _symbols(count: int) -> list[str]:
    return [f"S{index:04d}/USDT" for index in range(count)]


def produce(
    bootstrap: str, symbols: int, count: int, rate: float, exchange: str, first_id: int = 1, times: Any = None
) -> None:
    """Write `count` trades round-robin over the symbols' topics at `rate`/s (0: as fast as it can).
    Runs as a child process, so it does not compete for the sink's GIL. `times` (a shared array)
    receives when it started and finished writing (time.time())."""
    from confluent_kafka import Producer

    from streams.records import MarketRecord, Trade, encode_record
    from streams.topics import market_topic

    names = _symbols(symbols)
    topics = [market_topic("trade", exchange, name) for name in names]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 25, "compression.type": "lz4",
                         "queue.buffering.max.messages": 1_000_000})  # fmt: skip
    started = time.monotonic()
    if times is not None:
        times[0] = time.time()
    for index in range(count):
        trade_id = first_id + index // symbols
        symbol = index % symbols
        now = time.time_ns() // 1_000_000
        record = MarketRecord(exchange, names[symbol], "trade", now, now,
                              Trade(f"{100 + trade_id % 1000}.{trade_id % 97:02d}", "0.015", "buy",
                                    str(trade_id), now))  # fmt: skip
        while True:
            try:
                producer.produce(topics[symbol], encode_record(record), names[symbol].encode())
                break
            except BufferError:
                producer.poll(0.01)
        if index % 1000 == 999:
            producer.poll(0)
            if rate > 0:  # pace: never ahead of the schedule
                ahead = (index + 1) / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    producer.flush(60)
    if times is not None:
        times[1] = time.time()


def _create_topics(bootstrap: str, symbols: int, exchange: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.topics import market_topic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(market_topic("trade", exchange, name), 1, 1) for name in _symbols(symbols)]
    for created in admin.create_topics(new).values():
        created.result(30)


def _postgres_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster and its backends."""
    total = cpu_seconds(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class SinkRun:
    sink: str
    mode: str  # steady, drain
    records: int
    stored: int  # records the sink stored: all of them, or the run is broken
    target_rate: float
    written_rate: float  # what the producer managed (steady)
    stored_rate: float
    max_lag: float
    end_lag: float
    finish_seconds: float  # after the producer stopped (steady) / whole drain
    sink_cpu: float  # % of one core
    database_cpu: float
    broker_cpu: float
    passed: bool


async def _run(sink: str, mode: str, args: argparse.Namespace) -> SinkRun:
    from agents.embedded_broker import EmbeddedBroker
    from agents.sinks import build_sinks
    from agents.sinks.localservers import LocalPostgres, LocalRedis
    from streams.config import parse_config

    exchange = "bench"
    with EmbeddedBroker() as broker, LocalPostgres(fsync=True) if sink == "postgres" else LocalRedis() as db:
        _create_topics(broker.bootstrap, args.symbols, exchange)
        if isinstance(db, LocalPostgres):
            settings = {"dsn": db.create_database("bench"), "types": ["trade"], "batchRows": args.batch_rows}
            database_pid = db.process.pid if db.process else 0
        else:
            settings = {"url": db.url, "types": ["trade"], "batchRows": args.batch_rows}
            database_pid = db.process.pid if db.process else 0
        config = parse_config({
            "exchanges": {"binance": {"wsEndpoint": "ws://127.0.0.1:1", "restEndpoint": "http://127.0.0.1:1",
                                      "symbols": ["BTC/USDT"], "dataTypes": ["trade"]}},
            "kafka": {"brokers": [broker.bootstrap]},
            "sinks": {sink: settings},
        })  # fmt: skip
        records = int(args.rate * args.duration) if mode == "steady" else args.backlog
        spawn = multiprocessing.get_context("spawn")
        if mode == "drain":  # the backlog first, as fast as the producer goes
            preload = spawn.Process(
                target=produce, args=(broker.bootstrap, args.symbols, records, 0.0, exchange)
            )
            preload.start()
            await asyncio.to_thread(preload.join)
        sinks = build_sinks(config, [broker.bootstrap], f"bench-{os.getpid()}")
        status = next(iter(sinks.health.sinks.values()))
        await sinks.start()
        try:
            if mode == "steady":  # one warm-up record: the group has joined once it is stored
                warm = spawn.Process(target=produce, args=(broker.bootstrap, 1, 1, 0.0, exchange, 10**9))
                warm.start()
                await asyncio.to_thread(warm.join)
                await _until(lambda: status.rows.get("trade", 0) >= 1, 60)
            base = status.rows.get("trade", 0)
            target = base + records
            broker_pid = broker._process.pid if broker._process else 0
            cpu0, db0, wall0 = cpu_seconds(os.getpid()), _db_cpu(sink, database_pid), time.monotonic()
            broker0 = cpu_seconds(broker_pid)
            producer = None
            times = spawn.Array("d", [0.0, 0.0])
            if mode == "steady":
                producer = spawn.Process(
                    target=produce,
                    args=(broker.bootstrap, args.symbols, records, args.rate, exchange, 1, times),
                )
                producer.start()
            max_lag, first_stored_at = 0.0, None
            while True:
                now = time.monotonic()
                stored = status.rows.get("trade", 0)
                if first_stored_at is None and stored > base:
                    first_stored_at = now
                max_lag = max(max_lag, status.lag_seconds(time.time_ns() // 1_000_000))
                if stored >= target or now - wall0 > args.duration + 60:
                    break
                await asyncio.sleep(0.05)
            finished_wall = time.time()
            finished = time.monotonic()
            end_lag = status.lag_seconds(time.time_ns() // 1_000_000)
            cpu = 100 * (cpu_seconds(os.getpid()) - cpu0) / (finished - wall0)
            db_cpu = 100 * (_db_cpu(sink, database_pid) - db0) / (finished - wall0)
            broker_cpu = 100 * (cpu_seconds(broker_pid) - broker0) / (finished - wall0)
            if producer is not None:
                await asyncio.to_thread(producer.join)
        finally:
            await sinks.stop()
        stored = status.rows.get("trade", 0) - base
        # The sink's pace from its first stored record to its last. Not what it stored while the
        # producer wrote: a sink trails by its fetch wait (up to 500 ms) and a batch by design, which
        # cost a sink that kept pace all along 3-5 % of a 30 s window.
        span = finished - (first_stored_at or wall0)
        stored_rate = stored / span if span > 0 else 0.0
        if mode == "steady":
            written_rate = records / max(times[1] - times[0], 1e-9)
            finish = max(finished_wall - times[1], 0.0)  # how long it took once the producer stopped
            # Kept up: stored at nearly the written pace, and the rest within seconds of the last write.
            passed = stored >= records and stored_rate >= 0.97 * min(written_rate, args.rate) and finish <= 5
        else:
            written_rate = 0.0
            finish = finished - wall0
            passed = stored >= records
        target_rate = args.rate if mode == "steady" else 0
        return SinkRun(
            sink, mode, records, stored, target_rate, written_rate, stored_rate, max_lag, end_lag, finish,
            cpu, db_cpu, broker_cpu, passed,
        )  # fmt: skip


def _db_cpu(sink: str, pid: int) -> float:
    if not pid:
        return 0.0
    return _postgres_cpu(pid) if sink == "postgres" else cpu_seconds(pid)


async def _until(condition: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the sink did not store its first record")
        await asyncio.sleep(0.1)


def table(runs: list[SinkRun]) -> str:
    lines = [
        "| sink | mode | records | target /s | written /s | stored /s | lag s max / end | finished after s | "
        "CPU % sink / database / broker | kept up |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in runs:
        target = f"{r.target_rate:,.0f}" if r.target_rate else "backlog"
        written = f"{r.written_rate:,.0f}" if r.written_rate else "-"
        lines.append(
            f"| {r.sink} | {r.mode} | {r.records:,} | {target} | {written} | {r.stored_rate:,.0f} | "
            f"{r.max_lag:.2f} / {r.end_lag:.2f} | {r.finish_seconds:.1f} | "
            f"{r.sink_cpu:.0f} / {r.database_cpu:.0f} / {r.broker_cpu:.0f} | {'yes' if r.passed else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the sinks' generated block of docs/benchmarks.md, keeping everything else."""
    block = f"{BEGIN}\n{text}{END}"
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN not in document:
        document += f"\n## Sinks (generated by `python -m bench.sinks`)\n\n{BEGIN}\n{END}\n"
    path.write_text(re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, document, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__.split("\n")[0])
    parser.add_argument("--sinks", default="postgres,redis")
    parser.add_argument("--modes", default="steady,drain")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--rate", type=float, default=30_000, help="steady: trades/s written")
    parser.add_argument("--duration", type=float, default=30.0, help="steady: seconds written")
    parser.add_argument("--backlog", type=int, default=600_000, help="drain: trades in the topics first")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="'-' prints only")
    args = parser.parse_args(argv)
    runs = []
    for sink in args.sinks.split(","):
        for mode in args.modes.split(","):
            print(f"bench.sinks: {sink}, {mode} …", flush=True)
            run = asyncio.run(_run(sink, mode, args))
            runs.append(run)
            print(table([run]).splitlines()[-1], flush=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = machine_line({**machine(), "when": when}) + "\n" + table(runs)
    print("\n" + text)
    if args.output != "-":
        write_section(Path(args.output), text)
        print(f"bench.sinks: results written to {args.output}")
    return 0 if all(r.passed for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
