"""The sinks' bench: its report, and one tiny run through real servers that checks the accounting
(every record written is stored), never timings."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from bench.sinks import BEGIN, END, SinkRun, _run, table, write_section


def test_the_report_replaces_only_its_own_section(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    document.write_text(
        "# Benchmarks\n\nladder prose\n<!-- bench:results:begin -->\nladder\n<!-- bench:results:end -->\n"
    )
    write_section(document, "first\n")
    write_section(document, "second\n")
    text = document.read_text()
    assert "ladder\n" in text and "first" not in text and f"{BEGIN}\nsecond\n{END}" in text
    assert text.count(BEGIN) == 1


def test_a_run_is_one_table_row() -> None:
    run = SinkRun(
        "postgres", "steady", 600_000, 600_000, 30_000, 29_950, 30_010, 1.25, 0.4, 0.9, 45, 20, 30, True
    )
    row = table([run]).splitlines()[-1]
    cells = "postgres | steady | 600,000 | 30,000 | 29,950 | 30,010 | 1.25 / 0.40 | 0.9 | 45 / 20 / 30 | yes"
    assert row == f"| {cells} |"


@pytest.mark.e2e  # a broker, PostgreSQL and Redis
@pytest.mark.parametrize("sink", ["postgres", "redis"])
def test_a_tiny_drain_stores_every_record(sink: str) -> None:
    args = argparse.Namespace(symbols=5, rate=1000.0, duration=1.0, backlog=2000, batch_rows=500)
    run = asyncio.run(_run(sink, "drain", args))
    assert (run.records, run.stored) == (2000, 2000)
    assert run.passed
