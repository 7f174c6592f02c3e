"""Produce requests and their answers encoded by hand, for aiokafka.

aiokafka encodes every request field by field through generic Python schema objects. For the market
producer that is a call or two per partition per request and per answer: at the quiet step's 20
symbols, 13 % of the event loop's profiled time; with order books, 8 % (docs/benchmarks.md, "Produce
requests encoded by hand"). A produce request is simple (KIP-98's v3 layout, unchanged to v7) and so
is its answer, so `use_fast_produce_codec` gives those versions' classes an encoder and a decoder
that write and read the same bytes with a few `struct` calls. tests/test_produce_codec.py holds them
to aiokafka's own schema, byte for byte, so a change in aiokafka's classes fails it.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from aiokafka.protocol import produce

_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_ACKS_TIMEOUT = struct.Struct(">hi")
_PARTITION_HEADER = struct.Struct(">ii")  # partition, length of its records
_ANSWER_V2 = struct.Struct(">ihqq")  # partition, error code, base offset, log append time
_ANSWER_V5 = struct.Struct(">ihqqq")  # ... and the log start offset
REQUESTS = tuple(getattr(produce, f"ProduceRequest_v{version}") for version in range(3, 8))
ANSWERS_V2 = tuple(getattr(produce, f"ProduceResponse_v{version}") for version in range(2, 5))
ANSWERS_V5 = tuple(getattr(produce, f"ProduceResponse_v{version}") for version in range(5, 8))


def _string(text: str | None) -> bytes:
    if text is None:
        return _INT16.pack(-1)
    encoded = text.encode()
    return _INT16.pack(len(encoded)) + encoded


def encode_request(request: Any) -> bytes:
    """A ProduceRequest v3-v7: transactional id, acks, timeout, then records by topic and partition."""
    topics = request.topics
    parts = [_string(request.transactional_id), _ACKS_TIMEOUT.pack(request.required_acks, request.timeout)]
    if topics is None:
        parts.append(_INT32.pack(-1))
        return b"".join(parts)
    parts.append(_INT32.pack(len(topics)))
    for topic, partitions in topics:
        parts.append(_string(topic))
        parts.append(_INT32.pack(len(partitions)))
        for partition, records in partitions:
            if records is None:
                parts.append(_PARTITION_HEADER.pack(partition, -1))
            else:
                parts.append(_PARTITION_HEADER.pack(partition, len(records)))
                parts.append(records)
    return b"".join(parts)


def _decoder(answer: struct.Struct) -> Any:
    def decode(cls: Any, data: BytesIO | bytes) -> Any:
        buffer = data.read() if isinstance(data, BytesIO) else bytes(data)
        (count,), at = _INT32.unpack_from(buffer, 0), 4
        topics: list[Any] | None = None if count == -1 else []
        for _ in range(max(count, 0)):
            (length,), at = _INT16.unpack_from(buffer, at), at + 2
            topic = None
            if length >= 0:
                if at + length > len(buffer):
                    raise ValueError("Buffer underrun decoding a produce answer's topic")
                topic, at = buffer[at : at + length].decode(), at + length
            (partitions,), at = _INT32.unpack_from(buffer, at), at + 4
            rows: list[tuple[int, ...]] | None = None if partitions == -1 else []
            for _ in range(max(partitions, 0)):
                rows.append(answer.unpack_from(buffer, at))  # type: ignore[union-attr]
                at += answer.size
            topics.append((topic, rows))  # type: ignore[union-attr]
        (throttle_time_ms,) = _INT32.unpack_from(buffer, at)
        return cls(topics, throttle_time_ms)

    return classmethod(decode)


def use_fast_produce_codec() -> None:
    """Give aiokafka's produce request and answer classes the hand-written encoder and decoder."""
    for request_class in REQUESTS:
        request_class.encode = encode_request
    for answer, answer_classes in ((_ANSWER_V2, ANSWERS_V2), (_ANSWER_V5, ANSWERS_V5)):
        for answer_class in answer_classes:
            answer_class.decode = _decoder(answer)
