"""End to end under faults: one worker process keeps every simulator trade, exactly once, while the
simulator drops, stalls, refuses, shuts down and throttles it, and its connections roll over.

The simulator is paused until the worker has subscribed every stream; from then on every trade the
simulator generates must reach the market topics once, with the simulator's values. Faults run one
after another against the same worker; for each, the trades generated from the fault until recovery
are checked and the time to recover (a fresh subscribed connection set and every trade generated so
far in Kafka) is measured. The table is printed (`-s`) and recorded as a test property.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from agents.embedded_broker import EmbeddedBroker
from streams.events import decode_event
from streams.records import decode_record
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT"]
EXCHANGE_SYMBOLS = {"BTC/USDT": "BTCUSDT", "ETH/USDT": "ETHUSDT", "BNB/USDT": "BNBUSDT"}
DATA_TYPES = ["trade", "kline_1s", "ticker"]
STREAMS = len(SYMBOLS) * len(DATA_TYPES)
RATE = 25  # trades per second per symbol
LIFETIME = 12.0  # connections roll over this often (Binance: 24 h)


def topic(symbol: str) -> str:
    return f"market.trade.binance.{symbol.replace('/', '-').lower()}"


class Run:
    """The shared worker, simulator and reader, and what they have seen."""

    def __init__(
        self,
        simulator: Simulator,
        worker: Worker,
        reader: TopicReader,
        first_id: dict[str, int],
        start: dict[str, int],
    ) -> None:
        self.simulator = simulator
        self.worker = worker
        self.reader = reader
        self.first_id = first_id  # the simulator's very first trade id per symbol
        self.start = start  # first trade id per symbol that must arrive
        self.rows: list[dict[str, Any]] = []

    def stats(self) -> dict[str, Any]:
        return self.simulator.get("/_sim/stats")

    def _newest(self, symbol: str) -> int:
        """The id of the newest trade generated (ids count up from the first one, one per trade)."""
        return self.first_id[symbol] + self.stats()["tradesGenerated"][symbol] - 1

    def delivered(self) -> dict[str, Counter[int]]:
        self.reader.follow("market.trade.")
        self.reader.poll(0.2)
        return {
            s: Counter(
                int(decode_record(m.value()).data.trade_id) for m in self.reader.records.get(topic(s), [])
            )
            for s in SYMBOLS
        }

    def caught_up(self, through: dict[str, int]) -> bool:
        delivered = self.delivered()
        return all(all(i in delivered[s] for i in range(self.start[s], through[s] + 1)) for s in SYMBOLS)

    def connection_ids(self) -> set[str]:
        return set(self.stats()["subscriptions"])

    def fully_subscribed_by(self, excluded: set[str]) -> bool:
        subscriptions = self.stats()["subscriptions"]
        fresh = [streams for cid, streams in subscriptions.items() if cid not in excluded]
        return sum(len(streams) for streams in fresh) == STREAMS

    def fault(self, name: str, trigger: Callable[[], Any], recover_within: float = 40.0) -> None:
        before_ids = {s: self._newest(s) + 1 for s in SYMBOLS}
        old_connections = self.connection_ids()
        started = time.monotonic()
        trigger()
        wait_for(
            lambda: self.fully_subscribed_by(old_connections), recover_within, f"{name}: new connections"
        )
        through = {s: self._newest(s) for s in SYMBOLS}
        wait_for(lambda: self.caught_up(through), recover_within, f"{name}: every trade in Kafka")
        seconds = time.monotonic() - started
        self.rows.append(self._row(name, before_ids, through, seconds))

    def _row(
        self, name: str, first: dict[str, int], last: dict[str, int], seconds: float | None
    ) -> dict[str, Any]:
        delivered = self.delivered()
        generated = missing = duplicated = count = 0
        for s in SYMBOLS:
            window = range(first[s], last[s] + 1)
            generated += len(window)
            count += sum(1 for i in window if i in delivered[s])
            missing += sum(1 for i in window if i not in delivered[s])
            duplicated += sum(delivered[s][i] - 1 for i in window if delivered[s][i] > 1)
        return {
            "fault": name,
            "generated": generated,
            "delivered": count,
            "missing": missing,
            "duplicated": duplicated,
            "recoverSeconds": None if seconds is None else round(seconds, 2),
        }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("faults")
    with EmbeddedBroker() as broker:
        simulator = Simulator(SYMBOLS, rate=RATE, extra=["--ping-interval", "5"])
        simulator.post("/_sim/pause")
        config = write_config(tmp / "c.yaml", simulator, SYMBOLS, DATA_TYPES)
        document = yaml.safe_load(config.read_text())
        document["exchanges"]["binance"]["connections"] = {
            "max": 5,
            "streamsPerConnection": 3,
            "silenceTimeoutSeconds": 3,
            "lifetimeSeconds": LIFETIME,
        }
        config.write_text(yaml.safe_dump(document))
        worker = Worker(config, broker.bootstrap, tmp)
        reader = TopicReader(broker.bootstrap)
        try:
            worker.wait_ready()
            wait_for(
                lambda: (
                    sum(len(v) for v in simulator.get("/_sim/stats")["subscriptions"].values()) == STREAMS
                ),
                30,
                "all subscriptions",
            )
            generated = simulator.get("/_sim/stats")["tradesGenerated"]
            simulator.post("/_sim/resume")

            def first_ids() -> dict[str, int] | None:
                firsts = {
                    s: simulator.get(f"/_sim/trades?symbol={EXCHANGE_SYMBOLS[s]}&limit=1") for s in SYMBOLS
                }
                return {s: int(t[0]["id"]) for s, t in firsts.items()} if all(firsts.values()) else None

            first = wait_for(first_ids, 10, "the first trades")
            start = {s: first[s] + generated[s] for s in SYMBOLS}
            yield Run(simulator, worker, reader, first, start)
        finally:
            reader.close()
            code = worker.stop()
            simulator.stop()
            log = worker.log()
            assert code == 0, log[-3000:]
            assert "Traceback" not in log, log[-5000:]


def test_faults_lose_and_duplicate_no_trade_and_break_no_exchange_limit(run: Run, record_property) -> None:
    sim = run.simulator
    wait_for(lambda: run.caught_up({s: run._newest(s) for s in SYMBOLS}), 30, "trades flowing")

    run.fault("drop all connections", lambda: sim.post("/_sim/faults/drop"))
    run.fault("stall (open, silent)", lambda: sim.post("/_sim/faults/stall", {"seconds": 8}))
    run.fault("serverShutdown", lambda: sim.post("/_sim/faults/shutdown", {"grace": 3}))

    def refuse_then_drop() -> None:
        sim.post("/_sim/faults/refuse", {"seconds": 6})
        sim.post("/_sim/faults/drop")

    run.fault("refuse handshakes 6 s (REST fallback)", refuse_then_drop)

    def throttled_fallback() -> None:
        sim.post("/_sim/faults/rest", {"status": 429, "seconds": 4, "retryAfter": 3})
        sim.post("/_sim/faults/refuse", {"seconds": 5})
        sim.post("/_sim/faults/drop")

    run.fault("REST 429 + Retry-After while down", throttled_fallback)

    def banned_fallback() -> None:
        sim.post("/_sim/faults/rest", {"status": 418, "seconds": 3, "retryAfter": 4})
        sim.post("/_sim/faults/refuse", {"seconds": 4})
        sim.post("/_sim/faults/drop")

    run.fault("REST 418 + Retry-After while down", banned_fallback)

    # Rollover needs no trigger: connections live LIFETIME seconds. Wait for one more rollover of
    # every connection, and check the trades generated meanwhile.
    events = TopicReader(run.reader.brokers)
    try:

        def rollovers() -> int:
            events.follow("collector.events")
            events.poll(0.2)
            return sum(
                1
                for m in events.records.get("collector.events", [])
                if decode_event(m.value()).type == "rollover"
            )

        before_ids = {s: run._newest(s) + 1 for s in SYMBOLS}
        seen = rollovers()
        started = time.monotonic()
        wait_for(lambda: rollovers() >= seen + 3, LIFETIME + 25, "a rollover of every connection")
        through = {s: run._newest(s) for s in SYMBOLS}
        wait_for(lambda: run.caught_up(through), 30, "rollover: every trade in Kafka")
        run.rows.append(run._row("rollover (make-before-break)", before_ids, through, None))
        rollover_seconds = time.monotonic() - started

        # The whole run: stop the market, then every trade generated since the start exactly once.
        sim.post("/_sim/pause")
        end = {s: run._newest(s) for s in SYMBOLS}
        wait_for(lambda: run.caught_up(end), 60, "every trade in Kafka")
        run.reader.poll(1.0)  # read anything beyond: duplicates would show up here
        total = run._row("whole run", run.start, end, None)
        run.rows.append(total)

        for symbol in SYMBOLS:
            truth = {
                int(t["id"]): t
                for t in sim.get(
                    f"/_sim/trades?symbol={EXCHANGE_SYMBOLS[symbol]}&fromId={run.start[symbol]}&limit=100000"
                )
            }
            records = [decode_record(m.value()) for m in run.reader.records[topic(symbol)]]
            ids = [int(r.data.trade_id) for r in records]
            assert len(ids) == len(set(ids)), f"{symbol}: duplicated trade ids"
            assert set(ids) >= set(range(run.start[symbol], end[symbol] + 1))
            assert ids == sorted(ids), f"{symbol}: trades out of id order"
            for record in records:
                source = truth.get(int(record.data.trade_id))
                if source is None:
                    continue  # generated before the start mark (the pause raced a tick)
                assert (record.data.price, record.data.quantity) == (source["price"], source["qty"])
                assert record.data.side == ("sell" if source["isBuyerMaker"] else "buy")
                assert record.data.trade_time == source["time"]

        event_types = Counter(
            decode_event(m.value()).type for m in events.records.get("collector.events", [])
        )
        gaps = [
            decode_event(m.value())
            for m in events.records["collector.events"]
            if decode_event(m.value()).type == "gap"
        ]
    finally:
        events.close()

    stats = sim.get("/_sim/stats")
    table = {
        "rows": run.rows,
        "rolloverSeconds": round(rollover_seconds, 1),
        "events": dict(event_types),
        "simulatorViolations": stats["violations"],
        "faults": stats["faults"],
    }
    record_property("fault_table", json.dumps(table))
    print("\n| fault | trades generated | delivered | missing | duplicated | seconds to recover |")
    print("|---|---|---|---|---|---|")
    for row in run.rows:
        seconds = "—" if row["recoverSeconds"] is None else row["recoverSeconds"]
        print(
            f"| {row['fault']} | {row['generated']} | {row['delivered']} | {row['missing']} | "
            f"{row['duplicated']} | {seconds} |"
        )
    print("FAULTS", json.dumps({k: v for k, v in table.items() if k != "rows"}))
    for row in run.rows:
        assert row["missing"] == 0 and row["duplicated"] == 0, row
    assert stats["violations"] == 0, stats
    assert stats["faults"]["violations"] == {"connectionAttempts": 0, "restDuringRetryAfter": 0}
    assert stats["faults"]["counts"]["restFaultAnswers"] > 0, "the REST faults never met a request"
    assert event_types["rest-throttled"] >= 1
    # Every gap was repaired from history, with its exact range.
    assert gaps and all(g.detail["outcome"] == "repaired" for g in gaps)
    for gap in gaps:
        first, last = int(gap.detail["firstMissingId"]), int(gap.detail["lastMissingId"])
        assert gap.detail["missing"] == last - first + 1
