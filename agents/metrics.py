"""Prometheus metrics: the registry and every metric object, plus the flow meters of the normalize agents.

Other modules import the objects and call them at the points where frames, records, dead letters and
events flow. Nothing here is called once per frame or per record except `FlowMeter.record`, which
only appends to a list; the accounting happens once per normalize step in `FlowMeter.acknowledged`.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from streams.events import CollectorEvent
from streams.records import MarketRecord
from tables.records import BookFlow, CoinFlow, FlowSummary, QueueUsage
from tables.summary import EXCHANGE_TO_RECEIVE, LATENCY_BUCKETS, RECEIVE_TO_APPEND

# `*_created` series double the output and no dashboard or alert here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

CONNECTIONS_ACTIVE = Gauge(
    "collector_connections_active", "Open exchange WebSocket connections.", ["exchange"], registry=REGISTRY
)
CONNECTIONS = Counter(
    "collector_connections", "Exchange WebSocket connections opened.", ["exchange"], registry=REGISTRY
)
CONNECTION_FAILURES = Counter(
    "collector_connection_failures",
    "Connection attempts that failed and open connections that were lost.",
    ["exchange"],
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "collector_reconnects", "Connections opened again after one was lost.", ["exchange"], registry=REGISTRY
)
FRAMES_RECEIVED = Counter(
    "collector_messages_received",
    "Frames received from the exchange (WebSocket and REST).",
    ["exchange"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "collector_received_bytes", "Bytes of the frames received from the exchange.", ["exchange"],
    registry=REGISTRY,
)  # fmt: skip
MESSAGES_PROCESSED = Counter(
    "collector_messages_processed",
    "Market records normalized from received frames.",
    ["exchange", "type"],
    registry=REGISTRY,
)
MESSAGES_SENT = Counter(
    "collector_messages_sent",
    "Market records acknowledged by Kafka.",
    ["exchange", "type"],
    registry=REGISTRY,
)
DEADLETTERS = Counter(
    "collector_deadletters", "Frames dead-lettered, by reason.", ["exchange", "reason"], registry=REGISTRY
)
SEND_ERRORS = Counter(
    "collector_send_errors",
    "Records the broker did not acknowledge at first (they are retried).",
    ["exchange"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "collector_events", "collector.events records emitted by this worker.", ["exchange", "type"],
    registry=REGISTRY,
)  # fmt: skip
GAPS = Counter(
    "collector_gaps",
    "Gaps in a symbol's records, once settled: repaired from REST history, or unrecoverable.",
    ["exchange", "type", "outcome"],
    registry=REGISTRY,
)
RECORDS_LOST = Counter(
    "collector_records_lost",
    "Records inside unrecoverable gaps, where the exchange's ids count them.",
    ["exchange", "type"],
    registry=REGISTRY,
)
REST_WEIGHT_USED = Gauge(
    "collector_rest_weight_used",
    "REST request weight used in the exchange's current window, as the exchange last reported it.",
    ["exchange"],
    registry=REGISTRY,
)
ALERTS = Counter("collector_alerts", "Alerts raised by the manager.", ["exchange", "kind"], registry=REGISTRY)
RECOVERIES_REQUESTED = Counter(
    "collector_recoveries_requested",
    "Recoveries of stuck connectors ordered by the manager.",
    ["exchange"],
    registry=REGISTRY,
)

MAX_NORMALIZED_CONNECTIONS = 256  # connections a flow meter remembers (each reconnect makes a new id)

# Header names exchanges use to report the request weight used in their current window.
_WEIGHT_HEADERS = ("X-MBX-USED-WEIGHT-1M", "X-MBX-USED-WEIGHT")


class BulkHistogram(Collector):
    """A labelled histogram that takes many observations at once.

    prometheus_client's Histogram takes a lock per observation; a normalize step observes hundreds.
    Everything here runs on the worker's event loop, like the /metrics view that reads it.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: Iterable[float]):
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = tuple(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}

    def observe_many(self, label_values: tuple[str, ...], values: Iterable[float]) -> list[int]:
        """Add observations; returns how many fell in each bucket (last one: above the highest bound)."""
        series = self._series.get(label_values)
        if series is None:
            series = self._series[label_values] = _Series(len(self.bounds) + 1)
        bounds = self.bounds
        added = [0] * (len(bounds) + 1)
        total = 0.0
        for value in values:
            added[bisect_left(bounds, value)] += 1
            total += value
        for index, count in enumerate(added):
            series.counts[index] += count
        series.total += total
        return added

    def snapshot(self, label_values: tuple[str, ...]) -> list[int]:
        series = self._series.get(label_values)
        return list(series.counts) if series else [0] * (len(self.bounds) + 1)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for label_values, series in sorted(self._series.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(_bound_text, self.bounds), "+Inf"), series.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(label_values), cumulative, series.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))


@dataclass
class _Series:
    size: int
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * self.size


def _bound_text(bound: float) -> str:
    return repr(float(bound))


LATENCY = BulkHistogram(
    "collector_latency_seconds",
    "Latency of market records: exchange event time to receipt, and receipt to Kafka acknowledgement.",
    ("exchange", "stage"),
    LATENCY_BUCKETS,
)
REGISTRY.register(LATENCY)


@functools.cache
def _child(metric: Any, *label_values: str) -> Any:
    """A metric's child for these label values, looked up once: on the paths run for every flush and
    every acknowledgement, `labels()` cost more than the increments."""
    return metric.labels(*label_values)


# ---- per-coin flow, aggregated in the normalize agents --------------------------------------------


class FlowMeter:
    """Counts one exchange's normalized records, per coin and type, for metrics and flow summaries."""

    def __init__(self, exchange: str, clock: Callable[[], int] | None = None) -> None:
        self.exchange = exchange
        self._clock = clock or now_ms
        self._pending: list[tuple[MarketRecord, str]] = []  # with the topic it was written to
        self._interval_started = self._clock()
        self._coins: dict[str, CoinFlow] = {}
        self._dead_letters: dict[str, int] = {}
        self._raw_bytes = 0
        self._latency: dict[str, list[int]] = {}
        self._send_retries_seen = 0
        # connection id → receipt time of the newest frame normalized from it. Kept across intervals
        # (a starved normalize agent reports nothing new, and the manager must still see how far back
        # it is), bounded to the most recent connections.
        self._normalized: dict[str, int] = {}
        self._normalized_changed = False
        # Symbol → order book state (synced, syncing) of the books the normalize agent keeps.
        self.book_states: Callable[[], dict[str, BookFlow]] | None = None
        self._queue_usage_sent: QueueUsage | None = QueueUsage()  # an empty spool is no news

    def record(self, record: MarketRecord, topic: str) -> None:
        """Called once per normalized record: keep it cheap."""
        self._pending.append((record, topic))

    def normalized(self, connection_id: str, received_at: int) -> None:
        """A raw batch of `connection_id` was normalized, its newest frame received at `received_at`."""
        seen = self._normalized
        # Re-inserted so the dict stays ordered by use; a batch replayed after a rebalance is older
        # and does not move the time back.
        seen[connection_id] = max(received_at, seen.pop(connection_id, 0))
        self._normalized_changed = True
        if len(seen) > MAX_NORMALIZED_CONNECTIONS:
            del seen[next(iter(seen))]

    def dead_letter(self, reason: str) -> None:
        DEADLETTERS.labels(self.exchange, reason).inc()
        self._dead_letters[reason] = self._dead_letters.get(reason, 0) + 1

    def hand_over(self) -> list[tuple[MarketRecord, str]]:
        """The records (with their topics) recorded since the last call, now on their way to the broker."""
        pending, self._pending = self._pending, []
        return pending

    def acknowledged(
        self,
        pending: list[tuple[MarketRecord, str]],
        raw_bytes: int,
        send_retries: int = 0,
        acknowledged_at: Mapping[str, int] | None = None,
    ) -> None:
        """The broker has acknowledged `pending` (one `hand_over`), made from `raw_bytes` of raw input.
        `acknowledged_at` tells when each topic's records were acknowledged; a topic it lacks counts
        as acknowledged now, when the whole hand-over has settled."""
        self._raw_bytes += raw_bytes
        if send_retries > self._send_retries_seen:
            SEND_ERRORS.labels(self.exchange).inc(send_retries - self._send_retries_seen)
            self._send_retries_seen = send_retries
        if not pending:
            return
        settled_at = self._clock()
        per_topic = acknowledged_at or {}
        per_type: dict[str, int] = {}
        coins = self._coins
        to_receive: list[float] = []
        to_append: list[float] = []
        # One pass: at a quiet worker's rates this ran for every hand-over's acknowledgement.
        for record, topic in pending:
            kind, received_at, timestamp = record.type, record.received_at, record.timestamp
            per_type[kind] = per_type.get(kind, 0) + 1
            coin = coins.get(record.symbol)
            if coin is None:
                coin = coins[record.symbol] = CoinFlow()
            coin.records[kind] = coin.records.get(kind, 0) + 1
            if received_at > coin.last_received_at:
                coin.last_received_at = received_at
            if timestamp > coin.last_event_at:
                coin.last_event_at = timestamp
            # Clock skew can put an exchange's event time after our receive time: count it as zero.
            to_receive.append((received_at - timestamp) / 1000.0 if received_at > timestamp else 0.0)
            appended = per_topic.get(topic, settled_at) - received_at
            to_append.append(appended / 1000.0 if appended > 0 else 0.0)
        for record_type, count in per_type.items():
            _child(MESSAGES_PROCESSED, self.exchange, record_type).inc(count)
            _child(MESSAGES_SENT, self.exchange, record_type).inc(count)
        self._observe(EXCHANGE_TO_RECEIVE, to_receive)
        self._observe(RECEIVE_TO_APPEND, to_append)

    def _observe(self, stage: str, seconds: Iterable[float]) -> None:
        added = LATENCY.observe_many((self.exchange, stage), seconds)
        interval = self._latency.setdefault(stage, [0] * len(added))
        for index, count in enumerate(added):
            interval[index] += count

    def take_summary(
        self, worker: str, heard: dict[str, int] | None = None, queue_usage: QueueUsage | None = None
    ) -> FlowSummary | None:
        """The interval's summary, starting the next interval; None when nothing happened.
        `heard` is the source side's connector → newest frame received (`ExchangeSource.frames_heard`),
        `queue_usage` the exchange's raw spool (`spool_usage`)."""
        ended_at = self._clock()
        books = self.book_states() if self.book_states is not None else {}
        # A spool holding batches is news every interval; an empty one only when it just drained.
        spooling = queue_usage is not None and (queue_usage.bytes or queue_usage != self._queue_usage_sent)
        happened = self._coins or self._dead_letters or self._raw_bytes or self._normalized_changed
        if not (happened or heard or spooling or books):
            self._interval_started = ended_at
            return None
        summary = FlowSummary(
            exchange=self.exchange,
            worker=worker,
            started_at=self._interval_started,
            ended_at=ended_at,
            coins=self._coins,
            dead_letters=self._dead_letters,
            raw_bytes=self._raw_bytes,
            latency=self._latency,
            connections=heard or {},
            normalized=dict(self._normalized),
            books=books,
            queue_usage=queue_usage,
        )
        self._queue_usage_sent = queue_usage
        self._normalized_changed = False
        self._interval_started = ended_at
        self._coins, self._dead_letters, self._raw_bytes, self._latency = {}, {}, 0, {}
        return summary


_meters: dict[str, FlowMeter] = {}


def flow_meter(exchange: str) -> FlowMeter:
    """The process's flow meter for an exchange (one normalize agent per exchange per worker)."""
    meter = _meters.get(exchange)
    if meter is None:
        meter = _meters[exchange] = FlowMeter(exchange)
    return meter


def flow_meters() -> list[FlowMeter]:
    return list(_meters.values())


# ---- the raw spool (agents/writer.py RawProducer) --------------------------------------------------

SPOOL_BYTES = Gauge(
    "collector_spool_bytes",
    "Raw batches the broker has not acknowledged yet: waiting in memory, on disk, and in flight (bytes).",
    ["exchange"],
    registry=REGISTRY,
)
SPOOL_DISK_BYTES = Gauge(
    "collector_spool_disk_bytes", "The part of collector_spool_bytes waiting on disk.", ["exchange"],
    registry=REGISTRY,
)  # fmt: skip
SPOOL_DROPPED_BATCHES = Counter(
    "collector_spool_dropped_batches",
    "Raw batches never delivered: the spool was full, or no broker would take them (too large).",
    ["exchange"],
    registry=REGISTRY,
)
SPOOL_DROPPED_BYTES = Counter(
    "collector_spool_dropped_bytes", "Bytes of those batches.", ["exchange"], registry=REGISTRY
)

_spools: dict[str, QueueUsage] = {}


def spool_reported(exchange: str, usage: QueueUsage) -> None:
    """The raw producer's latest figures for an exchange (it reports them every poll)."""
    previous = _spools.get(exchange)
    if previous == usage:
        return  # every poll reports; most report nothing new
    previous = previous or QueueUsage()
    SPOOL_BYTES.labels(exchange).set(usage.bytes)
    SPOOL_DISK_BYTES.labels(exchange).set(usage.disk_bytes)
    if usage.dropped_batches > previous.dropped_batches:
        SPOOL_DROPPED_BATCHES.labels(exchange).inc(usage.dropped_batches - previous.dropped_batches)
        SPOOL_DROPPED_BYTES.labels(exchange).inc(max(usage.dropped_bytes - previous.dropped_bytes, 0))
    _spools[exchange] = usage


def spool_usage() -> dict[str, QueueUsage]:
    """This worker's raw spool per exchange, as last reported (empty: no raw producer runs here)."""
    return dict(_spools)


_unanswered_since = 0


def broker_unanswered(since: int) -> None:
    """The raw producer has waited since `since` (epoch ms) for the broker to acknowledge anything
    (0: nothing waits, or it answers)."""
    global _unanswered_since
    _unanswered_since = since


def broker_unanswered_since() -> int:
    return _unanswered_since


# ---- connections, frames, events ----------------------------------------------------------------


def connection_opened(exchange: str, reconnect: bool) -> None:
    CONNECTIONS.labels(exchange).inc()
    CONNECTIONS_ACTIVE.labels(exchange).inc()
    if reconnect:
        RECONNECTS.labels(exchange).inc()


def connection_closed(exchange: str) -> None:
    CONNECTIONS_ACTIVE.labels(exchange).dec()


def connection_failed(exchange: str) -> None:
    CONNECTION_FAILURES.labels(exchange).inc()


def frames_received(exchange: str, frames: int, size: int) -> None:
    _child(FRAMES_RECEIVED, exchange).inc(frames)
    _child(BYTES_RECEIVED, exchange).inc(size)


def rest_weight_reported(exchange: str, headers: Mapping[str, str]) -> None:
    """Record the weight an exchange's REST response says has been used, if it says so."""
    for name in _WEIGHT_HEADERS:
        value = headers.get(name)
        if value is not None and value.strip().isdigit():
            REST_WEIGHT_USED.labels(exchange).set(int(value))
            return


def event_emitted(event: CollectorEvent) -> None:
    EVENTS.labels(event.exchange, event.type).inc()


def gap_closed(exchange: str, record_type: str, outcome: str, missing: int | None) -> None:
    GAPS.labels(exchange, record_type, outcome).inc()
    if outcome == "unrecoverable" and missing:
        RECORDS_LOST.labels(exchange, record_type).inc(missing)


# ---- the process ----------------------------------------------------------------------------------


class ProcessSampler:
    """CPU use between samples (percent of one core) and resident memory of this process."""

    def __init__(self) -> None:
        self._last_cpu = self._cpu_seconds()
        self._last_wall = time.monotonic()

    @staticmethod
    def _cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def sample(self) -> dict[str, float]:
        cpu, wall = self._cpu_seconds(), time.monotonic()
        elapsed = wall - self._last_wall
        percent = 100.0 * (cpu - self._last_cpu) / elapsed if elapsed > 0 else 0.0
        self._last_cpu, self._last_wall = cpu, wall
        return {"cpuPercent": round(percent, 1), "rssBytes": float(resident_bytes())}


def resident_bytes() -> int:
    resident = resident_bytes_of(os.getpid())
    return resident if resident is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes_of(pid: int) -> int | None:
    """A process's resident memory from /proc/<pid>/statm; None if it is gone or cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ComputedGauge(Collector):
    """A labelled gauge whose samples a function computes at scrape time (e.g. from a table)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        samples: Callable[[], Iterable[tuple[list[str], float]]],
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self._samples = samples

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for label_values, value in self._samples():
            family.add_metric(label_values, value)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))


_computed: dict[str, ComputedGauge] = {}


def register_computed(gauge: ComputedGauge) -> None:
    """Register a computed gauge, replacing one of the same name (a worker built again in one process)."""
    earlier = _computed.pop(gauge.name, None)
    if earlier is not None:
        REGISTRY.unregister(earlier)
    REGISTRY.register(gauge)
    _computed[gauge.name] = gauge


def exposition() -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(REGISTRY)


# ---- the memory the worker may use ------------------------------------------------------------------

MEMORY_LIMIT = Gauge(
    "collector_memory_limit_bytes",
    "Memory this worker may use: the tightest cgroup v2 memory.max above it, else the machine's MemTotal "
    "(0: unknown).",
    registry=REGISTRY,
)


def memory_limit_bytes(cgroup_limits: Iterable[str], meminfo: str) -> int | None:
    """The memory a process may use, from file contents: the tightest of the cgroup v2 `memory.max`
    files on the way from its cgroup to the root (`max` means none) and the machine's MemTotal."""
    limits = [int(text) for text in (content.strip() for content in cgroup_limits) if text.isdigit()]
    total = meminfo_total_bytes(meminfo)
    if total is not None:
        limits.append(total)  # a cgroup limit above the machine's memory is no limit
    return min(limits) if limits else None


def meminfo_total_bytes(meminfo: str) -> int | None:
    """MemTotal from /proc/meminfo's text (`MemTotal:  24683784 kB`), in bytes."""
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "MemTotal":
            fields = value.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return None


def cgroup_v2_dirs(proc_self_cgroup: str) -> list[str]:
    """The process's cgroup v2 directory and its ancestors up to the root, from /proc/self/cgroup's
    `0::/a/b` line: `["a/b", "a", ""]` (relative to the cgroup2 mount); none without cgroup v2."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            parts = [part for part in line[3:].strip().split("/") if part]
            return ["/".join(parts[:depth]) for depth in range(len(parts), -1, -1)]
    return []


def read_memory_limit(cgroup_mount: str = "/sys/fs/cgroup") -> int | None:
    """The memory this process may use (see `memory_limit_bytes`); None when nothing says."""

    def text_of(path: str) -> str | None:
        try:
            with open(path, encoding="ascii") as file:
                return file.read()
        except (OSError, ValueError):
            return None

    directories = cgroup_v2_dirs(text_of("/proc/self/cgroup") or "")
    limits = [text_of(os.path.join(cgroup_mount, directory, "memory.max")) for directory in directories]
    return memory_limit_bytes(
        [limit for limit in limits if limit is not None], text_of("/proc/meminfo") or ""
    )


EMBEDDED_BROKER_MEMORY = Gauge(
    "collector_embedded_broker_memory_bytes",
    "Resident memory of the embedded broker this worker runs (bytes; 0 on a worker without one).",
    registry=REGISTRY,
)


@functools.cache
def memory_limit() -> int | None:
    """`read_memory_limit`, read once: the limit does not change while the worker runs."""
    return read_memory_limit()


def set_memory_limit() -> None:
    """Called once when a worker starts."""
    limit = memory_limit()
    if limit is not None:
        MEMORY_LIMIT.set(limit)


# ---- live distribution (agents/distribution.py) ---------------------------------------------------

WS_CLIENTS = Gauge("collector_ws_clients", "Clients connected to /ws/exchange.", registry=REGISTRY)
WS_MESSAGES_SENT = Counter(
    "collector_ws_messages_sent", "Data messages written to /ws/exchange clients.", registry=REGISTRY
)
WS_DISCONNECTS = Counter(
    "collector_ws_disconnects",
    "/ws/exchange clients gone: client, connection-lost, too-slow, ping-timeout, server-stop, error.",
    ["reason"],
    registry=REGISTRY,
)
