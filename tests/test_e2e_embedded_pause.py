"""The default config's broker stops answering: the worker's own embedded broker is paused (SIGSTOP)
for 45 s while trades flow, then continued.

On such a worker raw batches reach the normalize agent in-process (agents/handoff.py), so during the
pause trades keep being normalized and their market records wait in the producer for the broker; the
raw topic's copy waits in the spool. When the broker answers again, every trade made must be on its
topic exactly once, and the worker carries on without a restart.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT"]
PAUSE = 45.0


def test_a_45_s_pause_of_the_workers_own_broker_loses_and_duplicates_no_trade(
    tmp_path: Path, record_property
) -> None:
    simulator = Simulator(SYMBOLS, rate=40)
    market = SimulatedExchange(simulator, "binance")
    config = write_config(tmp_path / "c.yaml", simulator, SYMBOLS, ["trade"], kafka={"brokers": "embedded"})
    worker = Worker(config, None, tmp_path)
    reader: TopicReader | None = None
    try:
        worker.wait_ready()
        listening = re.search(r"embedded broker listening on ([0-9.]+:[0-9]+)", worker.log())
        assert listening is not None, worker.log()[-2000:]
        wait_for(lambda: market.subscribed_streams() == len(SYMBOLS), 30, "every stream subscribed")
        reader = TopicReader(listening.group(1))
        tally = FaultTally(market, SYMBOLS, reader)
        wait_for(lambda: tally.poll(0.3) > 0, 30, "the first trades on their topics")
        with tally.fault(f"embedded broker paused {PAUSE:.0f} s"), broker_paused(worker):
            deadline = time.monotonic() + PAUSE
            while time.monotonic() < deadline:
                status, _ = worker.request("/metrics")  # the worker answers while its broker does not
                assert status == 200
                time.sleep(2)
        assert tally.wait_delivered(90), tally.table()
        simulator.post("/_sim/pause")
        assert tally.wait_delivered(30), tally.table()  # the trades made before the pause took hold
        rows = tally.rows()
        print("\n" + tally.table(rows))
        record_property("pause", json.dumps([row.as_dict() for row in rows]))
        for row in rows:
            counts = (row.total.missing, row.total.duplicated, row.total.invented)
            assert counts == (0, 0, 0), tally.table(rows)
    finally:
        if reader is not None:
            reader.close()
        code = worker.stop()
        simulator.stop()
    assert_clean_exit(worker, code)
