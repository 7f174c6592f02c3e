"""The market record contract of DESIGN.md: one JSON record per market event.

Field names are the contract's camelCase names (msgspec renames the snake_case attributes).
Prices and quantities stay the exchange's decimal strings; times are integer epoch milliseconds.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

RecordType = Literal["trade", "kline", "ticker", "bbo", "depth"]


class Trade(msgspec.Struct, rename="camel", frozen=True):
    price: str
    quantity: str
    side: Literal["buy", "sell"]  # the taker's side
    trade_id: str
    trade_time: int


class Kline(msgspec.Struct, rename="camel", frozen=True):
    interval: str
    start_time: int
    end_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    trades: int
    closed: bool


class Ticker(msgspec.Struct, rename="camel", frozen=True, omit_defaults=True):
    last: str
    open: str
    high: str
    low: str
    volume: str
    quote_volume: str
    change: str
    change_percent: str
    bid_price: str | None = None
    bid_quantity: str | None = None
    ask_price: str | None = None
    ask_quantity: str | None = None


class Bbo(msgspec.Struct, rename="camel", frozen=True):
    bid_price: str
    bid_quantity: str
    ask_price: str
    ask_quantity: str
    update_id: str


class Depth(msgspec.Struct, rename="camel", frozen=True):
    """An order book record (`market.depth.<exchange>.<symbol>`; README, "Order book record").

    A snapshot is the whole book (the configured levels) at `last_update_id`, and its first id equals
    its last; an update carries the levels changed since the previous depth record of the symbol, whose
    `last_update_id` is its `prev_update_id` (None on a symbol's first record). Levels are
    `[price, quantity]` pairs, best first; quantity "0" removes a level.
    """

    snapshot: bool
    first_update_id: str
    last_update_id: str
    prev_update_id: str | None
    bids: list[tuple[str, str]]
    asks: list[tuple[str, str]]


MarketData = Trade | Kline | Ticker | Bbo | Depth


# gc=False: one is made per event and held until the broker acknowledges it; frozen, holding scalars
# and a data struct, it cannot be part of a reference cycle, so the garbage collector need not track it.
class MarketRecord(msgspec.Struct, rename="camel", frozen=True, gc=False):
    exchange: str
    symbol: str  # normalized BASE/QUOTE, e.g. BTC/USDT
    type: RecordType
    timestamp: int  # exchange event time, epoch ms
    received_at: int  # when the frame reached the collector, epoch ms
    data: MarketData

    @property
    def natural_id(self) -> str:
        """The id consumers dedupe on: tradeId, kline startTime+interval, bbo updateId, depth
        lastUpdateId (`<id>:snapshot` for snapshots, which may repeat an update's last id)."""
        data = self.data
        if isinstance(data, Trade):
            return data.trade_id
        if isinstance(data, Kline):
            return f"{data.start_time}:{data.interval}"
        if isinstance(data, Bbo):
            return data.update_id
        if isinstance(data, Depth):
            return f"{data.last_update_id}:snapshot" if data.snapshot else data.last_update_id
        return str(self.timestamp)


_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "trade": msgspec.json.Decoder(Trade),
    "kline": msgspec.json.Decoder(Kline),
    "ticker": msgspec.json.Decoder(Ticker),
    "bbo": msgspec.json.Decoder(Bbo),
    "depth": msgspec.json.Decoder(Depth),
}


def encode_record(record: MarketRecord) -> bytes:
    return _encoder.encode(record)


class _Envelope(msgspec.Struct, rename="camel"):
    exchange: str
    symbol: str
    type: RecordType
    timestamp: int
    received_at: int
    data: msgspec.Raw


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def decode_record(payload: bytes) -> MarketRecord:
    """Strictly decode a market record (used by tests and downstream tooling)."""
    envelope = _envelope_decoder.decode(payload)
    data = _decoders[envelope.type].decode(envelope.data)
    return MarketRecord(
        exchange=envelope.exchange,
        symbol=envelope.symbol,
        type=envelope.type,
        timestamp=envelope.timestamp,
        received_at=envelope.received_at,
        data=data,
    )
