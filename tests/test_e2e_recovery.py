"""End to end: the manager's recovery order recycles a stalled connector on the worker that runs it.

The simulator stalls every open connection (open, no frames) for far longer than the test, and the
connections' own silence timeout is longer still, so only the manager's order can bring data back:
recover-requested (manager) → RecoveryCommand on the group's partition → the control agent recycles
the connector → a new connection backfills and flows → `recovered`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from streams.events import CollectorEvent, decode_event
from streams.topics import EVENTS
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config
from tests.test_web_views import get

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
SILENCE_TIMEOUT = 120.0  # the connection's own stall detection: must not be what recovers it here
STALL = 90.0
# Three flow summaries (agents/state.py FLOW_INTERVAL, 2 s): the table shows a recycled connector
# connected again within it even on a loaded machine, so the only order is the one for the silence.
STUCK_AFTER = 6


def records(worker: Worker) -> dict[str, int]:
    return {c["symbol"]: c["recordsTotal"] for c in get(worker, "/coins")["coins"]}


@pytest.fixture
def worker(tmp_path: Any) -> Iterator[tuple[Simulator, Worker, str]]:
    with EmbeddedBroker() as broker:
        simulator = Simulator(SYMBOLS, rate=20)
        exchange = {
            "wsEndpoint": simulator.ws, "restEndpoint": simulator.http, "symbols": SYMBOLS,
            "dataTypes": ["trade", "bbo"],
            # Neither the connection's pace (stallAfterGaps 0) nor its silence timeout may end the stall.
            "connections": {"max": 5, "streamsPerConnection": 1000, "silenceTimeoutSeconds": SILENCE_TIMEOUT,
                            "stallAfterGaps": 0},
        }  # fmt: skip
        config = write_config(
            tmp_path / "c.yaml", simulator, SYMBOLS, ["trade", "bbo"],
            exchanges={"binance": exchange},
            monitoring={"alerts": {"staleAfterSeconds": 2, "stuckAfterSeconds": STUCK_AFTER,
                                   "recoveryAttempts": 2}},
        )  # fmt: skip
        running = Worker(config, broker.bootstrap, tmp_path)
        try:
            running.wait_ready()
            yield simulator, running, broker.bootstrap
        finally:
            simulator.post("/_sim/faults/clear")
            running.stop()
            simulator.stop()
        assert "Traceback" not in running.log(), running.log()[-5000:]


def test_a_stalled_connector_is_recycled_by_the_managers_order(worker: tuple[Simulator, Worker, str]) -> None:
    simulator, running, bootstrap = worker
    wait_for(lambda: all(n > 0 for n in records(running).values()) and len(records(running)) == 2, 30,
             "both coins flowing")  # fmt: skip
    reader = TopicReader(bootstrap)
    reader.follow(EVENTS)
    seen: list[CollectorEvent] = []

    def events(kind: str) -> list[CollectorEvent]:
        reader.poll(0.2)
        seen[:] = [decode_event(m.value()) for m in reader.records.get(EVENTS, [])]
        return [e for e in seen if e.type == kind]

    try:
        assert simulator.post("/_sim/faults/stall", {"seconds": STALL})["stalled"] >= 1
        # Well within SILENCE_TIMEOUT: only the order can end the stall this soon.
        recovered = wait_for(lambda: events("recovered"), STUCK_AFTER + 24, "a recovered event")
        after_recovery = records(running)
        wait_for(lambda: all(records(running)[s] > after_recovery[s] for s in SYMBOLS), 10,
                 "records to flow again on the new connections")  # fmt: skip
    finally:
        reader.close()

    orders = {e.detail["connector"]: e for e in seen if e.type == "recover-requested"}
    assert all(e.detail["reason"].startswith("connected but silent for") for e in orders.values())
    assert all(
        e.detail["connector"] in orders and e.detail["group"].startswith("binance:") for e in recovered
    )
    order = orders[recovered[0].detail["connector"]]
    ordered_drops = [
        e
        for e in seen
        if e.type == "disconnected" and str(e.detail.get("reason", "")).startswith("recovery ordered")
    ]
    assert ordered_drops, "the stalled connection was not closed by the order"
    assert not [e for e in seen if e.type == "stale"], "the silence timeout fired, not the order"
    assert not [e for e in seen if e.type == "recover-failed"]
    connector = next(
        c for c in get(running, "/connectors")["connectors"] if c["connector"] == order.detail["connector"]
    )
    assert connector["state"] == "connected" and connector["recoveries"] >= 1
    assert simulator.get("/_sim/stats").get("violations") == 0
