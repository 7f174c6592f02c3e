"""The benchmark driver: its pure helpers, and one tiny step through the real pipeline.

The smoke step checks accounting (every trade the simulator sent is read back, none twice), never
timings: performance is judged by `make bench` alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench import broker_probe, clients, quiet_floor
from bench.acks import window_percentiles
from bench.profile import summarize
from bench.report import BEGIN, END, slice_table, table, write_results
from bench.step import StepResult, bench_symbols, percentiles, run_step
from streams.config import _SYMBOL
from tables.summary import LATENCY_BUCKETS


def test_bench_symbols_are_distinct_and_valid_config_symbols() -> None:
    symbols = bench_symbols(1000)
    assert len(set(symbols)) == 1000
    assert all(_SYMBOL.match(symbol) for symbol in symbols)


def test_percentiles_pick_nearest_ranks() -> None:
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50, "p95": 95, "p99": 99, "max": 100}
    assert percentiles([]) == {}


def test_results_replace_only_the_generated_section(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    document.write_text(f"# Benchmarks\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n")
    write_results(document, "new table\n")
    text = document.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# Benchmarks\n\nprose before") and text.endswith("prose after\n")


def test_profile_summary_counts_inclusive_and_exclusive_samples(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (app.py:1);parse (agents/normalize.py:10) 3\nmain (app.py:1);produce (agents/writer.py:20) 1\n"
    )
    summary = summarize(raw)
    assert "| `main (app.py)` | 100.0 | 0.0 |" in summary
    assert "| `parse (agents/normalize.py)` | 75.0 | 75.0 |" in summary


@pytest.mark.e2e
def test_a_tiny_step_reads_back_every_trade_the_simulator_sent(tmp_path: Path) -> None:
    result = run_step(symbols=3, rate=150, warmup=1.0, duration=2.0, log_dir=tmp_path, slice_seconds=1.0)
    assert result.sent_total > 0
    assert result.lost == 0 and result.duplicates == 0
    assert result.delivered_unique == result.sent_total
    assert result.worker_peak_rss > 0 and result.broker_rss > 0
    assert 0 < result.latency_received_acknowledged["p50"] <= result.latency_received_acknowledged["p99"]
    row = table([result]).splitlines()[-1]
    assert row.startswith("| 3 | 1 | 150 |")
    # Asked for slices: one per second of the window, each from the records received in it.
    assert [s.start for s in result.slices] == [0.0, 1.0]
    assert all(s.delivered_rate > 0 and s.latency_received_created["p50"] >= 0 for s in result.slices)
    assert all(s.worker_cpu > 0 and s.broker_cpu > 0 for s in result.slices)
    assert all(20 < s.worker_rss < 1000 and 1 < s.broker_rss < 1000 for s in result.slices)
    assert len(slice_table(result.slices).splitlines()) == 2 + 2
    assert sum(s.delivered_rate for s in result.slices) == pytest.approx(2 * result.delivered_rate, rel=0.5)


@pytest.mark.e2e
def test_the_broker_probe_fetches_new_records_at_each_partition_size() -> None:
    rows = broker_probe.run(ladder=(20, 60), rounds=5)
    assert [stored for stored, _ in rows] == [20, 60]
    for _, found in rows:
        assert found["not fetched"] == 0
        assert 0 <= found["fetch p50 ms"] <= found["fetch max ms"] < broker_probe.GIVE_UP_S * 1000


@pytest.mark.e2e
def test_the_quiet_floor_runs_each_part_on_the_feed_and_the_producers_deliver_every_frame() -> None:
    rows = quiet_floor.run(rounds=1, warmup=1.0, duration=1.5)
    assert [part for part, _ in rows] == list(quiet_floor.PARTS)
    for part, found in rows:
        assert found["frames per second"] > 0 and found["cpu percent"] > 0, part
        assert found["unacknowledged"] == 0, part  # flushed before the part's process ends
    assert quiet_floor._line(*rows[0]).startswith("| aiohttp reader alone | ")


def test_acknowledgement_percentiles_come_from_the_window_difference_summed_over_workers() -> None:
    empty = [0] * (len(LATENCY_BUCKETS) + 1)
    before = [empty, empty]
    after = [list(empty), list(empty)]
    after[0][LATENCY_BUCKETS.index(0.01)] = 50  # 5-10 ms on one worker
    after[1][LATENCY_BUCKETS.index(0.05)] = 50  # 40-50 ms on the other
    found = window_percentiles(before, after)
    assert found["p50"] == pytest.approx(10.0) and found["p99"] == pytest.approx(49.8)
    assert window_percentiles(before, before) == {}


def test_a_step_passes_only_without_loss_and_at_the_target_rate() -> None:
    good = StepResult(
        symbols=100, workers=1, target_rate=10_000, offered_rate=10_000.0, delivered_rate=10_000.0,
        sent_total=1, delivered_unique=1, duplicates=0, lost=0, drained_in=0.5, reconnects=0,
        latency_received_created={"p50": 5, "p95": 9, "p99": 12, "max": 20}, latency_received_read={},
        latency_event_created={}, latency_received_acknowledged={}, worker_cpu=50.0,
        worker_peak_rss=90.0, broker_cpu=40.0, broker_rss=80.0, simulator_cpu=20.0, load_average=1.0,
    )  # fmt: skip
    assert good.passed
    assert not replace(good, lost=1).passed
    assert not replace(good, delivered_rate=8_000.0).passed
    assert not replace(good, drained_in=None).passed
    assert good.worker_us_per_event == 50.0


@pytest.mark.e2e
def test_the_client_comparison_runs_both_market_producers_and_each_delivers_every_record() -> None:
    rows = clients.run(((30, 2000),), rounds=1, warmup=0.5, duration=1.5)
    assert [client for client, *_ in rows] == list(clients.CLIENTS)
    for client, topics, rate, found in rows:
        assert (topics, rate) == (30, 2000)
        assert found["acknowledged per second"] > 0 and found["broker cpu percent"] > 0, client
        assert found["failed"] == 0 and found["unacknowledged"] == 0, client
    assert clients._line(*rows[1]).startswith("| aiokafka | 30 | 2,000 | ")
