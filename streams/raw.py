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
# A record carries at most this many frames and bytes of them; one larger frame travels alone.
MAX_BATCH_FRAMES = 1000
MAX_BATCH_BYTES = 512 * 1024


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


def coalesce(
    values: list[bytes], max_frames: int = MAX_BATCH_FRAMES, max_bytes: int = MAX_BATCH_BYTES
) -> list[bytes]:
    """Encoded batches as fewer records: consecutive WebSocket batches of one connection become one,
    within `max_frames` frames and `max_bytes` of payload. Frames keep their order and sequence
    numbers; REST answers, and anything that does not decode, travel as they came."""
    if len(values) < 2:
        return values
    out: list[bytes] = []
    run: list[tuple[RawBatch, bytes]] = []  # the batches being merged, with their encoding
    frames = size = 0

    def close_run() -> None:
        if len(run) == 1:
            out.append(run[0][1])  # alone: as it came, not encoded again
        elif run:
            merged = [frame for batch, _ in run for frame in batch.frames]
            out.append(encode_batch(msgspec.structs.replace(run[0][0], frames=merged)))
        run.clear()

    for value in values:
        try:
            batch = decode_batch(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            batch = None
        if batch is None or batch.request is not None or batch.source != "ws":
            close_run()
            out.append(value)
            frames = size = 0
            continue
        batch_bytes = sum(len(frame.payload) for frame in batch.frames)
        if run and (
            batch.connection_id != run[0][0].connection_id
            or batch.exchange != run[0][0].exchange
            or frames + len(batch.frames) > max_frames
            or size + batch_bytes > max_bytes
        ):
            close_run()
            frames = size = 0
        run.append((batch, value))
        frames += len(batch.frames)
        size += batch_bytes
    close_run()
    return out
