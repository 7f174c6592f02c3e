"""Prometheus metrics (agents/metrics.py) and the flow meter the normalize agents feed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agents import metrics
from streams.records import MarketRecord, Trade
from tables.summary import LATENCY_BUCKETS, collector_overview, percentiles, quantile


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def trade(symbol: str, timestamp: int, received_at: int) -> MarketRecord:
    data = Trade(price="1", quantity="2", side="buy", trade_id=str(timestamp), trade_time=timestamp)
    return MarketRecord("test", symbol, "trade", timestamp, received_at, data)


def test_bulk_histogram_exposes_cumulative_buckets_sum_and_count() -> None:
    histogram = metrics.BulkHistogram("test_seconds", "Test.", ("stage",), (0.1, 1.0))
    added = histogram.observe_many(("a",), [0.05, 0.1, 0.5, 3.0])
    assert added == [2, 1, 1]  # a value equal to a bound falls in that bound's bucket
    [family] = histogram.collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples == {
        ("test_seconds_bucket", "0.1"): 2,
        ("test_seconds_bucket", "1.0"): 3,
        ("test_seconds_bucket", "+Inf"): 4,
        ("test_seconds_count", None): 4,
        ("test_seconds_sum", None): pytest.approx(3.65),
    }


def test_quantiles_interpolate_inside_buckets_like_histogram_quantile() -> None:
    bounds = (0.01, 0.02, 0.05)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.005)
    assert quantile(bounds, [0, 10, 10, 0], 0.75) == pytest.approx(0.035)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 0.05  # above the highest bound: the bound
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[3] = 100  # all between 5 and 10 ms
    found = percentiles(counts)
    assert list(found) == ["p50", "p90", "p95", "p99"]
    assert found["p50"] == pytest.approx(7.5) and found["p99"] == pytest.approx(9.95)


def test_the_overview_merges_latency_only_from_workers_with_the_same_buckets() -> None:
    current = [0] * (len(LATENCY_BUCKETS) + 1)
    current[3] = 10  # 5-10 ms
    older_version = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40]  # 16 buckets: all above 10 s
    row = {
        "state": "running", "since": 0, "recordsTotal": 0, "deadLetters": {}, "deadLettersTotal": 0,
        "events": {},
        "workers": {
            "new": {"at": 1_000, "latency": {"receive_to_append": current}},
            "old": {"at": 1_000, "latency": {"receive_to_append": older_version}},
        },
    }  # fmt: skip
    overview = collector_overview(row, "binance", now=2_000)
    assert overview["latencyMs"]["receive_to_append"]["p99"] == pytest.approx(9.95)


def test_the_flow_meter_counts_per_coin_and_type_and_observes_both_latencies() -> None:
    clock = iter([1_000, 1_500, 2_000]).__next__
    meter = metrics.FlowMeter("meter-test", clock=clock)
    btc_topic, eth_topic = "market.trade.meter-test.btc-usdt", "market.trade.meter-test.eth-usdt"
    meter.record(trade("BTC/USDT", timestamp=1_390, received_at=1_400), btc_topic)
    meter.record(trade("BTC/USDT", timestamp=1_380, received_at=1_405), btc_topic)
    meter.record(trade("ETH/USDT", timestamp=1_450, received_at=1_440), eth_topic)  # exchange clock ahead
    meter.dead_letter("schema-mismatch")
    # The BTC topic's records were acknowledged at 1_420; ETH's time is unknown: the hand-over
    # settled at 1_500 (the clock's second reading).
    meter.acknowledged(meter.hand_over(), raw_bytes=150, send_retries=2, acknowledged_at={btc_topic: 1_420})

    assert sample("collector_messages_processed_total", exchange="meter-test", type="trade") == 3
    assert sample("collector_messages_sent_total", exchange="meter-test", type="trade") == 3
    assert sample("collector_deadletters_total", exchange="meter-test", reason="schema-mismatch") == 1
    assert sample("collector_send_errors_total", exchange="meter-test") == 2
    labels = {"exchange": "meter-test", "stage": "exchange_to_receive"}
    assert sample("collector_latency_seconds_count", **labels) == 3
    assert sample("collector_latency_seconds_sum", **labels) == pytest.approx(0.035)  # 10 + 25 + 0 ms
    labels = {"exchange": "meter-test", "stage": "receive_to_append"}
    assert sample("collector_latency_seconds_sum", **labels) == pytest.approx(0.02 + 0.015 + 0.06)
    assert sample("collector_latency_seconds_bucket", le="0.02", **labels) == 2
    assert sample("collector_latency_seconds_bucket", le="0.05", **labels) == 2
    assert sample("collector_latency_seconds_bucket", le="0.06", **labels) == 3

    summary = meter.take_summary("worker-1")
    assert summary is not None
    assert (summary.exchange, summary.worker, summary.started_at, summary.ended_at) == (
        "meter-test", "worker-1", 1_000, 2_000,
    )  # fmt: skip
    btc = summary.coins["BTC/USDT"]
    assert (btc.records, btc.last_received_at, btc.last_event_at) == ({"trade": 2}, 1_405, 1_390)
    assert summary.coins["ETH/USDT"].records == {"trade": 1}
    assert summary.dead_letters == {"schema-mismatch": 1}
    assert summary.raw_bytes == 150
    assert sum(summary.latency["exchange_to_receive"]) == 3
    assert sum(summary.latency["receive_to_append"]) == 3


def test_an_idle_flow_meter_has_no_summary_and_counts_retries_once() -> None:
    times = iter(range(0, 100_000, 1000))
    meter = metrics.FlowMeter("idle-test", clock=lambda: next(times))
    assert meter.take_summary("w") is None
    meter.acknowledged(meter.hand_over(), raw_bytes=0, send_retries=3)
    meter.acknowledged(meter.hand_over(), raw_bytes=0, send_retries=3)
    assert sample("collector_send_errors_total", exchange="idle-test") == 3
    assert meter.take_summary("w") is None


def test_the_flow_meter_reports_how_far_each_connection_was_normalized_and_what_the_source_heard() -> None:
    times = iter(range(0, 100_000, 1000))
    meter = metrics.FlowMeter("progress-test", clock=lambda: next(times))
    meter.normalized("conn-a", 5_000)
    meter.normalized("conn-a", 4_000)  # an older batch replayed after a rebalance does not move it back
    meter.normalized("conn-b", 6_000)
    summary = meter.take_summary("w", heard={"progress-test-0": 7_000})
    assert summary is not None
    assert summary.normalized == {"conn-a": 5_000, "conn-b": 6_000}
    assert summary.connections == {"progress-test-0": 7_000}
    # Nothing normalized since: a summary still goes out while the source hears frames, and still
    # says how far normalizing got (a starved agent must not look caught up)...
    summary = meter.take_summary("w", heard={"progress-test-0": 9_000})
    assert summary is not None and summary.normalized == {"conn-a": 5_000, "conn-b": 6_000}
    # ...but with nothing heard and nothing new there is nothing to report.
    assert meter.take_summary("w") is None
    for index in range(metrics.MAX_NORMALIZED_CONNECTIONS + 5):  # reconnects make new ids: bounded
        meter.normalized(f"churn-{index}", index)
    summary = meter.take_summary("w")
    assert summary is not None and len(summary.normalized) == metrics.MAX_NORMALIZED_CONNECTIONS
    assert (
        "conn-a" not in summary.normalized
        and f"churn-{metrics.MAX_NORMALIZED_CONNECTIONS + 4}" in summary.normalized
    )


def test_connection_metrics_track_open_connections_and_reconnects() -> None:
    metrics.connection_opened("conn-test", reconnect=False)
    metrics.connection_closed("conn-test")
    metrics.connection_failed("conn-test")
    metrics.connection_opened("conn-test", reconnect=True)
    assert sample("collector_connections_active", exchange="conn-test") == 1
    assert sample("collector_connections_total", exchange="conn-test") == 2
    assert sample("collector_reconnects_total", exchange="conn-test") == 1
    assert sample("collector_connection_failures_total", exchange="conn-test") == 1
    metrics.frames_received("conn-test", 10, 2048)
    assert sample("collector_messages_received_total", exchange="conn-test") == 10
    assert sample("collector_received_bytes_total", exchange="conn-test") == 2048


def test_rest_weight_is_read_from_the_exchange_header_when_present() -> None:
    metrics.rest_weight_reported("weight-test", {"Content-Type": "application/json"})
    assert sample("collector_rest_weight_used", exchange="weight-test") is None
    metrics.rest_weight_reported("weight-test", {"X-MBX-USED-WEIGHT-1M": "37"})
    assert sample("collector_rest_weight_used", exchange="weight-test") == 37
    metrics.rest_weight_reported("weight-test", {"X-MBX-USED-WEIGHT-1M": "garbage"})
    assert sample("collector_rest_weight_used", exchange="weight-test") == 37


def test_the_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs it (Debian package prometheus)"
    metrics.FlowMeter("promtool-test").dead_letter("invalid-json")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=metrics.exposition(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
