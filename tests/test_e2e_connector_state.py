"""Connector state on exchanges that never acknowledge a subscription (Upbit, Bithumb): once their
coins' records flow, their connectors are connected, not stuck in subscription-requesting (which
the manager takes for stuck and orders recovered)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agents.embedded_broker import EmbeddedBroker
from tests.harness import Simulator, Worker, wait_for

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/KRW", "ETH/KRW"]


def test_upbit_and_bithumb_connectors_are_connected_once_data_flows(tmp_path: Path) -> None:
    simulator = Simulator(["BTC/USDT", "ETH/USDT"], rate=10)
    exchanges = {
        name: {
            "wsEndpoint": simulator.ws + f"/{name}", "restEndpoint": simulator.http + f"/{name}",
            "symbols": SYMBOLS, "dataTypes": ["trade", "bbo"], "connections": {"max": 2},
        }
        for name in ("upbit", "bithumb")
    }  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"exchanges": exchanges, "logging": {"level": "info", "format": "json"}})
    )
    with EmbeddedBroker() as broker:
        worker = Worker(config, broker.bootstrap, tmp_path)
        try:
            worker.wait_ready()

            def states() -> dict[str, str]:
                status, body = worker.request("/connectors")
                return {c["connector"]: c["state"] for c in body["connectors"]} if status == 200 else {}

            def coins_subscribed() -> bool:
                status, body = worker.request("/coins")
                return (
                    status == 200
                    and len(body["coins"]) == 4
                    and all(c["state"] == "subscribed" and c["recordsTotal"] > 0 for c in body["coins"])
                )

            wait_for(coins_subscribed, 60, "every coin subscribed with records")
            wait_for(
                lambda: (found := states()) and all(state == "connected" for state in found.values()),
                30, f"every connector connected (now {states()})",
            )  # fmt: skip
            exchanges_seen = {name.split("-")[0] for name in states()}
            assert exchanges_seen == {"upbit", "bithumb"}
            for row in worker.request("/connectors")[1]["connectors"]:
                assert row["subscribeOk"] >= 1 and row["recoveryRequests"] == 0, row
        finally:
            code = worker.stop()
            simulator.stop()
    assert code == 0 and "Traceback" not in worker.log(), worker.log()[-3000:]
