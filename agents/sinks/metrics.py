"""The sinks' Prometheus metrics, in the collector's registry (agents/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from agents.metrics import REGISTRY

SINK_ROWS = Counter(
    "collector_sink_rows",
    "Market records a sink stored (committed to its database), per type.",
    ["sink", "type"],
    registry=REGISTRY,
)
SINK_ERRORS = Counter(
    "collector_sink_errors",
    "Failed attempts of a sink to write to its database or commit its offsets (it retries).",
    ["sink"],
    registry=REGISTRY,
)
SINK_REJECTED = Counter(
    "collector_sink_rejected",
    "Records a sink refused to store: undecodable, or a value that is not a plain decimal, time or text.",
    ["sink", "reason"],
    registry=REGISTRY,
)
SINK_LAG = Gauge(
    "collector_sink_lag_seconds",
    "How far a sink's database trails the market topics: age of the oldest record read, not yet stored.",
    ["sink"],
    registry=REGISTRY,
)
