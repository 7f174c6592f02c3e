"""The continuity fault suite (one test file per exchange runs it: tests/test_e2e_continuity_*.py, so
that `make test`'s workers run the three side by side): every fault an independent checker found
trades lost or invented under, run against a real worker, and the trades counted against the
simulator's ground truth.

One worker per exchange (its broker is the test's, so the worker can be killed and restarted without
losing what was published), faults one after another while the tally reads the trade topics:
stall-then-resume with pings going on, trades skipped on a healthy connection, invented trades (ids
far outside the sequence, lower never-made ids, an unknown event type), REST throttled then handshakes
refused, and a SIGKILL with a restart 10 s later. Each fault's row must show nothing missing,
duplicated or invented; the table is printed (and recorded) for the closing notes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.embedded_broker import EmbeddedBroker
from tests.harness import (
    FaultTally,
    SimulatedExchange,
    Simulator,
    TopicReader,
    Worker,
    kill_and_restart,
    wait_for,
    write_config,
)

SPOT = ["BTC/USDT", "ETH/USDT", "BNB/USDT", "1000SATS/USDT"]
RATE = 25.0  # trades per second per symbol


class Suite:
    """A worker collecting one simulated exchange, and the tally of what it published."""

    def __init__(
        self, exchange: str, route: str, symbols: list[str], broker: EmbeddedBroker, tmp: Path
    ) -> None:
        self.exchange = exchange
        self.symbols = symbols
        # `--symbols` names the spot market; the Korean venues trade the same bases against KRW.
        self.simulator = Simulator([s.replace("/KRW", "/USDT") for s in symbols], rate=RATE, seed=23)
        self.market = SimulatedExchange(self.simulator, exchange)
        config = write_config(tmp / f"{exchange}.yaml", self.simulator, symbols, ["trade", "ticker"],
                              exchange=exchange, route=route)  # fmt: skip
        self.worker = Worker(config, broker.bootstrap, tmp, exchange)
        self.reader = TopicReader(broker.bootstrap)
        self.tally: FaultTally | None = None

    def start(self) -> FaultTally:
        self.worker.wait_ready()
        streams = len(self.symbols) * 2
        wait_for(lambda: self.market.subscribed_streams() == streams, 45, "every stream subscribed")
        self.tally = FaultTally(self.market, self.symbols, self.reader)
        self.settle(3)
        return self.tally

    def fault(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.simulator.post(f"/_sim/faults/{path}?exchange={self.exchange}", body)

    def settle(self, seconds: float) -> None:
        """Keep reading the topics for a while (the tally stamps when each trade first appears)."""
        assert self.tally is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.tally.poll(0.2)

    def run(self, name: str, inflict: Callable[[], None], then: float) -> None:
        assert self.tally is not None
        with self.tally.fault(name):
            inflict()
            self.settle(then)

    def finish(self, record_property: Callable[[str, Any], None]) -> None:
        assert self.tally is not None
        self.settle(2)
        delivered = self.tally.wait_delivered(90)
        self.simulator.post("/_sim/pause")
        self.settle(3)
        rows = self.tally.rows()
        table = self.tally.table(rows)
        print(f"\nCONTINUITY {self.exchange}\n{table}")
        record_property("faults", json.dumps([row.as_dict() for row in rows]))
        stats = self.market.stats()
        for row in rows:
            assert (row.total.missing, row.total.duplicated, row.total.invented) == (0, 0, 0), (
                f"{self.exchange}: {row.fault}\n{table}"
            )
        assert delivered, table
        assert stats["violations"] == 0, stats.get("violationsByReason")

    def close(self) -> None:
        self.reader.close()
        self.worker.stop()
        self.simulator.stop()


def invent(suite: Suite, ids: str, **extra: Any) -> Callable[[], None]:
    def inflict() -> None:
        for symbol in suite.symbols[:2]:
            suite.fault("invent", {"symbol": symbol, "ids": ids, "count": 2, **extra})

    return inflict


def faults_for_every_exchange(suite: Suite) -> None:
    suite.run("stall 10 s then resume (pings go on)",
              lambda: suite.fault("stall", {"seconds": 10, "keepalive": True}), 14)  # fmt: skip
    suite.run("trades skipped on a live connection", lambda: suite.fault("skip", {"count": 60}), 6)
    suite.run("invented ids far outside the sequence", invent(suite, "far"), 8)
    suite.run("invented ids below the newest, never made", invent(suite, "lower"), 8)
    suite.run("unknown event type on a trade stream", invent(suite, "next", eventType="megaTrade"), 3)
    suite.run(
        "REST 429 (Retry-After 5 s), then every handshake refused 8 s",
        lambda: suite.fault(
            "throttle-then-refuse",
            {"status": 429, "restSeconds": 5, "retryAfter": 5, "dropAfter": 5, "refuseSeconds": 8},
        ),
        25,
    )


def kill_and_restart_fault(suite: Suite) -> None:
    def inflict() -> None:
        suite.worker = kill_and_restart(suite.worker, 10)

    suite.run("worker SIGKILLed, restarted 10 s later", inflict, 10)


def run_suite(
    exchange: str, route: str, symbols: list[str], broker: EmbeddedBroker, tmp: Path,
    record_property: Callable[[str, Any], None],
) -> None:  # fmt: skip
    suite = Suite(exchange, route, symbols, broker, tmp)
    try:
        suite.start()
        faults_for_every_exchange(suite)
        kill_and_restart_fault(suite)
        suite.finish(record_property)
    finally:
        suite.close()
