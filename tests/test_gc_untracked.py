"""What the worker makes per event stays out of the garbage collector's generations.

At 30,000 trades/s each tracked object per event triggered collections and, held until the broker
acknowledged it, was promoted and walked again by full collections (docs/benchmarks.md, "Garbage
collection per event"). These objects hold no reference that could close a cycle, so they need no
tracking.
"""

from __future__ import annotations

import gc

import pytest

from agents.normalize import _FrameOrigin, _TradeOrigin
from streams.continuity.outputs import Publish
from streams.raw import RawFrame
from streams.records import Bbo, MarketRecord, Trade

TRADE = Trade(price="1.5", quantity="2", side="buy", trade_id="7", trade_time=1)
RECORD = MarketRecord(
    exchange="binance", symbol="BTC/USDT", type="trade", timestamp=1, received_at=2, data=TRADE
)
ORIGIN = _TradeOrigin(connection_id="binance-0", sequence=3, received_at=2, payload=b"{}")


@pytest.mark.parametrize(
    "made",
    [
        TRADE,
        Bbo(bid_price="1", bid_quantity="2", ask_price="3", ask_quantity="4", update_id="5"),
        RECORD,
        Publish(RECORD, (ORIGIN,)),
        ORIGIN,
        _FrameOrigin(connection_id="binance-0", sequence=3, received_at=2, payload=b"{}"),
        RawFrame(sequence=1, received_at=2, payload=b"{}"),
    ],
    ids=lambda made: type(made).__name__,
)
def test_a_per_event_object_is_not_tracked(made: object) -> None:
    assert not gc.is_tracked(made)


def test_a_tuple_of_origins_is_untracked_by_the_first_collection_it_survives() -> None:
    origins = (ORIGIN,)  # tuples start tracked; CPython untracks one holding only untracked objects
    gc.collect(0)
    assert not gc.is_tracked(origins)
