"""Receipt → acknowledgement latency, from the workers' own Prometheus histogram.

The embedded broker cannot stamp LogAppendTime, so no record tells when it was appended. A worker
observes `collector_latency_seconds{stage="receive_to_append"}` when the broker acknowledges a
normalize step's records: after the append, so an upper bound on it. The bench reads the histogram
at both ends of the measured window and takes percentiles of the difference (interpolated inside
the histogram's buckets: 10 ms apart from 20 to 60 ms, 50 ms apart from 100 to 250 ms).
"""

from __future__ import annotations

import itertools
import re
import urllib.request

from tables.summary import LATENCY_BUCKETS, RECEIVE_TO_APPEND, quantile

_BUCKET = re.compile(r"^collector_latency_seconds_bucket\{(?P<labels>[^}]*)\} (?P<count>\S+)$", re.M)


def acknowledged_buckets(port: int, stage: str = RECEIVE_TO_APPEND) -> list[int]:
    """Per-bucket counts (not cumulative) of one worker's histogram, the overflow bucket last."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    cumulative: dict[float, float] = {}
    for match in _BUCKET.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("stage") == stage:
            bound = float(labels["le"])
            cumulative[bound] = cumulative.get(bound, 0.0) + float(match["count"])
    running = [int(cumulative.get(bound, 0.0)) for bound in (*LATENCY_BUCKETS, float("inf"))]
    return [running[0]] + [b - a for a, b in itertools.pairwise(running)]


def window_percentiles(before: list[list[int]], after: list[list[int]]) -> dict[str, float]:
    """p50/p95/p99 in ms of the observations made between two readings (summed over workers)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for start, end in zip(before, after, strict=True):
        for index, (a, b) in enumerate(zip(start, end, strict=True)):
            counts[index] += b - a
    found = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        seconds = quantile(LATENCY_BUCKETS, counts, q)
        if seconds is not None:
            found[name] = seconds * 1000
    return found
