"""Figures derived from a collector row: rates, latency percentiles, worker resources.

Each worker's normalize agent reports its latest interval into the collector row; a report older
than `FRESH_MS` is from a worker that stopped reporting and no longer counts towards the rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from tables.records import QueueUsage
from tables.state import Row

# Seconds. Shared by the Prometheus histograms and the flow summaries' bucket counts.
# Fine around the 50 ms target: bench/acks.py interpolates percentiles inside these buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
EXCHANGE_TO_RECEIVE = "exchange_to_receive"
RECEIVE_TO_APPEND = "receive_to_append"
QUANTILES = (0.5, 0.9, 0.95, 0.99)
FRESH_MS = 10_000


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The q-quantile of a bucketed distribution, interpolated linearly inside its bucket
    (the way Prometheus' histogram_quantile does); None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        if count and running + count >= rank:
            if index >= len(bounds):  # above the highest bound: all we know is the bound
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - running) / count
        running += count
    return bounds[-1]


def percentiles(counts: list[int]) -> dict[str, float | None]:
    """p50, p90, p95, p99 in milliseconds."""
    found: dict[str, float | None] = {}
    for q in QUANTILES:
        seconds = quantile(LATENCY_BUCKETS, counts, q)
        found[f"p{round(q * 100)}"] = None if seconds is None else round(seconds * 1000, 3)
    return found


QUEUE_USAGE_FIELDS = tuple(msgspec.to_builtins(QueueUsage()))  # bytes, memoryBytes, ... (JSON names)


def queue_usage(
    row: Row | None, now: int, local: QueueUsage | None = None, worker: str | None = None
) -> dict[str, int]:
    """What the exchange's raw spools hold (`queueUsage`), summed over the workers that reported
    within FRESH_MS. `local` is this worker's own figure, read live: it replaces what `worker`
    reported, which during a broker outage cannot reach the table."""
    reports: dict[str, Mapping[str, Any]] = {}
    workers: Mapping[str, Row] = (row.get("workers") if row else None) or {}
    for name, reported in workers.items():
        if now - reported.get("at", 0) <= FRESH_MS and reported.get("queueUsage"):
            reports[name] = reported["queueUsage"]
    if local is not None and worker is not None:
        reports[worker] = msgspec.to_builtins(local)
    total = dict.fromkeys(QUEUE_USAGE_FIELDS, 0)
    for usage in reports.values():
        for field in QUEUE_USAGE_FIELDS:
            total[field] += int(usage.get(field) or 0)
    return total


def spool_bytes(
    rows: Mapping[str, Row], now: int, local: Mapping[str, QueueUsage], worker: str
) -> dict[str, int]:
    """Exchange → bytes its raw spools hold (see `queue_usage`), for every exchange with a row or a
    local spool."""
    exchanges = set(rows) | set(local)
    return {e: queue_usage(rows.get(e), now, local.get(e), worker)["bytes"] for e in sorted(exchanges)}


def collector_overview(
    row: Row | None,
    exchange: str,
    now: int,
    local_spool: QueueUsage | None = None,
    this_worker: str | None = None,
) -> dict[str, Any]:
    """The collector's state with rates, latency percentiles (ms), the raw spool (`queueUsage`, with
    this worker's live `local_spool`) and worker resources."""
    usage = queue_usage(row, now, local_spool, this_worker)
    if row is None:
        return {"exchange": exchange, "state": "ready", "since": None, "rate": 0.0, "bytesPerSecond": 0.0,
                "latencyMs": {}, "workers": {}, "recordsTotal": 0, "deadLetters": {}, "deadLettersTotal": 0,
                "events": {}, "books": {"synced": 0, "syncing": 0}, "queueUsage": usage}  # fmt: skip
    fresh = {name: w for name, w in row.get("workers", {}).items() if now - w.get("at", 0) <= FRESH_MS}
    merged: dict[str, list[int]] = {}
    for worker in fresh.values():
        for stage, counts in (worker.get("latency") or {}).items():
            if len(counts) != len(LATENCY_BUCKETS) + 1:  # a worker of a version with other buckets
                continue
            total = merged.setdefault(stage, [0] * len(counts))
            for index, count in enumerate(counts):
                total[index] += count
    books = {"synced": 0, "syncing": 0}
    for worker in fresh.values():
        for state, count in (worker.get("books") or {}).items():
            books[state] = books.get(state, 0) + count
    return {
        "exchange": exchange,
        "state": row["state"],
        "since": row["since"],
        "rate": round(sum(w.get("rate", 0.0) for w in fresh.values()), 3),
        "bytesPerSecond": round(sum(w.get("bytesPerSecond", 0.0) for w in fresh.values()), 1),
        "deadLettersPerSecond": round(sum(w.get("deadLettersPerSecond", 0.0) for w in fresh.values()), 3),
        "latencyMs": {stage: percentiles(counts) for stage, counts in merged.items()},
        "queueUsage": usage,
        "workers": {
            name: {
                key: w.get(key)
                for key in ("at", "rate", "bytesPerSecond", "cpuPercent", "rssBytes", "queueUsage")
            }
            for name, w in row.get("workers", {}).items()
        },
        "recordsTotal": row["recordsTotal"],
        "deadLetters": row["deadLetters"],
        "deadLettersTotal": row["deadLettersTotal"],
        "events": row["events"],
        "lastEventAt": row.get("lastEventAt"),
        "books": books,  # order books kept by the workers reporting now: synced, syncing
    }
