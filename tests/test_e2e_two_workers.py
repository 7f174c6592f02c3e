"""Two worker processes on one broker: every connection group runs on exactly one worker, and the
groups of a SIGKILLed worker move to the survivor within 15 s, with the gap backfilled.

Eight symbols chosen to fill the eight connection groups (connections.max 8), one trade stream each.
The simulator is paused until the two workers have shared the groups and subscribed everything, so
every trade generated from then on must reach the market topics exactly once, across the first
worker being killed and its groups moving to the second (REST backfill fills the gap).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from streams.records import decode_record
from tables.subscription_rules import group_of
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

# One symbol per group: crc32(symbol) % 8 is 0..7 for these.
SYMBOLS = ["LINK/USDT", "ADA/USDT", "BNB/USDT", "SOL/USDT", "DOGE/USDT", "ETH/USDT", "ETC/USDT", "BTC/USDT"]
GROUPS = {f"binance:{n}" for n in range(8)}
STREAMS = {symbol.replace("/", "").lower() + "@trade" for symbol in SYMBOLS}
MOVE_LIMIT_SECONDS = 15.0


class StreamWatch:
    """Polls the simulator's subscriptions and remembers the most connections any stream was on."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.most_connections_per_stream = 0

    def counts(self) -> Counter[str]:
        subscriptions = self.simulator.get("/_sim/stats")["subscriptions"]
        found = Counter(stream for streams in subscriptions.values() for stream in streams)
        self.most_connections_per_stream = max([self.most_connections_per_stream, *found.values()])
        return found

    def each_stream_once(self) -> bool:
        counts = self.counts()
        return set(counts) == STREAMS and all(n == 1 for n in counts.values())


def local_groups(worker: Worker) -> set[str]:
    url = f"http://127.0.0.1:{worker.port}/subscriptions?scope=local"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return set(json.loads(response.read())["groups"])
    except OSError:
        return set()


def test_groups_run_once_and_move_to_the_survivor_when_a_worker_is_killed(
    broker: EmbeddedBroker, tmp_path: Path, record_property: Any
) -> None:
    assert {group_of("binance", symbol, 8) for symbol in SYMBOLS} == GROUPS
    simulator = Simulator(SYMBOLS, rate=10)
    before = simulator.post("/_sim/pause")["tradesGenerated"]
    config = write_config(tmp_path / "c.yaml", simulator, SYMBOLS, ["trade"])
    config.write_text(config.read_text().replace("max: 5", "max: 8"))
    first = Worker(config, broker.bootstrap, tmp_path, name="first")
    second = Worker(config, broker.bootstrap, tmp_path, name="second")
    reader = TopicReader(broker.bootstrap)
    watch = StreamWatch(simulator)
    try:
        first.wait_ready()
        second.wait_ready()

        def shared() -> bool:
            mine, theirs = local_groups(first), local_groups(second)
            return bool(mine and theirs and not mine & theirs and mine | theirs == GROUPS)

        wait_for(lambda: shared() and watch.each_stream_once(), 30, "the groups shared by both workers")
        assert watch.most_connections_per_stream == 1, "a stream was subscribed on two connections at once"
        # Either worker lists every subscription, each with the worker that runs its group.
        with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/subscriptions", timeout=10) as response:
            listing = json.loads(response.read())
        assert sorted(row["symbol"] for row in listing["subscriptions"]) == sorted(SYMBOLS)
        workers = {row["group"]: row["worker"] for row in listing["subscriptions"] if row["running"]}
        assert len(workers) == 8 and len(set(workers.values())) == 2, listing
        simulator.post("/_sim/resume")
        wait_for(
            lambda: all(
                n - before[s] >= 20 for s, n in simulator.get("/_sim/stats")["tradesGenerated"].items()
            ),
            10,
            "trades flowing through both workers",
        )
        moved = local_groups(first)

        first.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: local_groups(second) == GROUPS and watch.each_stream_once(),
            MOVE_LIMIT_SECONDS + 5,
            "the killed worker's groups on the survivor",
        )
        move_seconds = time.monotonic() - killed_at
        assert watch.most_connections_per_stream == 1, "a stream was subscribed on two connections at once"
        assert move_seconds < MOVE_LIMIT_SECONDS, f"groups moved after {move_seconds:.1f} s"

        # Every trade generated since the resume must be in Kafka exactly once, gap included. The
        # survivor learns where a moved symbol's gap ends from its next live trade, so each symbol
        # trades on after the move (under load the move can take long enough to pass any fixed count).
        at_move = simulator.get("/_sim/stats")["tradesGenerated"]
        wait_for(
            lambda: all(
                n - at_move[s] >= 10 for s, n in simulator.get("/_sim/stats")["tradesGenerated"].items()
            ),
            30,
            "more trades after the move",
        )
        simulator.post("/_sim/pause")
        expected = {
            symbol: {
                str(trade["id"])
                for trade in simulator.get(f"/_sim/trades?symbol={symbol.replace('/', '')}")[before[symbol] :]
            }
            for symbol in SYMBOLS
        }

        def delivered() -> dict[str, Counter[str]]:
            reader.follow("market.trade.")
            reader.poll(0.3)
            return {
                s: Counter(
                    decode_record(m.value()).data.trade_id  # type: ignore[union-attr]
                    for m in reader.records.get(f"market.trade.binance.{s.replace('/', '-').lower()}", [])
                )
                for s in SYMBOLS
            }

        def complete() -> bool:
            found = delivered()
            return all(expected[s] <= set(found[s]) for s in SYMBOLS)

        try:
            wait_for(complete, 30, "every generated trade in Kafka (backfilled gaps included)")
        finally:
            found = delivered()
            summary = {
                "move_seconds": round(move_seconds, 2),
                "groups_moved_on_kill": sorted(moved),
                "generated": sum(len(ids) for ids in expected.values()),
                "missing": sum(len(expected[s] - set(found[s])) for s in SYMBOLS),
                "duplicated": sum(n - 1 for s in SYMBOLS for n in found[s].values() if n > 1),
                "missing_by_group": {
                    group_of("binance", s, 8): len(expected[s] - set(found[s])) for s in SYMBOLS
                },
                "duplicated_by_group": {
                    group_of("binance", s, 8): sum(n - 1 for n in found[s].values() if n > 1) for s in SYMBOLS
                },
            }
            record_property("summary", json.dumps(summary))
            print("TWO-WORKERS", json.dumps(summary))
        assert summary["duplicated"] == 0, f"duplicated trades across the moves: {summary}"
    finally:
        reader.close()
        first.stop()
        code = second.stop()
        simulator.stop()
    assert code == 0, second.log()[-3000:]
    assert "Traceback" not in second.log(), second.log()[-5000:]
