"""Faust's own command starts a complete worker: `faust -A agents.app -L uvloop worker -l info`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker, die_with_parent, free_port
from tests.harness import REPO, Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

FAUST = str(Path(sys.executable).with_name("faust"))


def test_the_stock_faust_command_runs_a_worker_that_collects(broker: EmbeddedBroker, tmp_path: Path) -> None:
    simulator = Simulator(["BTC/USDT"], rate=20)
    config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
    env = {
        **os.environ,
        "COLLECTOR_CONFIG": str(config),
        "COLLECTOR_KAFKA_BROKERS": broker.bootstrap,
        "COLLECTOR_SERVER_PORT": str(free_port()),
    }
    log_path = tmp_path / "faust.log"
    reader = TopicReader(broker.bootstrap)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [FAUST, "-A", "agents.app", "-L", "uvloop", "worker", "-l", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )  # fmt: skip
    try:
        wait_for(lambda: Worker.READY.search(log_path.read_text()) or process.poll() is not None, 90,
                 "the worker ready")  # fmt: skip
        assert process.poll() is None, log_path.read_text()[-3000:]

        def trades() -> int:
            reader.follow("market.trade.binance.")
            reader.poll(0.3)
            return len(reader.records.get("market.trade.binance.btc-usdt", []))

        wait_for(lambda: trades() >= 20, 60, "trades collected by the worker Faust's command started")
    finally:
        reader.close()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        simulator.stop()
    assert code == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
