"""End to end for Bithumb (gen-2, Upbit-compatible): string `sequential_id`s and µs orderbook times.

The same run as Upbit's (tests/test_e2e_upbit.py): every trade generated once every stream is
subscribed arrives exactly once with the simulator's values. Bithumb offers no candles on its
public WebSocket, so the data types are trade, ticker and bbo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.test_e2e_upbit import run_exactly_once

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def test_bithumb_trades_arrive_exactly_once(broker: EmbeddedBroker, tmp_path: Path, record_property) -> None:
    summary = run_exactly_once("bithumb", ["trade", "ticker", "bbo"], broker, tmp_path)
    record_property("summary", json.dumps(summary))
