"""`python -m bench.hold`: does the embedded default hold? One worker on `kafka.brokers: embedded` (its
own broker, as `make run` starts it) against the simulator for an hour, reported every 5 minutes.

Each slice gives the worker's and the broker's CPU (% of one core) and RSS, the records the worker had
acknowledged and their p99 from frame receipt to acknowledgement (the worker's own histogram, so that
measuring adds no reader to the broker), and the worst pipeline lag of its connectors (`/connectors`:
how far the records trail the frames). At the end the market is paused and every trade topic is read
once: trades the simulator sent that are missing, or there twice, are counted.

    python -m bench.hold --minutes 60 --rate 1000 --symbols 100
    python -m bench.hold --minutes 60 --default-load     # the default config's streams, 3 symbols

Wants an idle machine: the simulator, the worker and its broker share the cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.acks import acknowledged_buckets, window_percentiles
from bench.procfs import CpuMeter, machine, memory_mb
from bench.reader import MarketReader
from bench.report import machine_line
from bench.step import bench_symbols
from streams.topics import market_topic
from tests.harness import Simulator, Worker, child_pids, wait_for, write_config

READ_BACK_SECONDS = 3600
DEFAULT_LOAD_SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT"]  # config/default.yaml
DEFAULT_LOAD_TYPES = ["trade", "kline_1m", "kline_5m", "kline_1h", "ticker", "bbo"]


@dataclass
class HoldSlice:
    minute: float
    worker_cpu: float
    worker_rss: float
    broker_cpu: float
    broker_rss: float
    records_per_second: float
    p99_ms: float | None
    lag_ms: int


def _broker_pid(worker: Worker) -> int:
    def find() -> int | None:
        for child in child_pids(worker.process.pid):
            try:
                if "tansu" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    return child
            except OSError:
                continue
        return None

    return int(wait_for(find, 30, "the embedded broker process"))


def _sent(worker: Worker) -> int:
    status, text = worker.request("/metrics")
    if status != 200 or not isinstance(text, str):
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("collector_messages_sent_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _lag(worker: Worker) -> int:
    status, body = worker.request("/connectors")
    if status != 200 or not isinstance(body, dict):
        return -1
    lags = [row.get("pipelineLagMs") or 0 for row in body.get("connectors", [])]
    return int(max(lags, default=0))


def hold(minutes: float, rate: int, symbols: list[str], data_types: list[str], slice_minutes: float) -> str:
    log_dir = Path(tempfile.mkdtemp(prefix="collector-hold-"))
    simulator = Simulator(symbols, rate=rate / len(symbols), seed=11, extra=["--history-limit", "100000"])
    config = write_config(
        log_dir / "hold.yaml", simulator, symbols, data_types,
        kafka={"brokers": "embedded"}, logging={"level": "info", "format": "json"},
    )  # fmt: skip
    worker = Worker(config, None, log_dir, "hold")
    rows: list[HoldSlice] = []
    try:
        worker.wait_ready(120)
        broker_pid = _broker_pid(worker)
        bootstrap = wait_for(lambda: _bootstrap(worker), 30, "the broker's address")
        streams = len(symbols) * len(data_types)
        wait_for(lambda: _subscribed(simulator) >= streams, 120, "every stream subscribed")
        before = simulator.get("/_sim/stats")["tradesGenerated"]
        started = time.time()
        while time.time() - started < minutes * 60:
            meters = [CpuMeter(worker.process.pid), CpuMeter(broker_pid)]
            began = time.time()
            for meter in meters:
                meter.start(began)
            acks, sent = acknowledged_buckets(worker.port), _sent(worker)
            time.sleep(min(slice_minutes * 60, minutes * 60 - (began - started)))
            ended = time.time()
            p99 = window_percentiles([acks], [acknowledged_buckets(worker.port)]).get("p99")
            rows.append(HoldSlice(
                minute=(began - started) / 60, worker_cpu=meters[0].percent(ended),
                worker_rss=memory_mb(worker.process.pid)[0], broker_cpu=meters[1].percent(ended),
                broker_rss=memory_mb(broker_pid)[0],
                records_per_second=(_sent(worker) - sent) / (ended - began),
                p99_ms=p99, lag_ms=_lag(worker),
            ))  # fmt: skip
            print(_row(rows[-1]), flush=True)
        simulator.post("/_sim/pause")
        truth = {
            symbol: {row["id"] for row in simulator.get(f"/_sim/trades?symbol={symbol.replace('/', '')}")}
            for symbol in symbols
        }
        missing, unread, duplicated, generated = _count(bootstrap, symbols, truth, before)
    finally:
        worker.stop()
        simulator.stop()
    head = (
        f"{machine_line({**machine(), 'when': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})}\n"
        f"{len(symbols)} symbols x {', '.join(data_types)}; simulator {rate:,} trades/s; "
        f"{minutes:.0f} minutes; worker with its own embedded broker\n\n"
    )
    table = (
        "| minute | worker CPU % | worker RSS MB | broker CPU % | broker RSS MB | records/s acknowledged "
        "| p99 receipt→ack ms | worst pipeline lag ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(_row(row) for row in rows)
    )
    tail = (
        f"\n\ntrades generated: {generated:,}; missing: {missing}; duplicated: {duplicated}"
        + (f"; not read back within {READ_BACK_SECONDS} s: {unread:,}" if unread else "")
        + "\n"
    )
    return head + table + tail


def _row(row: HoldSlice) -> str:
    p99 = "-" if row.p99_ms is None else f"{row.p99_ms:.0f}"
    return (
        f"| {row.minute:.0f} | {row.worker_cpu:.1f} | {row.worker_rss:.0f} | {row.broker_cpu:.1f} "
        f"| {row.broker_rss:.0f} | {row.records_per_second:,.0f} | {p99} | {row.lag_ms} |"
    )


def _bootstrap(worker: Worker) -> str | None:
    for line in worker.log().splitlines():
        if "embedded broker listening on " in line:
            return line.split("embedded broker listening on ", 1)[1].split('"', 1)[0].strip()
    return None


def _subscribed(simulator: Simulator) -> int:
    return sum(len(streams) for streams in simulator.get("/_sim/stats")["subscriptions"].values())


def _count(
    bootstrap: str, symbols: list[str], truth: dict[str, set[int]], before: dict[str, int]
) -> tuple[int, int, int, int]:
    """(missing, unread, duplicated, generated) over the trades made since the measurement started.
    A topic holds its symbol's trades in id order, so trades after the last one read are `unread`
    (the broker was too slow to serve them in time), not missing."""
    topics = [market_topic("trade", "binance", symbol) for symbol in symbols]
    reader = MarketReader(bootstrap, topics, fetch_wait_ms=100)
    try:
        began = time.monotonic()
        short = reader.read_to_end(READ_BACK_SECONDS)
        print(f"read back {reader.records:,} records in {time.monotonic() - began:.0f} s", flush=True)
        for topic, position, end in short:
            print(f"{topic}: read to {position} of {end} within {READ_BACK_SECONDS} s", flush=True)
        delivered = reader.trade_ids
        records = reader.records
    finally:
        reader.close()
    missing = unread = generated = 0
    for symbol in symbols:
        first = min(truth[symbol]) + before.get(symbol, 0) if truth[symbol] else 0
        made = {trade_id for trade_id in truth[symbol] if trade_id >= first}
        generated += len(made)
        read = {int(i) for s, i in delivered if s == symbol}
        newest_read = max(read, default=first - 1)
        missing += len({i for i in made if i <= newest_read} - read)
        unread += len({i for i in made if i > newest_read})
    return missing, unread, records - len(delivered), generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hold", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--slice", type=float, default=5.0, help="minutes per reported slice")
    parser.add_argument("--rate", type=int, default=1000, help="trades/s over all symbols")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument(
        "--default-load", action="store_true", help="the default config's 3 symbols and streams"
    )
    args = parser.parse_args(argv)
    if args.default_load:
        symbols, data_types = DEFAULT_LOAD_SYMBOLS, DEFAULT_LOAD_TYPES
    else:
        symbols, data_types = bench_symbols(args.symbols), ["trade"]
    print(hold(args.minutes, args.rate, symbols, data_types, args.slice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
