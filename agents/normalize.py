"""Normalize agents: `raw.<exchange>` → market topics, dead letters.

A raw record carries a batch of frames; every frame becomes zero or more market records, or a dead
letter with its reason. The raw records of one `take` are acknowledged (and so their offsets
committed) only after every record they produced has been acknowledged by the broker; the next take
is normalized meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

import msgspec

from agents.metrics import event_emitted, flow_meter
from agents.writer import AcknowledgedAt, TopicWriter
from streams.deadletter import dead_letter
from streams.dedupe import PublishedFloor
from streams.events import encode_event
from streams.exchanges.base import ExchangeAdapter, FrameError, ParsedItem
from streams.raw import decode_batch
from streams.records import MarketRecord, Trade, encode_record
from streams.rest import parse_source
from streams.topics import EVENTS, deadletter_topic, market_topic
from streams.validation import DEFAULT_CLOCK_SKEW_SECONDS, DUPLICATE, Validator, gap_event

log = logging.getLogger(__name__)
# A dead letter must fit the producer's message size even when JSON escaping inflates a frame ~6x; a
# dead letter that can never be produced would be retried forever and stall the whole agent.
MAX_DEAD_LETTER_FRAME = 128 * 1024


class Normalizer:
    """Turns raw batches of one exchange into market records and dead letters."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        writer: TopicWriter,
        clock_skew_seconds: float = DEFAULT_CLOCK_SKEW_SECONDS,
        read_last_trade_ids: Callable[[Collection[str]], Awaitable[dict[str, int]]] | None = None,
    ) -> None:
        self.adapter = adapter
        self.writer = writer
        self.exchange = adapter.name
        self.deadletters = deadletter_topic(adapter.name)
        self.records_out = 0
        self.dead_lettered = 0
        self.validator = Validator(adapter.name, adapter.trade_ids, clock_skew_seconds)
        self.duplicates = 0  # repeated trade ids: dropped and counted, not dead-lettered
        # Trades the market topics already held when this agent started (or partitions moved). A
        # floor only means something where the exchange's trade ids increase (Binance): Upbit's and
        # Bithumb's are unique but unordered, so a floor would drop new trades.
        self.published = PublishedFloor()
        self._read_last_trade_ids = read_last_trade_ids if adapter.trade_ids == "increasing" else None

    def normalize_frames(self, raw_values: Iterable[bytes]) -> None:
        exchange = self.exchange
        parse = self.adapter.parse_frame
        send = self.writer.send
        meter = flow_meter(exchange)
        record_flow, normalized = meter.record, meter.normalized
        check = self.validator.check
        for value in raw_values:
            try:
                batch = decode_batch(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._reject("invalid-raw-record", str(exc), "", -1, 0, value)
                continue
            live = batch.source == "ws"  # REST input may be older than the clock-skew window
            rest = None if live else parse_source(batch.source)
            if live and batch.frames:
                normalized(batch.connection_id, batch.frames[-1].received_at)
            for frame in batch.frames:
                items: Sequence[ParsedItem]
                try:
                    if live:
                        items = parse(frame.payload, frame.received_at)
                    elif rest is None:
                        raise FrameError("unknown-source", batch.source)
                    else:
                        items = self.adapter.parse_rest(rest, frame.payload, frame.received_at)
                except FrameError as exc:
                    self._reject(
                        exc.reason, exc.detail, batch.connection_id, frame.sequence, frame.received_at,
                        frame.payload,
                    )  # fmt: skip
                    continue
                for item in items:
                    if isinstance(item, MarketRecord):
                        if type(item.data) is Trade and self._published_before(item.symbol, item.data):
                            self.duplicates += 1
                            continue
                        problem = check(item, live)
                        if problem is DUPLICATE:
                            self.duplicates += 1
                            continue
                        if problem is not None:
                            self._reject(
                                problem.reason, problem.detail, batch.connection_id, frame.sequence,
                                frame.received_at, frame.payload,
                            )  # fmt: skip
                            continue
                        topic = market_topic(item.type, exchange, item.symbol)
                        send(topic, item.symbol.encode(), encode_record(item))
                        self.records_out += 1
                        record_flow(item, topic)
        for gap in self.validator.take_gaps():
            event = gap_event(gap)
            event_emitted(event)
            send(EVENTS, exchange.encode(), encode_event(event))

    def _published_before(self, symbol: str, trade: Trade) -> bool:
        return (
            self.published.seeded
            and trade.trade_id.isdigit()
            and self.published.already_published(symbol, int(trade.trade_id))
        )

    def _reject(
        self, reason: str, detail: str, connection_id: str, sequence: int, received_at: int, payload: bytes
    ) -> None:
        self.dead_lettered += 1
        flow_meter(self.exchange).dead_letter(reason)
        if len(payload) > MAX_DEAD_LETTER_FRAME:
            detail = f"frame of {len(payload)} bytes, first {MAX_DEAD_LETTER_FRAME} kept; {detail}"
            payload = payload[:MAX_DEAD_LETTER_FRAME]
        record = dead_letter(self.exchange, reason, detail, connection_id, sequence, received_at, payload)
        self.writer.send(self.deadletters, self.exchange.encode(), record)

    async def handle(
        self, raw_values: list[bytes], on_acknowledged: Callable[[], None] | None = None
    ) -> None:
        """Normalize a batch of raw records and hand what it made to the writer. Returns before the
        broker acknowledges it when `on_acknowledged` is given (it runs then), else after."""
        if not self.published.seeded and self._read_last_trade_ids is not None:
            self.published.seed(await self._read_last_trade_ids(list(self.adapter.by_symbol)))
        self.normalize_frames(raw_values)
        flow = flow_meter(self.exchange)
        records, raw_bytes, writer = flow.hand_over(), sum(map(len, raw_values)), self.writer

        def acknowledged(acknowledged_at: AcknowledgedAt) -> None:
            flow.acknowledged(records, raw_bytes, writer.retries, acknowledged_at)
            if on_acknowledged is not None:
                on_acknowledged()

        await writer.commit(acknowledged)
        if on_acknowledged is None:
            await writer.flush()
