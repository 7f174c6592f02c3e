"""A worker whose broker is gone still stops when told to (SIGTERM), within its stop deadline.

Faust's and aiokafka's own stops wait for the broker: for the streams' open records to be
acknowledged, for the buffered table changes to be taken, for the producer to flush. With the broker
gone each of those waited forever, and a worker could only be killed. Now the waits for the broker
are bounded, and a stop still stuck at the deadline exits with its own code and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker
from agents.worker import STOP_DEADLINE_SECONDS, STUCK_STOP_EXIT_CODE
from tests.harness import Simulator, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]


def synced(worker: Worker, symbol: str) -> bool:
    status, view = worker.request(f"/books/binance/{symbol.replace('/', '-')}")
    return status == 200 and view["state"] == "synced"


def test_a_worker_whose_broker_is_gone_stops_within_its_deadline(tmp_path: Path) -> None:
    simulator = Simulator(SYMBOLS, rate=20)
    try:
        with EmbeddedBroker() as broker:
            config = write_config(tmp_path / "stop.yaml", simulator, SYMBOLS, ["trade", "depth"])
            worker = Worker(config, broker.bootstrap, tmp_path)
            worker.wait_ready(90)
            wait_for(lambda: all(synced(worker, symbol) for symbol in SYMBOLS), 60, "the books synced")
        # The broker is gone, with trades and diffs still arriving: the consumer's last commit (and
        # any record the normalize agent still holds) can never be answered.
        started = time.monotonic()
        code = worker.stop(timeout=STOP_DEADLINE_SECONDS + 20)
        took = time.monotonic() - started
    finally:
        simulator.stop()
    log = worker.log()
    assert took < STOP_DEADLINE_SECONDS + 10, (took, log[-3000:])
    assert code in (0, STUCK_STOP_EXIT_CODE), (code, log[-3000:])
    if code == STUCK_STOP_EXIT_CODE:
        assert f"exiting with code {STUCK_STOP_EXIT_CODE}" in log, log[-3000:]
    assert "stopping: no answer from the broker for" in log, log[-3000:]
