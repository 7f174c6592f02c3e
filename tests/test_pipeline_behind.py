"""End to end: a worker whose records trail their frames says so (`pipeline-behind`), with the
threshold taken from `monitoring.alerts.behindAfterSeconds`.

A worker that cannot keep up is hard to make on demand on a test machine, so the threshold is set
below what any pipeline achieves: 1 ms. Frames keep arriving, so at almost every flow summary one of
them is still on its way through the raw topic, and the connector's records trail its frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from tables.manager import describe_lag
from tests.harness import Simulator, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]


def behind_alerts(worker: Worker) -> list[dict[str, Any]]:
    status, body = worker.request("/alerts")
    if status != 200:
        return []
    seen = [*body["open"], *body["latest"]]
    return [alert for alert in seen if alert["key"].startswith("pipeline-behind:")]


def test_records_trailing_their_frames_beyond_the_threshold_raise_pipeline_behind(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        simulator = Simulator(SYMBOLS, rate=50)
        config = write_config(
            tmp_path / "c.yaml", simulator, SYMBOLS, ["trade", "bbo"],
            monitoring={"alerts": {"behindAfterSeconds": 0.001, "staleAfterSeconds": 600}},
        )  # fmt: skip
        worker = Worker(config, broker.bootstrap, tmp_path)
        try:
            worker.wait_ready()
            alerts = wait_for(lambda: behind_alerts(worker), 60, "a pipeline-behind alert")
            alert = alerts[0]
            assert alert["kind"] == "pipeline-behind" and alert["exchange"] == "binance"
            connector = alert["key"].removeprefix("pipeline-behind:")
            assert connector.startswith("binance-")
            assert "frames arrive but their records are" in alert["message"]

            def health_says_behind() -> dict[str, Any] | None:
                status, body = worker.request("/health")
                return body if status == 503 and body["pipelineBehindMs"] else None

            health = wait_for(health_says_behind, 30, "/health to report a connector behind")
            _, body = worker.request("/connectors")
            rows = {row["connector"]: row for row in body["connectors"]}
            assert connector in rows and set(health["pipelineBehindMs"]) <= set(rows)
            for name, lag in health["pipelineBehindMs"].items():
                assert lag > 1
                assert f"records of {name} are {describe_lag(lag)} behind its frames" in health["reasons"]
            assert all(row["state"] == "connected" for row in rows.values())
            assert all(row["lastFrameAt"] >= row["normalizedThrough"] > 0 for row in rows.values())
            # Behind is not stalled: the manager leaves a working connection alone.
            assert "recover-requested" not in worker.log()
            assert "ALERT pipeline-behind" in worker.log()
        finally:
            worker.stop()
            simulator.stop()
    assert "Traceback" not in worker.log(), worker.log()[-5000:]
