"""The `raw.<exchange>` record format.

One Kafka record carries a batch of frames from one connection, because a Faust event per frame caps
a worker near 6 k frames/s (reference/platform.md). The value is MessagePack so frame bytes travel
untouched, including bytes that are not valid UTF-8. The Kafka key is the connection id, which keeps
each connection's frames in order on one partition.

    {"v": 1, "exchange": "binance", "connectionId": "binance-0-1700000000000", "source": "ws",
     "frames": [[sequence, receivedAt, b"<frame bytes>"], ...]}

`sequence` counts frames per connection from 0, so a consumer tells a lost frame from a quiet market.
`receivedAt` is epoch milliseconds. `source` is `ws`, or `rest:<request>` for REST responses; `request`
names the continuity engine's history request a REST response answers.
"""

from __future__ import annotations

import msgspec

RAW_FORMAT_VERSION = 1


class RawFrame(msgspec.Struct, array_like=True, frozen=True):
    sequence: int
    received_at: int
    payload: bytes


class RawBatch(msgspec.Struct, rename="camel", frozen=True):
    exchange: str
    connection_id: str
    frames: list[RawFrame]
    source: str = "ws"
    v: int = RAW_FORMAT_VERSION
    # A REST answer to the continuity engine's request of this id (streams/continuity/); None otherwise.
    request: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RawBatch)


def encode_batch(batch: RawBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(value: bytes) -> RawBatch:
    """Decode a raw record; raises msgspec.DecodeError / ValidationError on a malformed one."""
    return _decoder.decode(value)
