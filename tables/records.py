"""Records of the state topics: `collector.flow` (per-coin flow summaries) and `collector.alerts`.

A normalize agent sends one flow summary per interval covering every coin it handled, instead of one
event per market record, so the state agents stay far off the hot path.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FLOW = "collector.flow"
ALERTS = "collector.alerts"


class CoinFlow(msgspec.Struct, rename="camel"):
    records: dict[str, int] = msgspec.field(default_factory=dict)  # record type → count
    last_received_at: int = 0  # epoch ms
    last_event_at: int = 0  # the exchange's latest event time, epoch ms


class BookFlow(msgspec.Struct, array_like=True):
    """An order book a normalize agent keeps: its state and when its newest item arrived (epoch ms)."""

    state: str  # synced, syncing
    heard_at: int


class QueueUsage(msgspec.Struct, rename="camel", frozen=True):
    """One worker's raw spool for one exchange: batches the broker has not acknowledged (bytes of the
    batches), and those it dropped since the worker started (agents/writer.py RawProducer)."""

    bytes: int = 0  # memory + disk + in flight
    memory_bytes: int = 0  # waiting in memory
    disk_bytes: int = 0  # waiting on disk
    in_flight_bytes: int = 0  # handed to the producer, not acknowledged
    batches: int = 0
    dropped_batches: int = 0
    dropped_bytes: int = 0


class FlowSummary(msgspec.Struct, rename="camel"):
    exchange: str
    worker: str  # which worker's normalize agent saw this
    started_at: int  # the interval, epoch ms
    ended_at: int
    coins: dict[str, CoinFlow]  # symbol → flow
    dead_letters: dict[str, int] = msgspec.field(default_factory=dict)  # reason → count
    raw_bytes: int = 0
    latency: dict[str, list[int]] = msgspec.field(default_factory=dict)  # stage → bucket counts
    process: dict[str, float] = msgspec.field(default_factory=dict)  # cpuPercent, rssBytes
    # Source side: connector → epoch ms of the newest frame its live connection received.
    connections: dict[str, int] = msgspec.field(default_factory=dict)
    # Normalize side: connection id → receipt time (epoch ms) of the newest frame normalized from it.
    normalized: dict[str, int] = msgspec.field(default_factory=dict)
    # Order books the normalize agent keeps: symbol → state and newest item.
    books: dict[str, BookFlow] = msgspec.field(default_factory=dict)
    # Source side: this worker's raw spool for the exchange (None: it runs no raw producer).
    queue_usage: QueueUsage | None = None


class Alert(msgspec.Struct, rename="camel", omit_defaults=True):
    id: str  # unique: a replayed alert is recognised by it
    key: str  # what it is about, e.g. "coin-stale:binance:BTC/USDT"; one open alert per key
    kind: str  # coin-stale, recovery-failed, ...
    status: Literal["firing", "resolved"]
    exchange: str
    time: int  # epoch ms
    message: str
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()
_flow_decoder = msgspec.json.Decoder(FlowSummary)
_alert_decoder = msgspec.json.Decoder(Alert)


def encode(record: FlowSummary | Alert) -> bytes:
    return _encoder.encode(record)


def decode_flow(payload: bytes) -> FlowSummary:
    return _flow_decoder.decode(payload)


def decode_alert(payload: bytes) -> Alert:
    return _alert_decoder.decode(payload)
