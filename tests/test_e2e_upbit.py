"""End to end for Upbit: simulator → worker process → embedded broker → market topics.

Upbit never acknowledges a subscription and sends binary frames; trade ids are `sequential_id`s. The
simulator is paused until every stream is subscribed; then every trade it generates must arrive
exactly once, with the simulator's numbers digit for digit (sent as JSON numbers, published as
decimal strings). Bithumb speaks the same dialect: its test shares `run_upbit_compatible_exactly_once`
and `run_across_a_drop`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.harness import (
    ExactlyOnceResult,
    ExpectedTrade,
    collecting,
    published_trade,
    run_exactly_once,
    wait_for,
)

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/KRW", "ETH/KRW"]
TRADES_PER_SYMBOL = 100


def upbit_trade(row: dict[str, Any]) -> ExpectedTrade:
    # The JSON number's digits, as a string: equal in value and in spelling.
    return ExpectedTrade(
        trade_id=str(row["sequential_id"]),
        price=str(row["trade_price"]),
        quantity=str(row["trade_volume"]),
        side="sell" if row["ask_bid"] == "ASK" else "buy",
        trade_time=row["timestamp"],
    )


def run_upbit_compatible_exactly_once(
    exchange: str, data_types: list[str], broker: EmbeddedBroker, tmp_path: Path
) -> ExactlyOnceResult:
    return run_exactly_once(
        exchange,
        SYMBOLS,
        data_types,
        broker.bootstrap,
        tmp_path,
        route=f"/{exchange}",
        expected_trade=upbit_trade,
        trades_per_symbol=TRADES_PER_SYMBOL,
    )


def run_across_a_drop(
    exchange: str, broker: EmbeddedBroker, tmp_path: Path, *, rate: float, trades_each_side: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The worker collects one symbol, loses every connection, reconnects and fills the trades made while
    it was away from `trades/ticks`: every trade made since it started arrives, none twice.

    Returns every trade the simulator made for the symbol, and a summary.
    """
    # Its own symbol, apart from the other test's BTC/KRW and ETH/KRW trades.
    symbol = "BNB/KRW"
    with collecting(
        exchange, [symbol], ["trade"], broker.bootstrap, tmp_path, route=f"/{exchange}", rate=rate
    ) as run:
        market, reader, before = run.market, run.reader, run.generated_before[symbol]

        def generated() -> int:
            return market.trades_generated()[symbol]

        run.worker.wait_ready()
        first = wait_for(market.subscribed_connections, 30, "the first subscription")
        market.simulator.post("/_sim/resume")
        wait_for(lambda: generated() - before >= trades_each_side, 30, "trades before the drop")
        dropped_at = generated()
        market.disconnect()
        wait_for(lambda: market.subscribed_connections() - first, 30, "a new subscribed connection")
        resubscribed_at = generated()
        wait_for(lambda: generated() - resubscribed_at >= trades_each_side, 30, "trades after the drop")
        market.simulator.post("/_sim/pause")
        made = market.trades_made(symbol)
        truth = made[before:]

        def delivered() -> Counter[str]:
            reader.follow(f"market.trade.{exchange}.")
            reader.poll(0.3)
            return Counter(published_trade(record).trade_id for record in run.records("trade", symbol))

        wanted = {str(t["sequential_id"]) for t in truth}
        wait_for(lambda: wanted <= set(delivered()), 45, f"{len(wanted)} trades in Kafka")
        reader.poll(1.0)
        ids = delivered()
        assert not [i for i, n in ids.items() if n > 1], "duplicated trade ids"
        # The backfill re-reads the newest page: repeats are dropped by id, and trades from before the
        # worker's first subscription (only in a run this short) are real trades, published once.
        assert set(ids) <= {str(t["sequential_id"]) for t in made}, "trades the simulator never made"
    return made, {"trades": len(truth), "made_while_away": resubscribed_at - dropped_at}


def test_upbit_trades_arrive_exactly_once(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    result = run_upbit_compatible_exactly_once(
        "upbit", ["trade", "ticker", "bbo", "kline_1s"], broker, tmp_path
    )
    record_property("summary", json.dumps({"trades": result.trades}))


def test_upbit_loses_no_trade_across_a_drop(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    """After a drop the worker reconnects, re-sends its whole request (no acks to wait for) and fills
    the trades made while it was away from `trades/ticks`: every trade arrives, none twice.
    """
    _, summary = run_across_a_drop("upbit", broker, tmp_path, rate=30, trades_each_side=60)
    record_property("summary", json.dumps(summary))
    print("UPBIT DROP", json.dumps(summary))
