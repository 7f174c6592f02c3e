"""Bithumb: its current (gen-2) public API, Upbit's protocol with Bithumb's types and limits.

`wss://ws-api.bithumb.com/websocket/v1` takes Upbit's array requests and sends Upbit-shaped frames
(exchange-protocols.md §4.1), so the parsing is UpbitAdapter's. The differences it absorbs:
`sequential_id` is a string, the orderbook `timestamp` a microsecond string (converted to ms; the µs
digits stay the bbo `updateId`), the orderbook `level` defaults to 1, and `sequential_id` is unique
but neither time-based nor ordered (`862683813820523888`), so a trade's position is its trade time
(`trade_position`): the backfill pages `trades/ticks` back until a page reaches a trade older than the
last one seen, and the normalize agent drops repeats by id. The public WebSocket offers
trade, ticker and orderbook only: no candles (kline). Order books (`depth`) are Upbit's whole top-N
messages with any count from 1 to 30 (`KRW-BTC.15`); its REST orderbook takes no count. Connects are
limited to 10/s per IP, after which Bithumb answers 429 (with an empty body) and then blocks the IP
for 10 minutes. Its ticker's trading day starts at 00:00 KST.
"""

from __future__ import annotations

from typing import ClassVar

from streams.exchanges.base import DataKind, ExchangeLimits
from streams.exchanges.upbit import UpbitAdapter
from streams.records import Trade

# Positions are the trade time in ms scaled like Upbit's sequential_id (ms followed by 4 digits), so
# both read the same; trades of one millisecond share a position.
_POSITIONS_PER_MS = 10_000


class BithumbAdapter(UpbitAdapter):
    name = "bithumb"
    limits = ExchangeLimits(
        max_streams_per_connection=1024,
        max_incoming_messages_per_second=5,
        max_connection_attempts=10,
        connection_attempt_window_seconds=1,
        max_connection_lifetime_seconds=None,
        rest_weight_per_minute=9000,  # 150 requests/s per category
        rest_requests_per_second=150,  # per category (trade, candle, ticker, orderbook, other)
    )
    kline_intervals: ClassVar[frozenset[str]] = frozenset()
    data_kinds: ClassVar[frozenset[DataKind]] = frozenset({"trade", "ticker", "bbo", "depth"})
    instruments_path = "/v1/market/all?isDetails=false"
    history_audits_per_second = 5.0  # of the trade category's 150 requests/s
    depth_levels = range(1, 31)
    orderbook_count_param = False

    @staticmethod
    def _position(sequential_id: str, trade_time: int) -> int:
        return trade_time * _POSITIONS_PER_MS  # the id says nothing about order

    def trade_id_consistent(self, trade: Trade) -> bool:
        return True  # the id says nothing about the trade's time
