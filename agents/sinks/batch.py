"""What a sink reads from Kafka, and which offsets a written batch lets it commit. Pure code."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SinkMessage:
    topic: str
    partition: int
    offset: int
    timestamp: int  # the Kafka record's timestamp, epoch ms (the append time of a market record)
    value: bytes | None


def next_offsets(messages: Iterable[SinkMessage]) -> dict[tuple[str, int], int]:
    """(topic, partition) → the offset to commit once these messages are stored: the highest + 1."""
    offsets: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic, message.partition)
        if message.offset + 1 > offsets.get(key, -1):
            offsets[key] = message.offset + 1
    return offsets


def merge_offsets(
    pending: dict[tuple[str, int], int], written: dict[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """Offsets still to commit: a commit that failed is retried with the next batch's."""
    merged = dict(pending)
    for key, offset in written.items():
        if offset > merged.get(key, -1):
            merged[key] = offset
    return merged


def oldest_timestamp(messages: Iterable[SinkMessage]) -> int | None:
    return min((m.timestamp for m in messages if m.timestamp > 0), default=None)


def market_pattern(types: Iterable[str]) -> str:
    """The topic regex a sink subscribes: only the market topics of the types it stores, so it never
    fetches (and makes the broker serve) partitions it would drop."""
    return r"^market\.(" + "|".join(sorted(types)) + r")\..+"
