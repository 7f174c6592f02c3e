"""Produce requests of our own, sent over a started aiokafka producer's client and connections.

aiokafka's accumulator and sender make several Python objects, futures and calls per batch, and with a
topic per symbol nearly every record is a batch of its own: at the quiet step's 20 symbols, ~30 % of
the event loop's profiled time went through them (docs/benchmarks.md, "Produce requests of our
own"). This sender keeps what they guaranteed:

- one request in flight per broker, carrying each ready partition's oldest batch;
- a partition with a batch in flight waits for its answer, and a batch tried again goes back to the
  head of its partition's queue, so every partition keeps its order;
- windows that come while a partition waits grow its last unsent batch (up to `batch_bytes`), so a
  slow broker gets fewer, larger batches instead of a backlog of small ones;
- a retriable error (a leader that moved, a connection lost) is tried again after RETRY_BACKOFF until
  the request timeout has passed since the batch's first record was handed over; any other error, or
  a leader still unknown by then, settles the batch as failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka import errors as Errors
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from agents.metrics import now_ms

log = logging.getLogger(__name__)

Item = tuple[bytes, bytes, int, Any]  # key, value, when handed over (ms), what the caller settles
Batch = tuple[str, int, list[Item]]  # topic, partition, records
# A batch's outcome: the error (None: written) and the offset of its first record when written.
Settled = Callable[[Batch, BaseException | None, int | None], None]
Partition = tuple[str, int]


class ProduceSender:
    RETRY_BACKOFF = 0.1  # aiokafka's retry_backoff_ms: before a batch is tried again

    def __init__(
        self,
        producer: AIOKafkaProducer,
        batch_bytes: int,
        request_timeout_ms: int,
        settled: Settled,
        broken: Callable[[], None],
    ) -> None:
        self._client = producer.client
        # The record batch attribute of the producer's compression; aiokafka has no public name for it.
        self._codec = producer._message_accumulator._compression_type
        self._batch_bytes = batch_bytes
        self._request_timeout_ms = request_timeout_ms
        self._settled = settled
        self._broken = broken  # a request failed by a bug: the caller takes every batch back
        self._batches: dict[int, Batch] = {}  # not settled, by number: in hand-over order per partition
        self._numbers = itertools.count()
        self._queues: dict[Partition, collections.deque[int]] = {}  # batches to send, oldest first
        self._built: dict[int, bytes] = {}  # batches sent at least once, as sent
        self._open_sizes: dict[int, int] = {}  # batches never sent, which may still grow: their size
        self._nodes_in_flight: set[int] = set()
        self._busy: set[Partition] = set()  # partitions with a batch in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._finding_leaders: asyncio.Task[None] | None = None
        self._abandoned = False

    @property
    def outstanding(self) -> int:
        """Batches not settled yet."""
        return len(self._batches)

    def enqueue(self, topic: str, partition: int, items: list[Item]) -> None:
        """Add records to their partition's last batch while it waits unsent, up to `batch_bytes`."""
        queue = self._queues.get((topic, partition))
        if queue is None:
            queue = self._queues[(topic, partition)] = collections.deque()
        number = queue[-1] if queue and queue[-1] in self._open_sizes else None
        records, size = ([], 0) if number is None else (self._batches[number][2], self._open_sizes[number])
        for item in items:
            item_size = len(item[0]) + len(item[1]) + 64
            if number is None or (size + item_size > self._batch_bytes and records):
                if number is not None:
                    self._open_sizes[number] = size
                number, records, size = next(self._numbers), [], 0
                self._batches[number] = (topic, partition, records)
                queue.append(number)
            records.append(item)
            size += item_size
        if number is not None:
            self._open_sizes[number] = size

    def pump(self) -> bool:
        """Send each ready partition's oldest batch, one request per broker with none in flight.
        True while some partition waits for its leader to be known."""
        if self._abandoned:
            return False
        cluster = self._client.cluster
        by_node: dict[int, list[Partition]] = {}
        leaderless = []
        for tp in self._queues:
            if tp in self._busy:
                continue
            node = cluster.leader_for_partition(TopicPartition(*tp))
            if node is None or node < 0:
                leaderless.append(tp)
            elif node not in self._nodes_in_flight:
                by_node.setdefault(node, []).append(tp)
        for node, partitions in by_node.items():
            self._send(node, partitions)
        for tp in leaderless:  # as aiokafka's send_batch: no leader within the request timeout fails
            if self._expired(self._queues[tp][0]):
                for number in self._queues.pop(tp):
                    self._settle(number, Errors.KafkaTimeoutError(f"no leader for {tp[0]}[{tp[1]}]"))
        if leaderless and (self._finding_leaders is None or self._finding_leaders.done()):
            self._finding_leaders = self._spawn(self._find_leaders())
        return bool(leaderless)

    def take_back(self) -> list[Batch]:
        """Stop: the requests in flight are not waited for, and nothing more is sent. Returns every
        batch not settled, in the order handed over, for the caller to settle."""
        self._abandoned = True
        for task in self._tasks:
            task.cancel()
        taken = list(self._batches.values())
        self._batches, self._queues, self._built, self._open_sizes = {}, {}, {}, {}
        return taken

    def _send(self, node: int, partitions: list[Partition]) -> None:
        topics: dict[str, list[tuple[int, bytes]]] = {}
        sent: dict[Partition, int] = {}
        for tp in partitions:
            queue = self._queues[tp]
            number = sent[tp] = queue.popleft()
            if not queue:
                del self._queues[tp]
            topics.setdefault(tp[0], []).append((tp[1], self._records(number)))
        self._nodes_in_flight.add(node)
        self._busy.update(partitions)
        request = ProduceRequest(None, -1, self._request_timeout_ms, list(topics.items()))  # acks=all
        self._spawn(self._produce(node, request, sent))

    def _records(self, number: int) -> bytes:
        """A batch's records as sent (built once: a retry sends the same bytes)."""
        built = self._built.get(number)
        if built is None:
            _, _, items = self._batches[number]
            builder = DefaultRecordBatchBuilder(2, self._codec, 0, -1, -1, 0, 2 * self._batch_bytes)
            for offset, (key, value, stamp, _) in enumerate(items):
                builder.append(offset, stamp, key, value, [])
            built = self._built[number] = builder.build()
            self._open_sizes.pop(number, None)
        return built

    async def _produce(self, node: int, request: ProduceRequest, sent: dict[Partition, int]) -> None:
        partitions, again = list(sent), list[int]()
        error_seen: BaseException | None = None
        try:
            answer = await self._client.send(node, request)
        except Errors.KafkaError as exc:
            if self._abandoned:
                return
            error_seen = exc
            if getattr(exc, "invalid_metadata", False):
                self._client.force_metadata_update()
            for number in sent.values():
                self._retry_or_fail(number, exc, again)
        else:
            if self._abandoned:
                return
            for topic, rows in answer.topics:
                for row in rows:  # partition, error code, base offset, ...
                    if (topic, row[0]) not in sent:
                        continue
                    number = sent.pop((topic, row[0]))
                    error = Errors.for_code(row[1])
                    if error is Errors.NoError:
                        self._settle(number, None, row[2])
                        continue
                    if getattr(error, "invalid_metadata", False):
                        self._client.force_metadata_update()
                    error_seen = error()
                    self._retry_or_fail(number, error_seen, again)
            for number in sent.values():  # not in the answer: as if lost on the way
                self._retry_or_fail(number, Errors.KafkaError("no answer for the partition"), again)
        if again:
            # Every RETRY_BACKOFF while the broker is gone: the worker's repeat filter thins these out.
            log.warning("kafka producer: %d batches are tried again (%r)", len(again), error_seen)
            await asyncio.sleep(self.RETRY_BACKOFF)
            if self._abandoned:
                return
            for number in reversed(again):
                topic, partition, _ = self._batches[number]
                self._queues.setdefault((topic, partition), collections.deque()).appendleft(number)
        self._nodes_in_flight.discard(node)
        self._busy.difference_update(partitions)
        self.pump()

    def _retry_or_fail(self, number: int, error: BaseException, again: list[int]) -> None:
        if getattr(error, "retriable", False) and not self._expired(number):
            again.append(number)
        else:
            self._settle(number, error)

    def _expired(self, number: int) -> bool:
        """Whether the request timeout has passed since the batch's first record was handed over."""
        return now_ms() - self._batches[number][2][0][2] > self._request_timeout_ms

    def _settle(self, number: int, error: BaseException | None, base_offset: int | None = None) -> None:
        batch = self._batches.pop(number)
        self._built.pop(number, None)
        self._open_sizes.pop(number, None)
        self._settled(batch, error, base_offset)

    async def _find_leaders(self) -> None:
        """A partition's leader is unknown (a new topic, or a leader that moved): ask until known."""
        while not self._abandoned:
            with contextlib.suppress(Errors.KafkaError):
                await self._client.force_metadata_update()
            if not self.pump():
                return
            await asyncio.sleep(self.RETRY_BACKOFF)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a broker's answer: its request may or may not have been written, and its
            # broker and partitions stay marked in flight, so nothing more would go there.
            log.error("kafka producer: a request failed unexpectedly", exc_info=task.exception())
            if not self._abandoned:
                self._broken()
