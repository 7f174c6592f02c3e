"""`collector.commands` records: runtime subscription changes.

Produced by `collector subscribe|unsubscribe`, by `POST|DELETE /subscriptions` and by the dashboard;
consumed by the control agent, which updates the subscription table the source agents follow.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class SubscriptionCommand(msgspec.Struct, rename="camel", frozen=True):
    action: Literal["subscribe", "unsubscribe"]
    exchange: str
    symbol: str  # normalized BASE/QUOTE
    data_types: list[str]  # e.g. ["trade", "kline_1m"]
    command_id: str  # unique; lets the control agent ignore a replayed command
    requested_at: int  # epoch ms


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SubscriptionCommand)


def encode_command(command: SubscriptionCommand) -> bytes:
    return _encoder.encode(command)


def decode_command(payload: bytes) -> SubscriptionCommand:
    return _decoder.decode(payload)
