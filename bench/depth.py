"""The order book steps of `make bench` (issue 15), each on a fresh broker, simulator and worker.
As in the trade steps, the market topics are made before the worker starts (declaring 1,000 topics
on first use keeps a worker's event loop busy for seconds) and so are the simulator's books.

- Depth under load: N symbols (100) with `@depth@100ms` diffs plus trades at a total rate (5,000/s):
  depth and trade records per second over the window, depth receipt → producer stamp latency (read
  back from a few depth topics), worker CPU and RSS, resyncs other than the books' first sync. Run
  on the default config (the worker's own embedded broker, normalizing in-process), then with a
  broker process of its own (the raw topic path of a Kafka cluster).
- 1,000 books: Binance books keeping 100 levels a side on one worker (`levels` 50: the snapshot of
  100 levels, weight 5; `@depth@100ms`, a trade a second per symbol): seconds from the worker's
  start until every book is synced, then again after every connection drops at once (a mass
  reconnect resyncs every book); the REST requests the simulator refused (429/418; must be 0: the
  snapshots are staggered within the weight budget), the most weight it saw used in a minute, and
  the worker's RSS holding the books (target: < 300 MB).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml
from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import EmbeddedBroker
from bench.procfs import CpuMeter, memory_mb
from bench.reader import create_topics
from bench.step import StepBroker, bench_symbols, percentiles
from streams.exchanges import adapter_class
from streams.topics import market_topic
from tests.harness import Simulator, Worker, wait_for, write_config

LATENCY_TOPICS = 10


@dataclass
class DepthLoadResult:
    symbols: int
    trade_rate: int
    seconds: float
    depth_per_second: float
    trades_per_second: float
    depth_latency: dict[str, float]  # receipt → producer stamp, ms
    worker_cpu: float
    worker_rss: float
    books_synced: int
    resyncs: dict[str, int]  # after the first sync, by reason
    trade_latency: dict[str, float] = field(default_factory=dict)  # receipt → producer stamp, ms
    separate_broker: bool = False  # the raw topic path of a cluster, not the default config


@dataclass
class BooksResult:
    books: int
    levels: int
    capacity: int  # levels kept per side (the snapshot's)
    start_sync_seconds: float | None  # worker start → every book synced
    reconnect_sync_seconds: float | None  # every connection dropped → every book synced again
    resyncs: dict[str, int]  # by reason: the first syncs (start) and the reconnect (new-connection)
    rest_refused: int  # 429/418 answers of the simulator
    max_weight_used: int  # the most REST weight the simulator saw used in a rolling minute
    worker_rss: float  # MiB, every book synced
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, books synced)


class _Times(msgspec.Struct):
    receivedAt: int


_decode_times = msgspec.json.Decoder(_Times).decode


def _metric(worker: Worker, name: str, labels: str) -> float:
    """The sum of a metric's samples whose labels contain `labels` (`exchange="binance",state="synced"`)."""
    _, text = worker.request("/metrics")
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} (\S+)$", re.M)
    return sum(float(value) for found, value in pattern.findall(text) if labels in found)


def _resyncs(worker: Worker) -> dict[str, int]:
    _, text = worker.request("/metrics")
    found = re.findall(
        r'^collector_book_resyncs_total\{exchange="binance",reason="([^"]+)"\} (\S+)$', text, re.M
    )
    return {reason: int(float(value)) for reason, value in found}


def _config(
    path: Path, simulator: Simulator, names: list[str], data_types: list[str], depth: dict[str, object],
    kafka: dict[str, object],
) -> Path:  # fmt: skip
    write_config(path, simulator, names, data_types, kafka=kafka, logging={"level": "info", "format": "json"})
    document = yaml.safe_load(path.read_text())
    document["exchanges"]["binance"]["depth"] = depth
    path.write_text(yaml.safe_dump(document))
    return path


def _prime_books(simulator: Simulator, names: list[str]) -> None:
    """Make the simulator's ground-truth books before the worker subscribes: it makes each one on
    first use, and 200 of them at once (one SUBSCRIBE) held its event loop long enough for the
    worker to take the connections for stalled."""
    for name in names:
        simulator.get(f"/_sim/book?symbol={name.replace('/', '')}&levels=1")


def run_depth_load(
    symbols: int = 100, trade_rate: int = 5000, warmup: float = 4.0, duration: float = 12.0,
    log_dir: Path | None = None, separate_broker: bool = False,
) -> DepthLoadResult:  # fmt: skip
    """The broker runs inside the worker, as the default config has it (the worker normalizes
    in-process), unless `separate_broker` asks for the raw topic path of a cluster."""
    names = bench_symbols(symbols)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="collector-bench-depth-"))
    topics = [market_topic(k, "binance", n) for k in ("trade", "depth") for n in names]
    with contextlib.ExitStack() as stack:
        broker = StepBroker(stack.enter_context(EmbeddedBroker()) if separate_broker else None)
        simulator = Simulator(names, rate=trade_rate / symbols, seed=11, extra=["--history-limit", "1000"])
        worker: Worker | None = None
        reader: Consumer | None = None
        try:
            _prime_books(simulator, names)
            if separate_broker:
                create_topics(broker.bootstrap, topics)
            config = _config(log_dir / "depth-load.yaml", simulator, names, ["trade", "depth"],
                             {"speed": "100ms"}, broker.worker_config())  # fmt: skip
            worker = Worker(config, broker.bootstrap or None, log_dir, "depth")
            worker.wait_ready(90)
            broker.found_in(worker)
            if not separate_broker:  # the worker's own broker: made now, before most are used
                create_topics(broker.bootstrap, topics)
            synced = 'exchange="binance",state="synced"'
            wait_for(lambda: _metric(worker, "collector_books", synced) >= symbols, 180, "every book synced")  # type: ignore[arg-type]
            first = _resyncs(worker)
            reader = Consumer({
                "bootstrap.servers": broker.bootstrap, "group.id": f"bench-depth-{time.time_ns()}",
                "enable.auto.commit": False, "auto.offset.reset": "latest",
            })  # fmt: skip
            reader.assign([
                TopicPartition(market_topic(k, "binance", n), 0)
                for k in ("depth", "trade") for n in names[:LATENCY_TOPICS]
            ])  # fmt: skip
            deadline = time.monotonic() + warmup
            while time.monotonic() < deadline:
                reader.consume(10_000, 0.1)
            sent = 'exchange="binance",type="'
            depth_before = _metric(worker, "collector_messages_sent_total", sent + 'depth"')
            trades_before = _metric(worker, "collector_messages_sent_total", sent + 'trade"')
            meter = CpuMeter(worker.process.pid)
            start = time.time()
            meter.start(start)
            latencies: list[int] = []
            trade_latencies: list[int] = []
            while time.time() - start < duration:
                for message in reader.consume(10_000, 0.1):
                    if message.error() is None:
                        created = message.timestamp()[1]
                        into = trade_latencies if message.topic().startswith("market.trade.") else latencies
                        into.append(created - _decode_times(message.value()).receivedAt)
            end = time.time()
            cpu = meter.percent(end)
            depth_after = _metric(worker, "collector_messages_sent_total", sent + 'depth"')
            trades_after = _metric(worker, "collector_messages_sent_total", sent + 'trade"')
            books = int(_metric(worker, "collector_books", synced))
            resyncs = {r: n - first.get(r, 0) for r, n in _resyncs(worker).items() if n > first.get(r, 0)}
            rss = memory_mb(worker.process.pid)[0]
        finally:
            if reader is not None:
                reader.close()
            if worker is not None:
                worker.stop()
            simulator.stop()
    seconds = end - start
    return DepthLoadResult(
        symbols, trade_rate, round(seconds, 1), (depth_after - depth_before) / seconds,
        (trades_after - trades_before) / seconds, percentiles(latencies), cpu, rss, books, resyncs,
        percentiles(trade_latencies), separate_broker,
    )  # fmt: skip


def run_books(
    books: int = 1000, levels: int = 50, timeout: float = 600.0, log_dir: Path | None = None
) -> BooksResult:
    names = bench_symbols(books)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="collector-bench-books-"))
    with EmbeddedBroker() as broker:
        # A trade a second per symbol: the simulator trades every symbol at once, so at a slower rate
        # its frames came in bursts far enough apart that the worker took its connections for stalled.
        simulator = Simulator(names, rate=1.0, seed=11, extra=["--history-limit", "1000"])
        worker: Worker | None = None
        try:
            _prime_books(simulator, names)
            create_topics(broker.bootstrap, [market_topic("depth", "binance", name) for name in names])
            # 100 ms, not 1000 ms: the simulator sends every stream's 1000 ms events at the same instant,
            # and a connection silent between such bursts looked stalled to the worker.
            config = _config(
                log_dir / "books.yaml", simulator, names, ["depth"], {"levels": levels, "speed": "100ms"},
                {"brokers": [broker.bootstrap]},
            )  # fmt: skip
            worker = Worker(config, broker.bootstrap, log_dir, "books")
            progress: list[tuple[float, int]] = []
            weights = [0]

            def synced_count() -> int:
                assert worker is not None
                count = int(_metric(worker, "collector_books", 'exchange="binance",state="synced"'))
                progress.append((round(time.monotonic() - worker.started, 1), count))
                used = simulator.get("/_sim/stats")["rest"]["usedWeight1m"]
                weights[0] = max(weights[0], *used.values(), 0)
                return count

            worker.wait_ready(120)
            start_sync = (
                time.monotonic() - worker.started if _all_synced(synced_count, books, timeout) else None
            )
            rss = memory_mb(worker.process.pid)[0]
            dropped = time.monotonic()
            simulator.post("/_sim/disconnect")
            wait_for(lambda: synced_count() < books, 60, "the books to resync after the drop", interval=0.2)
            reconnect_seconds = (
                time.monotonic() - dropped if _all_synced(synced_count, books, timeout) else None
            )
            stats = simulator.get("/_sim/stats")
            resyncs = _resyncs(worker)
        finally:
            if worker is not None:
                worker.stop()
            simulator.stop()
    capacity = adapter_class("binance").depth_snapshot_limit(levels)
    return BooksResult(
        books, levels, capacity, None if start_sync is None else round(start_sync, 1),
        None if reconnect_seconds is None else round(reconnect_seconds, 1), resyncs,
        stats["rest"]["rejected"], weights[0], rss, progress,
    )  # fmt: skip


def _all_synced(count: Callable[[], int], books: int, timeout: float) -> bool:
    """Poll `count()` every second until it reaches `books`; False when it does not within `timeout`."""
    try:
        wait_for(lambda: count() >= books, timeout, f"{books} books synced", interval=1.0)
    except TimeoutError:
        return False
    return True


def depth_lines(loads: list[DepthLoadResult], books: BooksResult | None) -> str:
    lines = ["Order books:"]
    for load in loads:
        where = (
            "a broker process of its own: the raw topic path of a cluster"
            if load.separate_broker
            else "its embedded broker: the default config"
        )
        lines.append(
            f"- {load.symbols} symbols with @depth@100ms + trades at {load.trade_rate:,}/s, one worker "
            f"({where}), "
            f"{load.seconds:.0f} s: {load.depth_per_second:,.0f} depth records/s, "
            f"{load.trades_per_second:,.0f} trades/s, depth receipt→CreateTime ms "
            f"p50/p95/p99/max {_lat(load.depth_latency)}, trade receipt→CreateTime ms p50/p95/p99/max "
            f"{_lat(load.trade_latency)}, worker CPU {load.worker_cpu:.0f} %, "
            f"RSS {load.worker_rss:.0f} MB, {load.books_synced} books synced, resyncs after the first "
            f"sync: {load.resyncs or 'none'}"
        )
    if books is not None:
        lines.append(
            f"- {books.books:,} Binance books ({books.levels} levels published, {books.capacity} kept a "
            f"side), one worker: every book synced "
            f"{_seconds(books.start_sync_seconds)} after the worker started, and "
            f"{_seconds(books.reconnect_sync_seconds)} after every connection dropped; "
            f"{books.rest_refused} REST requests refused (429/418), at most {books.max_weight_used:,} "
            f"weight used in a minute (Binance allows 6,000); resyncs {books.resyncs}; worker RSS with "
            f"the books {books.worker_rss:.0f} MB (target < 300 MB)"
        )
    return "\n".join(lines) + "\n"


def _lat(values: dict[str, float]) -> str:
    return " / ".join(f"{values[k]:.0f}" for k in ("p50", "p95", "p99", "max") if k in values) or "-"


def _seconds(value: float | None) -> str:
    return "not within the timeout" if value is None else f"{value:.0f} s"
