"""Normalize agents: `raw.<exchange>` → market topics, dead letters.

A raw record carries a batch of frames; every frame becomes zero or more market records, or a dead
letter with its reason. The raw records of one `take` are acknowledged (and so their offsets
committed) only after every record they produced has been acknowledged by the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec

from agents.metrics import flow_meter
from agents.writer import TopicWriter
from streams.deadletter import dead_letter
from streams.exchanges.base import ExchangeAdapter, FrameError
from streams.raw import decode_batch
from streams.records import MarketRecord, encode_record
from streams.topics import deadletter_topic, market_topic

log = logging.getLogger(__name__)


class Normalizer:
    """Turns raw batches of one exchange into market records and dead letters."""

    def __init__(self, adapter: ExchangeAdapter, writer: TopicWriter) -> None:
        self.adapter = adapter
        self.writer = writer
        self.exchange = adapter.name
        self.deadletters = deadletter_topic(adapter.name)
        self.records_out = 0
        self.dead_lettered = 0

    def normalize_frames(self, raw_values: Iterable[bytes]) -> None:
        exchange = self.exchange
        parse = self.adapter.parse_frame
        send = self.writer.send
        record_flow = flow_meter(exchange).record
        for value in raw_values:
            try:
                batch = decode_batch(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._reject("invalid-raw-record", str(exc), "", -1, 0, value)
                continue
            for frame in batch.frames:
                try:
                    items = parse(frame.payload, frame.received_at)
                except FrameError as exc:
                    self._reject(
                        exc.reason, exc.detail, batch.connection_id, frame.sequence, frame.received_at,
                        frame.payload,
                    )  # fmt: skip
                    continue
                for item in items:
                    if isinstance(item, MarketRecord):
                        topic = market_topic(item.type, exchange, item.symbol)
                        send(topic, item.symbol.encode(), encode_record(item))
                        self.records_out += 1
                        record_flow(item)

    def _reject(
        self, reason: str, detail: str, connection_id: str, sequence: int, received_at: int, payload: bytes
    ) -> None:
        self.dead_lettered += 1
        flow_meter(self.exchange).dead_letter(reason)
        record = dead_letter(self.exchange, reason, detail, connection_id, sequence, received_at, payload)
        self.writer.send(self.deadletters, self.exchange.encode(), record)

    async def handle(self, raw_values: list[bytes]) -> None:
        self.normalize_frames(raw_values)
        await self.writer.flush()
        flow_meter(self.exchange).flushed(raw_values, self.writer.retries)
