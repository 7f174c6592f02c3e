"""`collector.events` records: state changes the state agents and operators follow."""

from __future__ import annotations

from typing import Any

import msgspec


class CollectorEvent(msgspec.Struct, rename="camel", omit_defaults=True):
    type: str  # connected, subscribed, subscribe-failed, disconnected, server-shutdown, ...
    exchange: str
    time: int  # epoch ms
    connection_id: str | None = None
    symbol: str | None = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()


def encode_event(event: CollectorEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(payload: bytes) -> CollectorEvent:
    return msgspec.json.decode(payload, type=CollectorEvent)
