"""The broker stops answering (SIGSTOP: what a long GC pause, a stalled disk or a frozen VM look like
to a client, with every connection left open) while trades flow; then it is continued.

One worker collects a steady simulated Binance market into a broker the test runs itself, so pausing
it does not pause anything of the worker's. The worker must keep reading the exchange, keep every raw
batch in its spool (in memory and then on disk: the test gives it 1 MiB of memory), resend them when
the broker is back, and carry on without a restart; every trade the market made must then be on its
topic exactly once. The spool is big enough that nothing needs repairing from REST, so the count
proves the spool alone loses nothing. While the broker is paused, /health must answer promptly that
it is unreachable, and the spool must show in `collector_spool_bytes`, `/collectors` and the
`spool-growing` alert.

The 45 s pause runs with the end-to-end tests. The 6-minute pause (longer than librdkafka's default
message timeout and its longest request timeout, so produce requests in flight when the broker
stopped time out and are sent again) is marked `soak`: `make test-soak`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.harness import (
    FaultTally,
    SimulatedExchange,
    Simulator,
    TopicReader,
    Worker,
    assert_clean_exit,
    broker_paused,
    wait_for,
    write_config,
)

SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT", "SOL/USDT", "XRP/USDT"]
RATE = 50  # trades per second per symbol: 250 trades/s
SPOOL = {"memoryBytes": 1024 * 1024, "diskBytes": 512 * 1024 * 1024}  # small memory: the pause spills
SPOOL_ALERT_BYTES = 256 * 1024
HEALTH_ANSWERS_WITHIN = 8.0  # seconds: the broker check gives up after 3
_SPOOL_LINE = re.compile(r'^collector_spool_(bytes|disk_bytes)\{exchange="binance"\} (\S+)$', re.M)


@dataclass
class PauseReport:
    """What one pause did, for the test's assertions and its printed summary."""

    seconds: float = 0.0
    peak_bytes: int = 0
    peak_disk_bytes: int = 0
    peak_batches: int = 0
    drain_seconds: float | None = None
    health: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # (seconds, status, body)

    def line(self) -> str:
        slowest = max((seconds for seconds, _, _ in self.health), default=0.0)
        return (
            f"paused {self.seconds:.0f} s: spool peak {self.peak_bytes / 1e6:.1f} MB"
            f" ({self.peak_disk_bytes / 1e6:.1f} MB on disk, {self.peak_batches} batches),"
            f" drained {self.drain_seconds:.1f} s after the broker was continued;"
            f" /health answered {len(self.health)} times while paused, in at most {slowest:.1f} s"
        )


def spool_metrics(worker: Worker) -> dict[str, float]:
    status, text = worker.request("/metrics")
    assert status == 200
    return {name: float(value) for name, value in _SPOOL_LINE.findall(text)}


def queue_usage(worker: Worker) -> dict[str, Any]:
    status, body = worker.request("/collectors")
    assert status == 200, body
    return next(c for c in body["collectors"] if c["exchange"] == "binance")["queueUsage"]


def watch_pause(worker: Worker, until: float, report: PauseReport) -> None:
    """While the broker is paused (the fault itself, so it sleeps: nothing can be read from the
    broker): /health answers promptly that it is unreachable, and the spool grows where /collectors
    shows it. Runs until `until` (epoch seconds)."""
    while time.time() < until:
        asked = time.monotonic()
        status, body = worker.request("/health")
        report.health.append((time.monotonic() - asked, status, body))
        usage = queue_usage(worker)
        report.peak_bytes = max(report.peak_bytes, usage["bytes"])
        report.peak_disk_bytes = max(report.peak_disk_bytes, usage["diskBytes"])
        report.peak_batches = max(report.peak_batches, usage["batches"])
        time.sleep(min(2.0, max(until - time.time(), 0.0)))


def run_pause(tmp_path: Path, broker: EmbeddedBroker, pause_seconds: float) -> PauseReport:
    """`broker` is the test's own (the `broker` fixture): pausing it pauses nothing of the worker's."""
    report = PauseReport()
    simulator = Simulator(SYMBOLS, rate=RATE)
    market = SimulatedExchange(simulator, "binance")
    config = write_config(
        tmp_path / "binance.yaml", simulator, SYMBOLS, ["trade"],
        kafka={"brokers": "embedded", "producer": {"lingerMs": 5, "compression": "lz4"}, "spool": SPOOL},
        monitoring={"alerts": {"spoolAlertBytes": SPOOL_ALERT_BYTES}},
    )  # fmt: skip
    worker = Worker(config, broker.bootstrap, tmp_path)
    reader = TopicReader(broker.bootstrap)
    try:
        worker.wait_ready(90)
        wait_for(lambda: market.subscribed_streams() == len(SYMBOLS), 60, "every trade stream subscribed")
        tally = FaultTally(market, SYMBOLS, reader)
        wait_for(lambda: tally.poll() and all(tally.seen.values()), 60, "trades of every symbol")

        with tally.fault(f"broker paused {pause_seconds:.0f} s"), broker_paused(broker) as pause:
            watch_pause(worker, pause.started + pause_seconds, report)
        assert pause.ended is not None
        report.seconds = pause.ended - pause.started

        def drained() -> bool:
            tally.poll()
            return spool_metrics(worker).get("bytes", 1.0) == 0.0

        wait_for(drained, 180, "the spool to drain", interval=0.5)
        report.drain_seconds = time.time() - pause.ended
        # The market goes on a while: the worker carries on after the broker came back.
        tally.poll(5.0)
        simulator.post("/_sim/pause")
        assert tally.wait_delivered(timeout=120), tally.table()
        print("\n" + tally.table() + "\n" + report.line())
        check_exactly_once(tally)
        check_after(worker, report)
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert_clean_exit(worker, code)
    return report


def check_exactly_once(tally: FaultTally) -> None:
    pause, overall = tally.rows()
    for row in (pause, overall):
        counts = row.total
        assert counts.generated > 0 and counts.delivered == counts.generated, row.as_dict()
        assert (counts.missing, counts.duplicated, counts.invented) == (0, 0, 0), row.as_dict()


def check_after(worker: Worker, report: PauseReport) -> None:
    # While paused: /health answered promptly, unhealthy, naming the broker and the spool.
    assert report.health, "no /health answer while the broker was paused"
    for seconds, status, body in report.health:
        assert seconds < HEALTH_ANSWERS_WITHIN, (seconds, body)
        assert status == 503 and body["broker"]["reachable"] is False, body
        assert any(reason.startswith("broker unreachable") for reason in body["reasons"]), body
    assert any("raw spool of binance" in reason for _, _, body in report.health for reason in body["reasons"])
    # The spool held the pause's batches, past its memory and on disk, and nothing was dropped.
    assert report.peak_bytes > SPOOL["memoryBytes"] and report.peak_disk_bytes > 0, report
    usage = queue_usage(worker)
    assert (usage["bytes"], usage["batches"], usage["droppedBatches"]) == (0, 0, 0), usage
    # Back to health, and the spool alert fired and was resolved.
    wait_for(lambda: worker.request("/health")[0] == 200, 60, "/health to be ok again")

    def spool_alerts() -> list[str]:
        status, body = worker.request("/alerts")
        assert status == 200
        if "spool-growing:binance" in {a["key"] for a in body["open"]}:
            return []
        return [a["status"] for a in body["latest"] if a["key"] == "spool-growing:binance"]

    assert wait_for(lambda: {"firing", "resolved"} <= set(spool_alerts()), 30, "the spool alert")
    log = worker.log()
    assert "ALERT spool-growing" in log and "raw spool full" not in log


@pytest.mark.e2e
def test_a_45_second_broker_pause_loses_and_duplicates_no_trade(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    run_pause(tmp_path, broker, 45)


@pytest.mark.e2e
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_a_6_minute_broker_pause_loses_and_duplicates_no_trade(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    run_pause(tmp_path, broker, 360)
