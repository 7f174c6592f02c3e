"""How the raw spool is reported: the metrics, the flow summaries that carry each worker's spool to the
collectors table (`queueUsage` on /collectors), the `spool-growing` alert, the manager holding its
judgement while the broker is silent, and the `kafka.spool` / `spoolAlertBytes` settings.
All pure: no broker, no worker (the end-to-end path is tests/test_e2e_broker_pause.py)."""

from __future__ import annotations

import msgspec
import pytest

from agents import metrics
from streams.config import ConfigError, parse_config
from tables.manager import BROKER_GRACE_MS, ManagerSettings, evaluate
from tables.records import FlowSummary, QueueUsage, decode_flow, encode
from tables.state import Tables, apply_flow, new_coin, new_connector
from tables.summary import FRESH_MS, collector_overview, queue_usage, spool_bytes

MIB = 1024 * 1024
SETTINGS = ManagerSettings(stale_after_ms=10_000, stuck_after_ms=30_000, spool_alert_bytes=16 * MIB)
EXCHANGES = {
    "binance": {
        "wsEndpoint": "wss://stream.binance.com:9443",
        "restEndpoint": "https://api.binance.com",
        "symbols": ["BTC/USDT"],
        "dataTypes": ["trade"],
    }
}


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def usage(held: int, **fields: int) -> QueueUsage:
    return QueueUsage(bytes=held, **fields)


# -- metrics and flow summaries ---------------------------------------------------------------------------


def test_the_spool_shows_as_gauges_and_its_drops_as_counters() -> None:
    metrics.spool_reported("spool-metric-test", usage(5000, memory_bytes=1000, disk_bytes=4000))
    assert sample("collector_spool_bytes", exchange="spool-metric-test") == 5000
    assert sample("collector_spool_disk_bytes", exchange="spool-metric-test") == 4000
    metrics.spool_reported("spool-metric-test", usage(0, dropped_batches=3, dropped_bytes=900))
    metrics.spool_reported("spool-metric-test", usage(0, dropped_batches=3, dropped_bytes=900))  # again
    assert sample("collector_spool_bytes", exchange="spool-metric-test") == 0
    assert sample("collector_spool_dropped_batches_total", exchange="spool-metric-test") == 3
    assert sample("collector_spool_dropped_bytes_total", exchange="spool-metric-test") == 900
    assert metrics.spool_usage()["spool-metric-test"].dropped_batches == 3


def test_a_flow_summary_carries_the_spool_while_it_holds_batches_and_once_more_when_it_drained() -> None:
    times = iter(range(0, 100_000, 1000))
    meter = metrics.FlowMeter("spool-flow-test", clock=lambda: next(times))
    assert meter.take_summary("w", queue_usage=QueueUsage()) is None  # an empty spool is no news
    held = usage(2 * MIB, disk_bytes=MIB, batches=40)
    for _ in range(2):  # every interval while it holds batches, even with nothing else to say
        summary = meter.take_summary("w", queue_usage=held)
        assert summary is not None and summary.queue_usage == held
    drained = usage(0, dropped_batches=1)
    summary = meter.take_summary("w", queue_usage=drained)
    assert summary is not None and summary.queue_usage == drained
    assert meter.take_summary("w", queue_usage=drained) is None
    # On the wire as camelCase JSON, like the rest of the summary.
    wire = msgspec.json.decode(encode(summary))
    assert wire["queueUsage"] == {
        "bytes": 0, "memoryBytes": 0, "diskBytes": 0, "inFlightBytes": 0, "batches": 0,
        "droppedBatches": 1, "droppedBytes": 0,
    }  # fmt: skip
    assert decode_flow(encode(summary)) == summary


def flow(worker: str, ended: int, spool: QueueUsage | None) -> FlowSummary:
    return FlowSummary("binance", worker, ended - 2000, ended, coins={}, queue_usage=spool)


class Rows:
    def __init__(self) -> None:
        self.collectors: dict[str, dict] = {}
        self.offset = 0

    def apply(self, summary: FlowSummary) -> None:
        tables = Tables(lambda key: None, lambda key: None, self.collectors.get, lambda exchange: [])
        changes = apply_flow(summary, self.offset, tables)
        self.offset += 1
        self.collectors.update(changes.collectors)


def test_each_workers_spool_reaches_the_collector_row_and_the_overview_sums_the_fresh_ones() -> None:
    rows = Rows()
    rows.apply(flow("w1", 10_000, usage(3 * MIB, memory_bytes=MIB, disk_bytes=2 * MIB, batches=30)))
    rows.apply(flow("w2", 10_000, usage(MIB, in_flight_bytes=MIB, batches=5, dropped_batches=2)))
    rows.apply(flow("w3", 10_000, None))  # runs no raw producer
    row = rows.collectors["binance"]
    assert row["workers"]["w1"]["queueUsage"]["diskBytes"] == 2 * MIB
    assert "queueUsage" not in row["workers"]["w3"]
    overview = collector_overview(row, "binance", now=11_000)
    assert overview["queueUsage"] == {
        "bytes": 4 * MIB, "memoryBytes": MIB, "diskBytes": 2 * MIB, "inFlightBytes": MIB, "batches": 35,
        "droppedBatches": 2, "droppedBytes": 0,
    }  # fmt: skip
    assert overview["workers"]["w2"]["queueUsage"]["batches"] == 5
    # A worker that stopped reporting no longer counts; this worker's live figure replaces its own.
    later = 10_000 + FRESH_MS + 1
    rows.apply(flow("w2", later, usage(MIB)))
    assert queue_usage(row, later)["bytes"] == MIB
    live = queue_usage(row, later, local=usage(7 * MIB), worker="w1")
    assert live["bytes"] == 8 * MIB
    assert spool_bytes({"binance": row}, later, {"upbit": usage(5)}, "w1") == {"binance": MIB, "upbit": 5}
    assert collector_overview(None, "upbit", later, usage(5), "w1")["queueUsage"]["bytes"] == 5


# -- the alert, and the manager's judgement while the broker is silent ------------------------------------


def test_a_spool_past_the_threshold_raises_spool_growing_once_and_resolves_it_when_back_under() -> None:
    [alert] = evaluate([], [], set(), {}, 1000, SETTINGS, {"binance": 16 * MIB + 1, "upbit": 0}).alerts
    assert (alert.key, alert.kind, alert.status, alert.exchange) == (
        "spool-growing:binance", "spool-growing", "firing", "binance",
    )  # fmt: skip
    assert alert.detail == {"bytes": 16 * MIB + 1, "thresholdBytes": 16 * MIB}
    assert "16.0 MiB" in alert.message
    open_alerts = {"spool-growing:binance"}
    assert not evaluate([], [], open_alerts, {}, 2000, SETTINGS, {"binance": 20 * MIB}).alerts
    [resolved] = evaluate([], [], open_alerts, {}, 3000, SETTINGS, {"binance": 16 * MIB}).alerts
    assert (resolved.key, resolved.status) == ("spool-growing:binance", "resolved")


def test_while_the_broker_is_silent_and_shortly_after_coins_and_connectors_are_not_judged() -> None:
    stuck = new_connector("binance", "binance-0", 0)
    stuck.update(state="recovering", connectionId="binance-0-1-1")
    silent = new_coin("binance", "BTC/USDT", 0)
    silent.update(state="subscribed", lastReceivedAt=0)
    now = 100_000
    judged = evaluate([silent], [stuck], set(), {}, now, SETTINGS, {"binance": 20 * MIB})
    assert judged.recoveries and {a.kind for a in judged.alerts} == {"coin-stale", "spool-growing"}
    for answered_at in (now, now - BROKER_GRACE_MS + 1):  # silent now; answered just now
        held = evaluate([silent], [stuck], set(), {}, now, SETTINGS, {"binance": 20 * MIB}, answered_at)
        assert not held.recoveries and [a.kind for a in held.alerts] == ["spool-growing"]
    after = evaluate([silent], [stuck], set(), {}, now, SETTINGS, {}, now - BROKER_GRACE_MS)
    assert after.recoveries


# -- settings ---------------------------------------------------------------------------------------------


def test_spool_settings_have_defaults_and_refuse_bad_values_naming_the_key() -> None:
    config = parse_config({"exchanges": EXCHANGES})
    spool = config.kafka.spool
    assert (spool.memoryBytes, spool.diskBytes, spool.directory) == (64 * MIB, 1024 * MIB, None)
    assert config.monitoring.alerts.spoolAlertBytes == 16 * MIB
    assert ManagerSettings.from_alerts(config.monitoring.alerts).spool_alert_bytes == 16 * MIB
    custom = parse_config(
        {"exchanges": EXCHANGES, "kafka": {"spool": {"diskBytes": 0, "directory": "/srv/s"}}}
    )
    assert (custom.kafka.spool.diskBytes, custom.kafka.spool.directory) == (0, "/srv/s")
    with pytest.raises(ConfigError, match=r"kafka\.spool\.memoryBytes"):
        parse_config({"exchanges": EXCHANGES, "kafka": {"spool": {"memoryBytes": 1000}}})
    with pytest.raises(ConfigError, match=r"kafka\.spool\.sizeBytes: unknown key"):
        parse_config({"exchanges": EXCHANGES, "kafka": {"spool": {"sizeBytes": 1}}})
    with pytest.raises(ConfigError, match=r"monitoring\.alerts\.spoolAlertBytes"):
        parse_config({"exchanges": EXCHANGES, "monitoring": {"alerts": {"spoolAlertBytes": 0}}})
