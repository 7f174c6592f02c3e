"""`deadletter.<exchange>` records: a rejected frame, why, and where it came from."""

from __future__ import annotations

import base64

import msgspec


class DeadLetter(msgspec.Struct, rename="camel", omit_defaults=True):
    exchange: str
    reason: str  # stable slug, e.g. invalid-json, schema-mismatch, unknown-symbol
    detail: str
    connection_id: str
    sequence: int
    received_at: int
    frame: str | None = None  # the frame as text when it is valid UTF-8 ...
    frame_base64: str | None = None  # ... otherwise its bytes in base64


_encoder = msgspec.json.Encoder()


def dead_letter(
    exchange: str,
    reason: str,
    detail: str,
    connection_id: str,
    sequence: int,
    received_at: int,
    payload: bytes,
) -> bytes:
    try:
        text: str | None = payload.decode("utf-8")
        encoded = None
    except UnicodeDecodeError:
        text, encoded = None, base64.b64encode(payload).decode("ascii")
    record = DeadLetter(
        exchange=exchange,
        reason=reason,
        detail=detail[:500],
        connection_id=connection_id,
        sequence=sequence,
        received_at=received_at,
        frame=text,
        frame_base64=encoded,
    )
    return _encoder.encode(record)


def decode_dead_letter(value: bytes) -> DeadLetter:
    return msgspec.json.decode(value, type=DeadLetter)
