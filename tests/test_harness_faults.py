"""The fault suite's own tools: the fault tally, a paused broker, a killed and restarted worker.

The tally is checked against a known answer: the test plays the collector itself, publishing the
simulator's trades to a real broker with some left out, some twice and some invented, and the tally
must find exactly those. No collector code takes part, so the check does not move when it changes.
"""

from __future__ import annotations

import re
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.embedded_broker import EmbeddedBroker, _answers_kafka
from streams.records import MarketRecord, Trade, encode_record
from tests.harness import (
    NO_TRADES,
    FaultCounts,
    FaultRow,
    FaultTally,
    Sighting,
    SimulatedExchange,
    Simulator,
    TopicReader,
    Worker,
    broker_paused,
    count_window,
    embedded_broker_pid,
    format_fault_table,
    is_alive,
    kill_and_restart,
    pause_broker,
    truth_key,
    wait_for,
    write_config,
)

SYMBOLS = ["BTC/USDT", "ETH/USDT"]


def key(trade_id: str, price: str = "1", quantity: str = "2") -> tuple[str, Decimal, Decimal]:
    return trade_id, Decimal(price), Decimal(quantity)


# -- the pure core --------------------------------------------------------------------------------------


def test_a_window_counts_delivered_missing_duplicated_and_invented_trades() -> None:
    window = [key("1"), key("2"), key("3")]
    seen = {key("1"): Sighting(1, 100.0), key("2"): Sighting(3, 104.5), key("999"): Sighting(2, 101.0)}
    counts = count_window(window, seen, invented=[key("999"), key("998")], ended=102.0)
    assert counts == FaultCounts(3, 2, 1, 2, 2, None)  # still missing: no repair time


def test_repair_time_runs_from_the_fault_end_to_the_last_trade_of_the_window_read() -> None:
    window = [key("1"), key("2")]
    late = {key("1"): Sighting(1, 100.0), key("2"): Sighting(1, 104.5)}
    assert count_window(window, late, [], ended=102.0).repair_seconds == pytest.approx(2.5)
    on_time = {key("1"): Sighting(1, 100.0), key("2"): Sighting(1, 101.0)}
    assert count_window(window, on_time, [], ended=102.0).repair_seconds == 0.0
    # The same trade is equal whatever the spelling of its numbers (Binance pads, Upbit does not).
    assert key("1", "1.00000000", "2.0") == key("1", "1", "2") and hash(key("1", "1.0")) == hash(key("1"))


def test_counts_add_up_and_a_missing_trade_anywhere_means_not_repaired() -> None:
    repaired, lost = FaultCounts(10, 10, 0, 1, 0, 1.5), FaultCounts(5, 4, 1, 0, 2, None)
    assert repaired + FaultCounts(3, 3, 0, 0, 0, 4.0) == FaultCounts(13, 13, 0, 1, 0, 4.0)
    assert sum([repaired, lost], NO_TRADES) == FaultCounts(15, 14, 1, 1, 2, None)


def test_the_table_has_one_line_per_fault_and_the_columns_the_issue_asks_for() -> None:
    rows = [FaultRow("stall 10 s", FaultCounts(5000, 5000, 0, 0, 0, 1.25), {}),
            FaultRow("overall", FaultCounts(9000, 8990, 10, 0, 3, None), {})]  # fmt: skip
    lines = format_fault_table(rows).splitlines()
    assert lines[0].split() == ["fault", "generated", "delivered", "missing", "duplicated", "invented",
                                "repair", "s"]  # fmt: skip
    assert lines[1].split() == ["stall", "10", "s", "5000", "5000", "0", "0", "0", "1.25"]
    assert lines[2].split() == ["overall", "9000", "8990", "10", "0", "3", "-"]
    assert rows[0].as_dict()["repairSeconds"] == 1.25


# -- against a real simulator and broker ----------------------------------------------------------------


def _record(row: dict[str, Any], symbol: str) -> bytes:
    trade = Trade(
        row["price"], row["qty"], "sell" if row["isBuyerMaker"] else "buy", str(row["id"]), row["time"]
    )
    record = MarketRecord("binance", symbol, "trade", row["time"], int(time.time() * 1000), trade)
    return encode_record(record)


@pytest.mark.e2e
def test_the_tally_finds_exactly_what_a_collector_lost_duplicated_and_invented(tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        simulator = Simulator(SYMBOLS, rate=50)
        reader = TopicReader(broker.bootstrap)
        try:
            tally = FaultTally(SimulatedExchange(simulator, "binance"), SYMBOLS, reader)
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            for created in admin.create_topics([NewTopic(tally.topic(s), 1, 1) for s in SYMBOLS]).values():
                created.result(timeout=10)
            with tally.fault("skip BTC 0.5 s") as skip:
                simulator.post("/_sim/faults/skip", {"symbol": "BTC/USDT", "seconds": 0.5})
                wait_for(lambda: not simulator.get("/_sim/faults")["skipping"], 5, "the skip to end")
            with tally.fault("invent 2"):
                simulator.post("/_sim/faults/invent", {"symbol": "BTC/USDT", "ids": "far", "count": 2})
            simulator.post("/_sim/pause")
            made = {s: simulator.get(f"/_sim/trades?symbol={s}", exact_numbers=False) for s in SYMBOLS}
            assert skip.last is not None
            btc_window = made["BTC/USDT"][skip.first["BTC/USDT"] : skip.last["BTC/USDT"]]
            eth_window = made["ETH/USDT"][skip.first["ETH/USDT"] : skip.last["ETH/USDT"]]
            assert len(btc_window) >= 5 and len(eth_window) >= 2
            lost, twice = btc_window[:3], eth_window[:2]

            # Play the collector: every trade since the tally began, but three lost, two twice, and
            # the two invented ones published as if they were real.
            producer = Producer({"bootstrap.servers": broker.bootstrap})
            for symbol in SYMBOLS:
                for row in made[symbol][tally.origin[symbol] :]:
                    if row not in lost:
                        producer.produce(tally.topic(symbol), _record(row, symbol))
                for row in twice if symbol == "ETH/USDT" else []:
                    producer.produce(tally.topic(symbol), _record(row, symbol))
            for row in simulator.get("/_sim/invented?symbol=BTC/USDT"):
                producer.produce(tally.topic("BTC/USDT"), _record(row, "BTC/USDT"))
            assert producer.flush(10) == 0
            assert not tally.wait_delivered(timeout=3)  # three are missing

            skipped, invented, overall = tally.rows()
            generated = len(btc_window) + len(eth_window)
            assert skipped.total == FaultCounts(generated, generated - 3, 3, 2, 0, None)
            assert (
                skipped.by_symbol["ETH/USDT"].missing == 0 and skipped.by_symbol["BTC/USDT"].duplicated == 0
            )
            assert invented.total.invented == 2 and invented.by_symbol["ETH/USDT"].invented == 0
            assert (overall.total.missing, overall.total.duplicated, overall.total.invented) == (3, 2, 2)

            # The lost trades turn up later (a backfill): the window is repaired, and it took as long.
            repaired_at = time.time()
            for row in lost:
                producer.produce(tally.topic("BTC/USDT"), _record(row, "BTC/USDT"))
            assert producer.flush(10) == 0
            assert tally.wait_delivered(timeout=10)
            skipped, _, overall = tally.rows()
            assert (skipped.total.missing, overall.total.missing) == (0, 0)
            assert skipped.total.repair_seconds is not None
            assert repaired_at - skip.ended <= skipped.total.repair_seconds  # type: ignore[operator]
            assert {truth_key("binance", row) for row in lost} <= set(tally.seen["BTC/USDT"])
            print("\n" + tally.table())
        finally:
            reader.close()
            simulator.stop()


@pytest.mark.e2e
def test_a_workers_embedded_broker_pauses_and_resumes_and_a_killed_worker_comes_back(tmp_path: Path) -> None:
    simulator = Simulator(["BTC/USDT"], rate=5)
    config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
    worker = Worker(config, brokers=None, log_dir=tmp_path)  # the worker runs its own broker
    restarted: Worker | None = None
    try:
        worker.wait_ready()
        broker = embedded_broker_pid(worker)
        port = int(re.findall(r"embedded broker listening on 127\.0\.0\.1:(\d+)", worker.log())[0])
        with broker_paused(worker) as pause:
            assert pause.pid == broker
            assert not _answers_kafka("127.0.0.1", port)  # stopped: the socket is open, nothing answers
        assert pause.ended is not None and pause.ended >= pause.started
        wait_for(lambda: _answers_kafka("127.0.0.1", port), 10, "the broker to answer again")

        paused = pause_broker(broker)  # the same, without a block, by pid
        assert not _answers_kafka("127.0.0.1", port)
        paused.resume()
        wait_for(lambda: _answers_kafka("127.0.0.1", port), 10, "the broker to answer again")

        restarted = kill_and_restart(worker, down_for=0.5)
        assert worker.process.returncode == -9 and restarted.process.poll() is None
        assert (restarted.config_path, restarted.brokers) == (config, None)
        wait_for(lambda: not is_alive(broker), 15, "the killed worker's broker to die with it")
        assert embedded_broker_pid(restarted) != broker  # a fresh one: the old one's data is gone
    finally:
        for running in (worker, restarted):
            if running is not None and running.process.poll() is None:
                running.stop()
        simulator.stop()
