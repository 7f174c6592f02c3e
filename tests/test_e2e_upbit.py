"""End to end for Upbit: simulator → worker process → embedded broker → market topics.

Upbit never acknowledges a subscription and sends binary frames; trade ids are `sequential_id`s. The
simulator is paused until every stream is subscribed; then every trade it generates must arrive
exactly once, with the simulator's numbers digit for digit (sent as JSON numbers, published as
decimal strings). `run_exactly_once` is shared with the Bithumb test.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from streams.records import Bbo, Kline, Ticker, decode_record
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/KRW", "ETH/KRW"]
TRADES_PER_SYMBOL = 100


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def run_exactly_once(
    exchange: str, data_types: list[str], broker: EmbeddedBroker, tmp_path: Path
) -> dict[str, Any]:
    # `--symbols` names the spot market; the Korean venues trade the same bases against KRW.
    simulator = Simulator([s.replace("/KRW", "/USDT") for s in SYMBOLS], rate=30)
    simulator.post(f"/_sim/pause?exchange={exchange}")

    def stats() -> dict[str, Any]:
        return simulator.get(f"/_sim/stats?exchange={exchange}", exact_numbers=True)

    def subscribed() -> int:
        return sum(len(streams) for streams in stats()["subscriptions"].values())

    before = stats()["tradesGenerated"]
    config = write_config(
        tmp_path / f"{exchange}.yaml", simulator, SYMBOLS, data_types, exchange=exchange, route=f"/{exchange}"
    )
    worker = Worker(config, broker.bootstrap, tmp_path)
    reader = TopicReader(broker.bootstrap)
    try:
        worker.wait_ready()
        wait_for(lambda: subscribed() == len(SYMBOLS) * len(data_types), 30, "all subscriptions")
        simulator.post("/_sim/resume")
        wait_for(
            lambda: all(n - before[s] >= TRADES_PER_SYMBOL for s, n in stats()["tradesGenerated"].items()),
            30, f"{TRADES_PER_SYMBOL} trades per symbol",
        )  # fmt: skip
        simulator.post("/_sim/pause")
        truth = {
            symbol: simulator.get(f"/_sim/trades?exchange={exchange}&symbol={symbol}", exact_numbers=True)[
                before[symbol] :
            ]
            for symbol in SYMBOLS
        }  # fmt: skip
        expected_total = sum(len(trades) for trades in truth.values())

        def delivered() -> int:
            reader.follow("market.")
            reader.poll(0.3)
            return sum(len(r) for t, r in reader.records.items() if t.startswith(f"market.trade.{exchange}."))

        wait_for(lambda: delivered() >= expected_total, 45, f"{expected_total} trades in Kafka")
        reader.poll(1.0)  # anything beyond the expected count would be a duplicate

        for symbol in SYMBOLS:
            topic = f"market.trade.{exchange}.{symbol.replace('/', '-').lower()}"
            records = [decode_record(m.value()) for m in reader.records.get(topic, [])]
            ids = Counter(r.data.trade_id for r in records)
            assert not [i for i, n in ids.items() if n > 1], f"{symbol}: duplicated trade ids"
            expected = {str(t["sequential_id"]): t for t in truth[symbol]}
            assert set(ids) == set(expected), f"{symbol}: {len(set(expected) - set(ids))} missing"
            for record in records:
                source = expected[record.data.trade_id]
                assert (record.exchange, record.symbol, record.type) == (exchange, symbol, "trade")
                # The JSON number's digits, as a string: equal in value and in spelling.
                assert record.data.price == str(source["trade_price"])
                assert record.data.quantity == str(source["trade_volume"])
                assert record.data.side == ("sell" if source["ask_bid"] == "ASK" else "buy")
                assert record.data.trade_time == source["timestamp"]

        kinds = {"ticker": Ticker, "bbo": Bbo} | (
            {"kline": Kline} if any("kline" in t for t in data_types) else {}
        )
        for kind, data_class in kinds.items():
            for symbol in SYMBOLS:
                topic = f"market.{kind}.{exchange}.{symbol.replace('/', '-').lower()}"
                records = [decode_record(m.value()) for m in reader.records.get(topic, [])]
                assert records, f"no {kind} records for {symbol}"
                assert all(isinstance(r.data, data_class) and r.exchange == exchange for r in records)
        final = stats()
        assert final["violations"] == 0, final["violationsByReason"]
        return {"trades": expected_total}
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
        assert code == 0, worker.log()[-3000:]
        assert "Traceback" not in worker.log(), worker.log()[-5000:]


def test_upbit_trades_arrive_exactly_once(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    summary = run_exactly_once("upbit", ["trade", "ticker", "bbo", "kline_1s"], broker, tmp_path)
    record_property("summary", json.dumps(summary))


def test_upbit_loses_no_trade_across_a_drop(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    """After a drop the worker reconnects, re-sends its whole request (no acks to wait for) and fills
    the trades made while it was away from `trades/ticks`: every trade arrives, none twice.
    """
    # Its own symbol: the module's broker still holds the other test's BTC/KRW and ETH/KRW trades.
    exchange, symbol = "upbit", "BNB/KRW"
    simulator = Simulator(["BNB/USDT"], rate=30)
    simulator.post(f"/_sim/pause?exchange={exchange}")

    def stats() -> dict[str, Any]:
        return simulator.get(f"/_sim/stats?exchange={exchange}", exact_numbers=True)

    def connection_ids() -> set[str]:
        return {cid for cid, streams in stats()["subscriptions"].items() if streams}

    def generated() -> int:
        return int(stats()["tradesGenerated"][symbol])

    before = generated()
    config = write_config(
        tmp_path / "upbit.yaml", simulator, [symbol], ["trade"], exchange=exchange, route="/upbit"
    )
    worker = Worker(config, broker.bootstrap, tmp_path)
    reader = TopicReader(broker.bootstrap)
    topic = "market.trade.upbit.bnb-krw"
    try:
        worker.wait_ready()
        first = wait_for(connection_ids, 30, "the first subscription")
        simulator.post("/_sim/resume")
        wait_for(lambda: generated() - before >= 60, 30, "trades before the drop")
        dropped_at = generated()
        simulator.post(f"/_sim/disconnect?exchange={exchange}")
        wait_for(lambda: connection_ids() - first, 30, "a new subscribed connection")
        resubscribed_at = generated()
        wait_for(lambda: generated() - resubscribed_at >= 60, 30, "trades after the drop")
        simulator.post("/_sim/pause")
        made = simulator.get(f"/_sim/trades?exchange={exchange}&symbol={symbol}", exact_numbers=True)
        truth = made[before:]

        def delivered() -> Counter[str]:
            reader.follow("market.trade.upbit.")
            reader.poll(0.3)
            return Counter(decode_record(m.value()).data.trade_id for m in reader.records.get(topic, []))

        wanted = {str(t["sequential_id"]) for t in truth}
        wait_for(lambda: wanted <= set(delivered()), 45, f"{len(wanted)} trades in Kafka")
        reader.poll(1.0)
        ids = delivered()
        assert not [i for i, n in ids.items() if n > 1], "duplicated trade ids"
        # The backfill re-reads Upbit's newest page: repeats are dropped by id, and trades from before
        # the worker's first subscription (only in a run this short) are real trades, published once.
        assert set(ids) <= {str(t["sequential_id"]) for t in made}, "trades the simulator never made"
        summary = {"trades": len(truth), "made_while_away": resubscribed_at - dropped_at}
        record_property("summary", json.dumps(summary))
        print("UPBIT DROP", json.dumps(summary))
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert code == 0, worker.log()[-3000:]
    assert "Traceback" not in worker.log(), worker.log()[-5000:]
