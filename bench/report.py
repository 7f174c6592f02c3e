"""The benchmark table, printed and written into docs/benchmarks.md between markers."""

from __future__ import annotations

import re
from pathlib import Path

from bench.step import Slice, StepResult

BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def _lat(values: dict[str, float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{values[k]:.0f}" for k in ("p50", "p95", "p99", "max") if k in values)


def table(results: list[StepResult]) -> str:
    header = (
        "| symbols | workers | target ev/s | offered ev/s | delivered ev/s | missing | dup | "
        "receipt→CreateTime ms p50/p95/p99/max | receipt→acknowledged ms p50/p95/p99 | "
        "receipt→read back ms p50/p95/p99/max | "
        "event→CreateTime ms p50/p95/p99/max | worker CPU % | worker CPU µs/event | worker peak RSS MB | "
        "broker CPU % | broker RSS MB | simulator CPU % | load avg | result |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        if r.passed:
            verdict = "ok"
        elif r.drained_in is None:
            # Still missing when the drain timed out: lost, or stuck in a backlog the worker never
            # caught up with; either way the worker did not carry this rate.
            verdict = "behind/lost"
        else:
            verdict = "below rate"
        rows.append(
            f"| {r.symbols}{' (trade+bbo)' if r.bbo else ''} | {r.workers} | {r.target_rate:,} | "
            f"{r.offered_rate:,.0f} | "
            f"{r.delivered_rate:,.0f} | {r.lost} | {r.duplicates} | {_lat(r.latency_received_created)} | "
            f"{_lat(r.latency_received_acknowledged)} | {_lat(r.latency_received_read)} | "
            f"{_lat(r.latency_event_created)} | {r.worker_cpu:.1f} | {r.worker_us_per_event:.0f} | "
            f"{r.worker_peak_rss:.0f} | {r.broker_cpu:.0f} | {r.broker_rss:.0f} | {r.simulator_cpu:.0f} | "
            f"{r.load_average:.1f} | {verdict} |"
        )
    return header + "\n".join(rows) + "\n"


def summary(results: list[StepResult]) -> str:
    lines = []
    for symbols in sorted({r.symbols for r in results if r.workers == 1}):
        ok = [r for r in results if r.symbols == symbols and r.workers == 1 and r.passed]
        best = max(ok, key=lambda r: r.delivered_rate, default=None)
        lines.append(
            f"- {symbols} symbols, one worker: highest zero-loss rate that kept up "
            + (f"{best.target_rate:,} events/s (delivered {best.delivered_rate:,.0f}/s)" if best else "none")
        )
    return "\n".join(lines) + "\n"


def machine_line(machine: dict[str, str]) -> str:
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM, "
        f"Python {machine['python']}, Linux {machine['kernel']}; run {machine['when']}.\n"
    )


def write_results(path: Path, text: str) -> None:
    """Replace the generated section of the document, keeping the hand-written prose around it."""
    block = f"{BEGIN}\n{text}{END}"
    document = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in document:
        document += f"\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    path.write_text(pattern.sub(lambda _: block, document))


def slice_table(slices: list[Slice]) -> str:
    """A long step stretch by stretch (`python -m bench --soak`)."""
    lines = [
        "| from s | delivered ev/s (est.) | receipt→CreateTime ms p50/p95/p99/max | "
        "receipt→read back ms p50/p95/p99/max | worker CPU % | broker CPU % | "
        "worker RSS MB | broker RSS MB |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for s in slices:
        lines.append(
            f"| {s.start:.0f} | {s.delivered_rate:,.0f} | {_lat(s.latency_received_created)} | "
            f"{_lat(s.latency_received_read)} | {s.worker_cpu:.0f} | {s.broker_cpu:.0f} | "
            f"{s.worker_rss:.0f} | {s.broker_rss:.0f} |"
        )
    return "\n".join(lines) + "\n"
