"""End to end for Binance USD-M futures: simulator → worker process → embedded broker → market topics.

The worker needs two connections (`/market` for aggTrade, kline and ticker; `/public` for bookTicker).
The simulator is paused until every stream is subscribed; then every trade it generates must arrive
exactly once with the simulator's values, including the ones generated while the worker's connections
were dropped (the worker backfills them from `/fapi/v1/aggTrades`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.harness import ExpectedTrade, run_exactly_once

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
DATA_TYPES = ["trade", "kline_1m", "ticker", "bbo"]


def aggregate_trade(row: dict[str, Any]) -> ExpectedTrade:
    return ExpectedTrade(str(row["a"]), row["p"], row["q"], "sell" if row["m"] else "buy", row["T"])


def test_every_trade_arrives_exactly_once_across_a_connection_drop(
    broker: EmbeddedBroker, tmp_path: Path, record_property
) -> None:
    result = run_exactly_once(
        "binance-futures",
        SYMBOLS,
        DATA_TYPES,
        broker.bootstrap,
        tmp_path,
        expected_trade=aggregate_trade,
        trades_per_symbol=120,
        drop_halfway=True,
    )
    # bookTicker lives on /public, the rest on /market: no connection can carry both.
    connections = result.subscriptions.values()
    assert all(len({s.endswith("@bookTicker") for s in streams}) == 1 for streams in connections)
    summary = {"trades": result.trades, "dropped_connections": result.dropped_connections}
    record_property("summary", json.dumps(summary))
