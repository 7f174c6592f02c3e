"""Market records through aiokafka: every partition bound for the broker in one produce request.

librdkafka sends one produce request per partition (its issue #1700). With a topic per symbol, at
1,000 symbols nearly every record was a request of its own, and the embedded broker spent a core of
CPU on them (docs/benchmarks.md, "The market producer alone"). `ProduceSender` keeps one request in
flight per broker and puts every partition with a batch ready into it; a partition in flight waits
for its answer, so each partition's records keep their order. It uses aiokafka's client for
connections and metadata, not its accumulator and sender (agents/produce_sender.py says why).

The records handed over within one linger window (`kafka.producer.lingerMs`) become one batch per
partition, each record stamped with the time it was handed over (librdkafka stamps CreateTime when a
record is produced, not when its batch leaves).

A broker that answers nothing for STALL_PURGE_SECONDS (paused, not gone) has its requests taken back
before the 5-minute request timeout would fail them and the writer would send them again:
the producer is abandoned without sending anything more, every record not acknowledged is in doubt,
looked up on its partition once the broker answers, and only those missing there are sent again,
through a new producer (the same guarantee as `ConfluentDelivery`'s purge).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import cramjam
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as AiokafkaError
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record._crecords import default_records
from confluent_kafka import Producer

from agents.metrics import now_ms
from agents.produce_codec import use_fast_produce_codec
from agents.produce_sender import Batch, Item, ProduceSender
from agents.writer import LIBRDKAFKA_LOGGING, InDoubtDelivery, Outcome, Record

log = logging.getLogger(__name__)


class AiokafkaDelivery(InDoubtDelivery):
    # As librdkafka's socket.timeout.ms: a request is never sent twice within a pause shorter than this.
    REQUEST_TIMEOUT_MS = 300_000
    MAX_RECORD_BYTES = 1_000_000  # librdkafka's message.max.bytes: larger records are refused at once
    BATCH_BYTES = 512 * 1024  # a window's records for one partition are split into batches of this
    WATCH_INTERVAL = 1.0  # how often a stall is looked for while records are outstanding
    RESTART_DELAY = 0.5  # between attempts to start a producer while no broker answers
    # A hand-over this many linger windows after the previous one goes out at once, without lingering:
    # hand-overs that far apart never share a window, and a quiet worker's flush window is long already.
    ALONE_AFTER = 1.5

    def __init__(self, bootstrap_servers: list[str], linger_ms: int, compression: str) -> None:
        super().__init__(",".join(bootstrap_servers))
        self._window_seconds = linger_ms / 1000
        self._compression = None if compression == "none" else compression
        if compression == "lz4":
            use_fast_lz4()
        use_fast_produce_codec()
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        self._window: dict[str, list[Item]] = {}  # records handed over since the last window, by topic
        self._batches: ProduceSender | None = None  # the producer's: batches on their way
        self._sender: asyncio.Task[None] | None = None  # sends each window
        self._watch: asyncio.Task[None] | None = None
        self._answered_at = time.monotonic()
        self._abandoned: set[asyncio.Task[None]] = set()
        self._probe: Producer | None = None
        self._recovering: asyncio.Task[None] | None = None  # in-doubt records being looked up
        self._handed_over_at = -float("inf")  # the last hand-over with records (monotonic)

    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        done, handover = self._new_handover(records)
        if handover is None:
            return done
        if self._producer is None and self._recovering is None:  # else no await on this path
            try:
                await self._started()
            except AiokafkaError as exc:  # no broker answers: the writer hands these over again later
                handover.give_up(records, exc)
                return done
        now = time.monotonic()
        if not self._open and not self._outstanding():
            self._answered_at = now  # nothing was outstanding: the stall clock starts now
        self._open[handover] = now
        # At this pace a linger window would carry this hand-over alone: it is sent at once.
        alone = now - self._handed_over_at > self.ALONE_AFTER * self._window_seconds
        self._handed_over_at = now
        stamp, window = now_ms(), self._window
        for topic, key, value in records:
            if len(key) + len(value) > self.MAX_RECORD_BYTES:
                self._refused(topic, len(value))
                handover.settle(1)
                continue
            items = window.get(topic)
            if items is None:
                items = window[topic] = []
            items.append((key, value, stamp, handover))
        # While in-doubt records are looked up, what comes meanwhile waits behind them.
        idle = self._sender is None or self._sender.done()
        if window and self._recovering is None and idle and not (alone and self._send_at_once()):
            self._sender = asyncio.ensure_future(self._send_windows())
        self._keep_watching()
        return done

    def _keep_watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watch_for_stall())

    def undeliverable(self, error: Any, topic: str | None, value: bytes | None) -> bool:
        if not isinstance(error, MessageSizeTooLargeError):
            return False
        self._refused(topic, len(value or b""))
        return True

    def _refused(self, topic: str | None, size: int) -> None:
        # Retrying cannot help and would stall every later commit of the agent for good.
        self.undeliverable_records += 1
        log.error("record for %s can never be delivered (too large, %d bytes); dropped", topic, size)

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    # Idempotence costs the embedded broker ~5x per partition (docs/benchmarks.md); every
                    # record carries its natural id, so consumers dedupe what a retry repeats.
                    enable_idempotence=False,
                    compression_type=self._compression,
                    max_batch_size=2 * self.BATCH_BYTES,
                    request_timeout_ms=self.REQUEST_TIMEOUT_MS,
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
                self._batches = ProduceSender(
                    producer, self.BATCH_BYTES, self.REQUEST_TIMEOUT_MS, self._settled, self._sender_broken
                )
            return self._producer

    async def _send_windows(self) -> None:
        while self._window:
            await asyncio.sleep(self._window_seconds)
            if self._recovering is not None:
                return  # a purge took everything back meanwhile; the look-up starts sending again
            try:
                producer = await self._started()
            except AiokafkaError:  # no broker answers yet: the window waits
                await asyncio.sleep(self.RESTART_DELAY)
                continue
            refreshed = list(self._window)
            await self._know_topics(producer, refreshed)
            if self._recovering is not None:
                return
            # Taken and registered in one go: a purge at any later await finds every record.
            window, self._window = self._window, {}
            cluster = producer.client.cluster
            for topic in set(window) - set(refreshed):
                if cluster.partitions_for_topic(topic) is None:  # new meanwhile: in the next refresh
                    self._window[topic] = window.pop(topic)
            assert self._batches is not None  # made with the producer
            self._send(producer, self._batches, window)

    def _send_at_once(self) -> bool:
        """Send the window now if that needs no await: False while the producer starts or a topic is
        new (its metadata is asked for first)."""
        producer, batches = self._producer, self._batches
        if producer is None or batches is None:
            return False
        cluster = producer.client.cluster
        if any(cluster.partitions_for_topic(topic) is None for topic in self._window):
            return False
        window, self._window = self._window, {}
        self._send(producer, batches, window)
        return True

    def _send(
        self, producer: AIOKafkaProducer, batches: ProduceSender, window: dict[str, list[Item]]
    ) -> None:
        queued: set[str] = set()
        try:
            for topic, items in window.items():
                self._register(producer, batches, topic, items)
                queued.add(topic)
            batches.pump()
        except Exception:  # a bug: these records are held nowhere else, so no stall purge would see them
            log.exception("kafka producer: a window could not be queued for sending")
            # Ahead of what waits in the window: they were handed over first.
            rest = {topic: list(items) for topic, items in window.items() if topic not in queued}
            for topic, items in self._window.items():
                rest.setdefault(topic, []).extend(items)
            self._window = rest
            self._purge("a window could not be queued; taking back everything not acknowledged")

    async def _know_topics(self, producer: AIOKafkaProducer, topics: list[str]) -> None:
        """One metadata request for a window's new topics: aiokafka asks for each topic alone, and every
        request names all topics it knows (at 1,000 symbols, 2,000 requests of up to 2,000 topics)."""
        client = producer.client
        new = [topic for topic in topics if client.cluster.partitions_for_topic(topic) is None]
        if new:
            for topic in new:
                client.add_topic(topic)
            # A refresh that fails is tried again by aiokafka's own send path.
            with contextlib.suppress(AiokafkaError):
                await client.force_metadata_update()

    def _register(
        self, producer: AIOKafkaProducer, batches: ProduceSender, topic: str, items: list[Item]
    ) -> None:
        partitions = producer.client.cluster.partitions_for_topic(topic)
        # Metadata still unknown (the refresh failed): partition 0, whose leader the sender asks for.
        if not partitions or len(partitions) == 1:
            batches.enqueue(topic, min(partitions) if partitions else 0, items)
            return
        ordered = sorted(partitions)
        by_partition: dict[int, list[Item]] = {}
        for item in items:
            by_partition.setdefault(self._partitioner(item[0], ordered, ordered), []).append(item)
        for partition, records in by_partition.items():
            batches.enqueue(topic, partition, records)

    def _settled(self, batch: Batch, error: BaseException | None, base_offset: int | None) -> None:
        topic, partition, items = batch
        if error is None and base_offset is not None:
            self._answered_at = time.monotonic()
            self.polled_at = now_ms()
            last = base_offset + len(items) - 1
            for handover, group in itertools.groupby(items, key=lambda item: item[3]):
                count = sum(1 for _ in group)
                handover.acknowledged(topic, partition, last)
                handover.settle(count)
            return
        for key, value, _, handover in items:
            if not self.undeliverable(error, topic, value):
                handover.failed.append((topic, key, value))
                handover.error = error
            handover.settle(1)

    def _outstanding(self) -> bool:
        return self._batches is not None and self._batches.outstanding > 0

    async def _watch_for_stall(self) -> None:
        while self._outstanding() or self._window:
            await asyncio.sleep(self.WATCH_INTERVAL)
            if self._outstanding() and time.monotonic() - self._answered_at > self.STALL_PURGE_SECONDS:
                self._purge(
                    f"no answer for {self.STALL_PURGE_SECONDS:.0f} s; taking back the requests in flight"
                    " before they time out and are sent again (a paused broker would write them twice)"
                )

    def _sender_broken(self) -> None:
        # Its partitions would wait for the stall purge, minutes away; taken back now, nothing is lost
        # and nothing written twice: what the failed request carried is looked up like a stall's.
        self._purge("a request failed unexpectedly; taking back everything not acknowledged")

    def _purge(self, why: str) -> None:
        """Take everything outstanding back from the producer: its records are in doubt."""
        self._answered_at = time.monotonic()
        self.purges += 1
        log.warning("kafka producer: %s: their records are looked up once the broker answers", why)
        producer, self._producer = self._producer, None
        if self._sender is not None:
            self._sender.cancel()
        batches, self._batches = self._batches, None
        taken = batches.take_back() if batches is not None else []
        waiting, self._window = self._window, {}
        # In the order they were handed over: the batches on their way, then the window not yet sent.
        in_doubt: list[tuple[str, int, Item]] = [
            (topic, partition, item) for topic, partition, items in taken for item in items
        ]
        for topic, items in waiting.items():
            partition = self._partition_of(producer, topic, items[0][0])
            in_doubt += [(topic, partition, item) for item in items]
        if producer is not None:
            abandoning = asyncio.ensure_future(_abandon(producer))
            self._abandoned.add(abandoning)
            abandoning.add_done_callback(self._abandoned.discard)
        starts = {
            (topic, partition): None if offset is None else offset + 1
            for topic, partition, _ in in_doubt
            for offset in [self.acknowledged_offsets.get((topic, partition))]
        }
        self._recovering = asyncio.ensure_future(self._recover(in_doubt, starts))

    async def _recover(
        self, in_doubt: list[tuple[str, int, Item]], starts: dict[tuple[str, int], int | None]
    ) -> None:
        """Once the broker answers, settle the in-doubt records found on their partitions and send the
        missing ones again ahead of everything handed over meanwhile, so each partition keeps its order."""
        await self._until_the_broker_answers()
        records = [(topic, partition, key, value) for topic, partition, (key, value, _, _) in in_doubt]
        try:
            missing = await self._still_missing(records, starts)
        except Exception:  # the broker boundary: sent again, a possible duplicate rather than a loss
            log.exception("kafka producer: %d records in doubt could not be looked up; sending them again",
                          len(records))  # fmt: skip
            missing = records
        left = Counter(missing)
        resend: dict[str, list[Item]] = {}
        for (topic, _, item), record in zip(in_doubt, records, strict=True):
            if left[record]:
                left[record] -= 1
                resend.setdefault(topic, []).append(item)
            else:
                self.found_in_doubt += 1
                item[3].settle(1)
        self.resent_in_doubt += len(missing)
        for topic, items in self._window.items():
            resend.setdefault(topic, []).extend(items)
        self._window = resend
        self._recovering = None
        self._answered_at = time.monotonic()
        if self._window:
            self._sender = asyncio.ensure_future(self._send_windows())
            self._keep_watching()

    def _partition_of(self, producer: AIOKafkaProducer | None, topic: str, key: bytes) -> int:
        partitions = producer.client.cluster.partitions_for_topic(topic) if producer is not None else None
        if not partitions:
            return 0
        ordered = sorted(partitions)
        return int(self._partitioner(key, ordered, ordered))

    def _metadata_client(self) -> Producer:
        if self._probe is None:  # librdkafka's metadata call has a timeout of its own, unlike aiokafka's
            self._probe = Producer({"bootstrap.servers": self._bootstrap, **LIBRDKAFKA_LOGGING})
        return self._probe

    async def aclose(self) -> None:
        """Stop the producer once the writer has flushed (what is still outstanding is not waited for)."""
        producer, self._producer = self._producer, None
        if self._batches is not None:
            self._batches.take_back()  # the writer flushed first: nothing is left to settle
            self._batches = None
        for task in (self._sender, self._watch, self._recovering):
            if task is not None:
                task.cancel()
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5.0)
            except (TimeoutError, AiokafkaError):
                await _abandon(producer)


def fast_lz4(payload: bytes) -> bytes:
    """An LZ4 frame as Kafka reads it (independent blocks, no content checksum), at the fast level."""
    compressor = cramjam.lz4.Compressor(level=0, content_checksum=False, block_linked=False)
    compressor.compress(payload)
    return bytes(compressor.finish())


def use_fast_lz4() -> None:
    """aiokafka compresses LZ4 at level 9, i.e. LZ4HC: 3-7x the CPU of the fast level librdkafka uses
    by default, for output 2-30 % smaller (docs/benchmarks.md, "LZ4 at the fast level"). aiokafka
    offers no setting for it; its record builder looks the codec up in its module at each batch, and
    tests/test_fast_lz4.py fails if that name moves."""
    default_records.lz4_encode = fast_lz4


async def _abandon(producer: AIOKafkaProducer) -> None:
    """Close a producer without sending anything more: its sender stops first, so the request that
    closing its connection fails is put back in its queue rather than sent again on a new one.
    aiokafka has no public way to do this; it is pinned in pyproject.toml, and the pause test in
    tests/test_aiokafka_delivery.py fails if these names change."""
    sender = producer._sender
    if sender is not None and sender.sender_task is not None:
        sender.sender_task.cancel()
    producer._closed = True  # nothing left to flush on purpose: no "unclosed producer" warning
    await producer.client.close()
    if sender is not None and sender.sender_task is not None:
        await asyncio.gather(sender.sender_task, return_exceptions=True)
