"""End to end: simulator → real worker process → embedded broker → market topics read back.

The simulator is paused until the worker has subscribed every stream, so that every trade generated
from then on must arrive; the test checks that each one arrived exactly once with the right values.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import EmbeddedBroker
from streams.records import Bbo, Kline, Ticker, decode_record
from tests.harness import Simulator, TopicReader, Worker, trades_made_until, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT", "1000SATS/USDT"]
EXCHANGE_SYMBOLS = {"BTC/USDT": "BTCUSDT", "ETH/USDT": "ETHUSDT", "1000SATS/USDT": "1000SATSUSDT"}
DATA_TYPES = ["trade", "kline_1s", "kline_1m", "ticker", "bbo"]
TRADES_PER_SYMBOL = 150


def _subscriptions(simulator: Simulator) -> int:
    stats = simulator.get("/_sim/stats")
    return sum(len(streams) for streams in stats["subscriptions"].values())


def test_every_generated_trade_arrives_exactly_once_and_other_types_arrive_in_schema(
    broker: EmbeddedBroker, tmp_path: Path, record_property
) -> None:
    simulator = Simulator(SYMBOLS, rate=40)
    before = simulator.post("/_sim/pause")["tradesGenerated"]
    worker = Worker(
        write_config(tmp_path / "c.yaml", simulator, SYMBOLS, DATA_TYPES), broker.bootstrap, tmp_path
    )
    reader = TopicReader(broker.bootstrap)
    try:
        ready_seconds = worker.wait_ready()
        wait_for(lambda: _subscriptions(simulator) == len(SYMBOLS) * len(DATA_TYPES), 30, "all subscriptions")
        simulator.post("/_sim/resume")
        truth = trades_made_until(simulator, before, TRADES_PER_SYMBOL, EXCHANGE_SYMBOLS)
        expected_total = sum(len(trades) for trades in truth.values())

        def delivered_trades() -> int:
            reader.follow("market.")
            reader.poll(0.3)
            return sum(len(r) for t, r in reader.records.items() if t.startswith("market.trade."))

        wait_for(lambda: delivered_trades() >= expected_total, 60, f"{expected_total} trades in Kafka")
        reader.poll(1.0)  # anything beyond the expected count would be a duplicate: read it too

        for symbol in SYMBOLS:
            topic = f"market.trade.binance.{symbol.replace('/', '-').lower()}"
            messages = reader.records.get(topic, [])
            records = [decode_record(m.value()) for m in messages]
            assert all(m.key() == symbol.encode() for m in messages)
            ids = Counter(r.data.trade_id for r in records)
            duplicates = [trade_id for trade_id, n in ids.items() if n > 1]
            assert not duplicates, f"{symbol}: duplicated trade ids {duplicates[:5]}"
            expected = {str(t["id"]): t for t in truth[symbol]}
            missing = set(expected) - set(ids)
            assert not missing, f"{symbol}: {len(missing)} trades missing"
            assert set(ids) == set(expected), f"{symbol}: unexpected trade ids"
            for record in records:
                source = expected[record.data.trade_id]
                assert record.exchange == "binance" and record.symbol == symbol and record.type == "trade"
                assert record.data.price == source["price"]
                assert record.data.quantity == source["qty"]
                assert record.data.side == ("sell" if source["isBuyerMaker"] else "buy")
                assert record.data.trade_time == source["time"]
                assert record.timestamp >= source["time"]
                assert record.received_at >= record.timestamp - 5_000

        for kind, data_class in (("kline", Kline), ("ticker", Ticker), ("bbo", Bbo)):
            for symbol in SYMBOLS:
                topic = f"market.{kind}.binance.{symbol.replace('/', '-').lower()}"
                records = [decode_record(m.value()) for m in reader.records.get(topic, [])]
                assert records, f"no {kind} records for {symbol}"
                assert all(isinstance(r.data, data_class) and r.symbol == symbol for r in records)
                assert all(r.type == kind and r.exchange == "binance" for r in records)

        klines = [
            decode_record(m.value())
            for t, messages in reader.records.items()
            if t.startswith("market.kline.")
            for m in messages
        ]
        assert {k.data.interval for k in klines} == {"1s", "1m"}
        closed = [k for k in klines if k.data.closed and k.data.interval == "1s"]
        assert closed, "no closed 1s klines"
        for kline in closed[:20]:
            rows = simulator.get(
                f"/api/v3/klines?symbol={EXCHANGE_SYMBOLS[kline.symbol]}&interval=1s"
                f"&startTime={kline.data.start_time}&limit=1"
            )
            assert rows and rows[0][0] == kline.data.start_time
            assert [rows[0][1], rows[0][2], rows[0][3], rows[0][4], rows[0][5]] == [
                kline.data.open, kline.data.high, kline.data.low, kline.data.close, kline.data.volume,
            ]  # fmt: skip
            assert rows[0][8] == kline.data.trades

        stats = simulator.get("/_sim/stats")
        assert stats["violations"] == 0
        summary = {
            "trades_generated": expected_total,
            "trades_delivered": sum(
                len(r) for t, r in reader.records.items() if t.startswith("market.trade.")
            ),
            "worker_start_to_ready_seconds": round(ready_seconds, 2),
        }
        record_property("summary", json.dumps(summary))
        print("E2E", json.dumps(summary))
        # A silent market, so that the stop below races no frame still on its way to the raw topic:
        # what is checked after it is that every raw record the worker took was committed.
        simulator.post("/_sim/pause")
        _wait_until_raw_is_quiet(broker.bootstrap)
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert code == 0, worker.log()[-3000:]
    # Raw offsets are released by the broker's delivery reports, after the normalize steps returned;
    # a clean stop must still have committed every raw record the worker normalized.
    assert _uncommitted_raw_records(broker.bootstrap) == {}


def _raw_partitions(consumer: Consumer) -> list[TopicPartition]:
    partitions = consumer.list_topics("raw.binance", timeout=10).topics["raw.binance"].partitions
    return [TopicPartition("raw.binance", p) for p in sorted(partitions)]


def _wait_until_raw_is_quiet(bootstrap: str, quiet: float = 2.0, timeout: float = 30.0) -> None:
    """Until raw.binance has had no new record for `quiet` seconds (the worker's fetches take ~0.5 s)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "raw-ends"})
    try:
        partitions = _raw_partitions(consumer)

        def ends() -> list[int]:
            return [consumer.get_watermark_offsets(tp, 10)[1] for tp in partitions]

        deadline = time.monotonic() + timeout
        last, since = ends(), time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, f"raw.binance still growing {timeout} s after the pause"
            time.sleep(0.25)
            now = ends()
            if now != last:
                last, since = now, time.monotonic()
    finally:
        consumer.close()


def _uncommitted_raw_records(bootstrap: str) -> dict[int, int]:
    """Raw partition → records past the worker group's committed offset."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "exchange-collector"})  # the app id
    try:
        behind = {}
        for committed in consumer.committed(_raw_partitions(consumer), 10):
            _, high = consumer.get_watermark_offsets(committed, 10)
            if high > max(committed.offset, 0):
                behind[committed.partition] = high - max(committed.offset, 0)
        return behind
    finally:
        consumer.close()
