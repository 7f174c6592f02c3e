"""End to end for Binance USD-M futures: simulator → worker process → embedded broker → market topics.

The worker needs two connections (`/market` for aggTrade, kline and ticker; `/public` for bookTicker).
The simulator is paused until every stream is subscribed; then every trade it generates must arrive
exactly once with the simulator's values, including the ones generated while the worker's connections
were dropped (the worker backfills them from `/fapi/v1/aggTrades`).
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

EXCHANGE = "binance-futures"
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
DATA_TYPES = ["trade", "kline_1m", "ticker", "bbo"]
TRADES_PER_SYMBOL = 120


def stats(simulator: Simulator) -> dict[str, Any]:
    return simulator.get(f"/_sim/stats?exchange={EXCHANGE}", exact_numbers=True)


def subscribed_streams(simulator: Simulator) -> int:
    return sum(len(streams) for streams in stats(simulator)["subscriptions"].values())


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def test_every_trade_arrives_exactly_once_across_a_connection_drop(
    broker: EmbeddedBroker, tmp_path: Path, record_property
) -> None:
    simulator = Simulator(SYMBOLS, rate=30)
    simulator.post(f"/_sim/pause?exchange={EXCHANGE}")
    before = stats(simulator)["tradesGenerated"]
    config = write_config(tmp_path / "futures.yaml", simulator, SYMBOLS, DATA_TYPES, exchange=EXCHANGE)
    worker = Worker(config, broker.bootstrap, tmp_path)
    reader = TopicReader(broker.bootstrap)
    try:
        worker.wait_ready()
        wait_for(
            lambda: subscribed_streams(simulator) == len(SYMBOLS) * len(DATA_TYPES), 30, "all subscriptions"
        )
        connections = stats(simulator)["subscriptions"].values()
        # bookTicker lives on /public, the rest on /market: no connection can carry both.
        assert all(len({s.endswith("@bookTicker") for s in streams}) == 1 for streams in connections)
        simulator.post("/_sim/resume")

        def generated_at_least(count: int) -> bool:
            return all(n - before[s] >= count for s, n in stats(simulator)["tradesGenerated"].items())

        wait_for(lambda: generated_at_least(TRADES_PER_SYMBOL // 2), 30, "trades before the drop")
        dropped = simulator.post(f"/_sim/disconnect?exchange={EXCHANGE}")["disconnected"]
        assert dropped == len(connections)
        wait_for(lambda: generated_at_least(TRADES_PER_SYMBOL), 30, "trades after the drop")
        wait_for(lambda: subscribed_streams(simulator) == len(SYMBOLS) * len(DATA_TYPES), 30, "resubscribed")
        simulator.post("/_sim/pause")
        truth = {
            symbol: simulator.get(f"/_sim/trades?exchange={EXCHANGE}&symbol={symbol}", exact_numbers=True)[
                before[symbol] :
            ]
            for symbol in SYMBOLS
        }  # fmt: skip
        expected_total = sum(len(trades) for trades in truth.values())

        def delivered() -> int:
            reader.follow("market.")
            reader.poll(0.3)
            return sum(len(r) for t, r in reader.records.items() if t.startswith(f"market.trade.{EXCHANGE}."))

        wait_for(lambda: delivered() >= expected_total, 45, f"{expected_total} trades in Kafka")
        reader.poll(1.0)  # anything beyond the expected count would be a duplicate

        for symbol in SYMBOLS:
            topic = f"market.trade.{EXCHANGE}.{symbol.replace('/', '-').lower()}"
            records = [decode_record(m.value()) for m in reader.records.get(topic, [])]
            ids = Counter(r.data.trade_id for r in records)
            assert not [i for i, n in ids.items() if n > 1], f"{symbol}: duplicated trade ids"
            expected = {str(t["a"]): t for t in truth[symbol]}
            assert set(ids) == set(expected), f"{symbol}: {len(set(expected) - set(ids))} missing"
            for record in records:
                source = expected[record.data.trade_id]
                assert (record.exchange, record.symbol, record.type) == (EXCHANGE, symbol, "trade")
                assert record.data.price == source["p"] and record.data.quantity == source["q"]
                assert record.data.side == ("sell" if source["m"] else "buy")
                assert record.data.trade_time == source["T"]

        for kind, data_class in (("kline", Kline), ("ticker", Ticker), ("bbo", Bbo)):
            for symbol in SYMBOLS:
                topic = f"market.{kind}.{EXCHANGE}.{symbol.replace('/', '-').lower()}"
                records = [decode_record(m.value()) for m in reader.records.get(topic, [])]
                assert records, f"no {kind} records for {symbol}"
                assert all(isinstance(r.data, data_class) and r.exchange == EXCHANGE for r in records)
        final = stats(simulator)
        assert final["violations"] == 0, final["violationsByReason"]
        record_property("summary", json.dumps({"trades": expected_total, "dropped_connections": dropped}))
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert code == 0, worker.log()[-3000:]
    assert "Traceback" not in worker.log(), worker.log()[-5000:]
