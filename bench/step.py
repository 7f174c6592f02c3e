"""One benchmark step: a fresh broker, simulator and worker(s) at one rate over N symbols."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.embedded_broker import EmbeddedBroker
from bench import profile as profiler
from bench.acks import acknowledged_buckets, window_percentiles
from bench.procfs import CpuMeter, memory_mb
from bench.reader import MarketReader, Sample, create_topics
from streams.topics import market_topic
from tests.harness import Simulator, Worker, embedded_broker_pid, wait_for, write_config

QUOTES = ("USDT", "BTC", "ETH", "BNB")
LIVE_TOPICS = 10  # topics read while the worker runs, for the receipt→read back latency


def bench_symbols(count: int) -> list[str]:
    """`count` distinct BASE/QUOTE symbols the simulator and the config both accept."""
    symbols = []
    for index in range(count):
        base = "B" + "".join(chr(65 + (index // 26**k) % 26) for k in range(3))
        symbols.append(f"{base}/{QUOTES[(index // 26**3) % len(QUOTES)]}")
    return symbols


@dataclass
class Slice:
    """One stretch of a long step: how the figures drift as the broker's partitions fill."""

    start: float  # seconds into the measured window
    worker_cpu: float
    broker_cpu: float
    worker_rss: float  # MiB at the slice's end, all workers together: memory growth in long runs
    broker_rss: float
    # From the records read back, once the step is over (`_read_slices`).
    delivered_rate: float = 0.0  # estimated from the live topics: their records scaled up to all symbols
    latency_received_created: dict[str, float] = field(default_factory=dict)
    latency_received_read: dict[str, float] = field(default_factory=dict)


@dataclass
class StepResult:
    symbols: int
    workers: int
    target_rate: int
    offered_rate: float  # trade (and bookTicker) frames the simulator sent per second in the window
    delivered_rate: float  # market records stamped by the producer per second in the window
    sent_total: int
    delivered_unique: int
    duplicates: int
    lost: int
    drained_in: float | None  # seconds after the market paused until every trade was read back
    reconnects: int
    latency_received_created: dict[str, float]
    latency_received_read: dict[str, float]
    latency_event_created: dict[str, float]
    latency_received_acknowledged: dict[str, float]  # from the workers' histograms: coarse buckets
    worker_cpu: float
    worker_peak_rss: float
    broker_cpu: float
    broker_rss: float
    simulator_cpu: float
    load_average: float  # 1-minute load average at the end of the window: other work on the machine
    slices: list[Slice] = field(default_factory=list)  # only when the step was asked for them
    # With bbo beside the trades, half the events are bookTickers: loss and latency are counted on
    # the trades (read back exactly), rates on both (bbo records scaled from the trades).
    bbo: bool = False

    @property
    def worker_us_per_event(self) -> float:
        """Worker CPU time per delivered event: comparable across runs even when cores are contended."""
        return self.worker_cpu * 1e4 / self.delivered_rate if self.delivered_rate else 0.0

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.drained_in is not None
            and self.delivered_rate >= 0.97 * self.target_rate
            and self.latency_received_created.get("p99", 1e9) < 1000
        )


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {
        "p50": ordered[last // 2],
        "p95": ordered[round(last * 0.95)],
        "p99": ordered[round(last * 0.99)],
        "max": ordered[last],
    }


def _window(sample: Sample, start_ms: int, end_ms: int) -> tuple[list[int], list[int], list[int], int]:
    """Latencies of the records whose frame arrived within the window, and records stamped in it."""
    to_created, to_read, event_to_created = [], [], []
    stamped = 0
    for event, received, created, read in zip(
        sample.event, sample.received, sample.created, sample.read, strict=True
    ):
        if start_ms <= created < end_ms:
            stamped += 1
        if start_ms <= received < end_ms:
            to_created.append(created - received)
            to_read.append(read - received)
            event_to_created.append(created - event)
    return to_created, to_read, event_to_created, stamped


class StepBroker:
    """Where a step's broker runs: its own process (`EmbeddedBroker`), or inside the worker as
    `kafka.brokers: embedded` starts it (the default config: the worker then normalizes in-process)."""

    def __init__(self, separate: EmbeddedBroker | None) -> None:
        self.separate = separate
        self.bootstrap = separate.bootstrap if separate else ""
        self.pid = separate.pid or 0 if separate else 0

    def worker_config(self) -> dict[str, object]:
        return {"brokers": [self.bootstrap]} if self.separate else {"brokers": "embedded"}

    def found_in(self, worker: Worker) -> None:
        """The worker's own broker: its address from the log, its process among the worker's children."""
        if self.separate:
            return
        self.bootstrap = wait_for(lambda: _listening(worker), 30, "the worker's broker address")
        self.pid = embedded_broker_pid(worker)


def _listening(worker: Worker) -> str | None:
    found = re.search(r"embedded broker listening on ([0-9.]+:[0-9]+)", worker.log())
    return found.group(1) if found else None


def run_step(
    symbols: int, rate: int, workers: int = 1, warmup: float = 4.0, duration: float = 12.0,
    drain_timeout: float = 30.0, log_dir: Path | None = None, profile_to: Path | None = None,
    slice_seconds: float = 0.0, separate_broker: bool = False, bbo: bool = False,
) -> StepResult:  # fmt: skip
    """One step. The broker runs inside the worker, as the default config has it, unless there are
    several workers (they share one) or `separate_broker` asks for the raw topic path of a cluster."""
    names = bench_symbols(symbols)
    topics = [market_topic("trade", "binance", name) for name in names]
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="collector-bench-"))
    with contextlib.ExitStack() as stack:
        separate = separate_broker or workers > 1
        broker = StepBroker(stack.enter_context(EmbeddedBroker()) if separate else None)
        # The simulator sends one bookTicker per symbol after its trades of a tick: about one per trade.
        trade_rate = rate / 2 if bbo else rate
        simulator = Simulator(names, rate=trade_rate / symbols, seed=11, extra=["--history-limit", "1000"])
        kinds = ("trade", "bookTicker") if bbo else ("trade",)
        data_types = ["trade", "bbo"] if bbo else ["trade"]
        started: list[Worker] = []
        live = reader = None
        try:
            config = write_config(
                log_dir / f"bench-{symbols}-{rate}.yaml", simulator, names, data_types,
                kafka=broker.worker_config(),  # the default producer settings
                logging={"level": "info", "format": "json"},
            )  # fmt: skip
            started = [Worker(config, broker.bootstrap or None, log_dir, f"w{i}") for i in range(workers)]
            for worker in started:
                worker.wait_ready(90)
            broker.found_in(started[0])
            create_topics(broker.bootstrap, topics)
            # While the worker runs, only a few topics are read: the embedded broker's cost per fetch
            # grows with the partitions in it, and reading 1,000 every few ms competed with the
            # worker's produce requests. Everything is read, and counted, once the market is paused.
            live = MarketReader(broker.bootstrap, topics[:LIVE_TOPICS])
            reader = MarketReader(broker.bootstrap, topics, start_paused=True, fetch_wait_ms=100)
            wait_for(lambda: _subscribed(simulator) >= symbols and live.poll(0.2) > 0, 120,
                     "every symbol subscribed and the first market records")  # fmt: skip
            live.poll(warmup)

            meters = [CpuMeter(w.process.pid) for w in started]
            broker_meter, sim_meter = CpuMeter(broker.pid or 0), CpuMeter(simulator.process.pid)
            sent_before = simulator.get("/_sim/stats")["framesSent"]
            spy = profiler.start(started[0].process.pid, duration, profile_to) if profile_to else None
            acks_before = [acknowledged_buckets(w.port) for w in started]
            start = time.time()
            for meter in (*meters, broker_meter, sim_meter):
                meter.start(start)
            slices = _poll_in_slices(live, duration, slice_seconds, started, broker.pid or 0)
            end = time.time()
            acks_after = [acknowledged_buckets(w.port) for w in started]
            sent_after = simulator.get("/_sim/stats")["framesSent"]
            cpu = sum(m.percent(end) for m in meters)
            broker_cpu, sim_cpu = broker_meter.percent(end), sim_meter.percent(end)
            load = os.getloadavg()[0]

            if spy is not None:
                spy.wait(timeout=30)
            simulator.post("/_sim/pause")
            stats = simulator.get("/_sim/stats")
            sent_total = stats["framesSent"].get("trade", 0)
            paused_at = time.monotonic()
            drained_in: float | None = None
            reader.resume()
            while time.monotonic() - paused_at < drain_timeout:
                reader.poll(0.2)
                live.poll(0.01)
                if len(reader.trade_ids) >= sent_total:
                    drained_in = time.monotonic() - paused_at
                    break
            peak_rss = max(memory_mb(w.process.pid)[1] for w in started)
            broker_rss = memory_mb(broker.pid or 0)[0]
        finally:
            for worker in started:
                worker.stop()
            simulator.stop()
            if reader is not None:
                reader.close()
            if live is not None:
                live.close()

    start_ms, end_ms = int(start * 1000), int(end * 1000)
    to_created, _, event_to_created, stamped = _window(reader.sample, start_ms, end_ms)
    _, to_read, _, _ = _window(live.sample, start_ms, end_ms)
    unique = len(reader.trade_ids)
    _read_slices(slices, live.sample, start_ms, slice_seconds, symbols / min(symbols, LIVE_TOPICS))
    offered = {kind: sent_after.get(kind, 0) - sent_before.get(kind, 0) for kind in kinds}
    events_per_trade = sum(offered.values()) / offered["trade"] if offered["trade"] else 1.0
    return StepResult(
        symbols=symbols, workers=workers, target_rate=rate,
        offered_rate=sum(offered.values()) / (end - start),
        delivered_rate=stamped * events_per_trade / (end - start),
        sent_total=sent_total, delivered_unique=unique, duplicates=reader.records - unique,
        lost=max(0, sent_total - unique), drained_in=drained_in,
        reconnects=stats["connections"]["total"] - workers * max(1, _connections_per_worker(symbols)),
        latency_received_created=percentiles(to_created),
        latency_received_read=percentiles(to_read),
        latency_event_created=percentiles(event_to_created),
        latency_received_acknowledged=window_percentiles(acks_before, acks_after),
        worker_cpu=cpu, worker_peak_rss=peak_rss, broker_cpu=broker_cpu, broker_rss=broker_rss,
        simulator_cpu=sim_cpu, load_average=load,
        slices=slices, bbo=bbo,
    )  # fmt: skip


def _poll_in_slices(
    live: MarketReader, duration: float, slice_seconds: float, workers: list[Worker], broker_pid: int
) -> list[Slice]:
    """Read for `duration`; with slices, the CPU % and RSS of the workers and the broker in each."""
    if slice_seconds <= 0:
        live.poll(duration)
        return []
    slices: list[Slice] = []
    remaining = duration
    while remaining > 0:
        meters = [CpuMeter(w.process.pid) for w in workers] + [CpuMeter(broker_pid)]
        began = time.time()
        for meter in meters:
            meter.start(began)
        live.poll(min(slice_seconds, remaining))
        ended = time.time()
        slices.append(Slice(
            start=duration - remaining,
            worker_cpu=sum(m.percent(ended) for m in meters[:-1]), broker_cpu=meters[-1].percent(ended),
            worker_rss=sum(memory_mb(w.process.pid)[0] for w in workers), broker_rss=memory_mb(broker_pid)[0],
        ))  # fmt: skip
        remaining -= slice_seconds
    return slices


def _read_slices(
    slices: list[Slice], sample: Sample, start_ms: int, slice_seconds: float, scale: float
) -> None:
    """Each slice's delivered rate and latencies, from the records whose frames arrived in it."""
    for piece in slices:
        begin = start_ms + int(piece.start * 1000)
        to_created, to_read, _, stamped = _window(sample, begin, begin + int(slice_seconds * 1000))
        piece.delivered_rate = stamped * scale / slice_seconds
        piece.latency_received_created = percentiles(to_created)
        piece.latency_received_read = percentiles(to_read)


def _subscribed(simulator: Simulator) -> int:
    return sum(len(streams) for streams in simulator.get("/_sim/stats")["subscriptions"].values())


def _connections_per_worker(symbols: int, streams_per_connection: int = 1000) -> int:
    return -(-symbols // streams_per_connection)
