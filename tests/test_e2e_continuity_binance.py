"""The continuity fault suite (tests/continuity_suite.py) against Binance: nothing lost, duplicated or
invented under stalls, skips, invented ids, REST throttling with refused handshakes, and a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.continuity_suite import SPOT, run_suite

pytestmark = pytest.mark.e2e


def test_no_trade_is_lost_duplicated_or_invented_under_every_fault(
    broker: EmbeddedBroker, tmp_path: Path, record_property
) -> None:
    run_suite("binance", "", SPOT, broker, tmp_path, record_property)
