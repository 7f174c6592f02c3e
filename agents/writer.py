"""Batched, acknowledged writes to many topics.

`send` only queues. `commit` hands every queued record to the producer and returns at once (unless
too many commits are still unacknowledged); its callback runs once the broker has acknowledged all of
them, failed records retried until then. A caller that commits its input from that callback never
commits input whose output was lost, yet never waits for a broker round trip between two batches:
the next batch is parsed and produced while the previous one is in flight. `flush` waits for all.

Two ways to reach the broker: a per-record `produce` coroutine (Faust's aiokafka producer), or a
`BatchDelivery` such as `ConfluentDelivery`, which hands a whole batch to librdkafka. Per-record
awaits cost tens of microseconds each in Python; librdkafka's produce call costs about one, and its
network work runs in its own threads (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from agents import metrics
from agents.indoubt import InDoubt, read_back, still_missing
from agents.metrics import now_ms
from agents.spool import FileSegments
from streams.config import SpoolConfig
from streams.raw import coalesce
from streams.spool import Outgoing, Spool, SpoolLimits
from tables.records import QueueUsage

log = logging.getLogger(__name__)
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
# Every librdkafka client's own log lines (a broker that cannot be reached is reported every second)
# go through Python logging, in the worker's log format and its repeat filter, not raw to stderr.
LIBRDKAFKA_LOGGING: dict[str, Any] = {"logger": LIBRDKAFKA_LOG, "log.connection.close": False}

Record = tuple[str, bytes, bytes]  # topic, key, value
Produce = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]
Declare = Callable[[str], Awaitable[None]]
# When the broker acknowledged each topic's last record of a hand-over, in ms since the epoch; empty
# when the delivery cannot tell (its caller then takes the time the whole hand-over settled).
AcknowledgedAt = Mapping[str, int]
Outcome = tuple[list[Record], BaseException | None, AcknowledgedAt]  # failed records, one error, times
OnAcknowledged = Callable[[AcknowledgedAt], None]


class BatchDelivery(Protocol):
    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        """Produce every record, in order; the result resolves once all of them are settled."""
        ...

    async def aclose(self) -> None:
        """Release the client once the writer has flushed."""
        ...


class PerRecordDelivery:
    """Adapts a per-record `produce` coroutine (it returns a delivery future) to `BatchDelivery`."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce

    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        deliveries = [await self._produce(topic, key, value) for topic, key, value in records]
        return self._outcome(records, deliveries)

    async def aclose(self) -> None:
        return None  # the produce function's owner closes its client

    @staticmethod
    async def _outcome(records: list[Record], deliveries: list[Awaitable[Any]]) -> Outcome:
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        failed = [records[i] for i, result in enumerate(results) if isinstance(result, BaseException)]
        error = next((r for r in results if isinstance(r, BaseException)), None)
        return failed, error, {}


class TopicWriter:
    # Commits whose records are not all acknowledged yet; one more waits for the oldest. This bounds
    # the records held in memory and the input left uncommitted, not the throughput: librdkafka
    # batches whatever accumulates while earlier requests are in flight.
    MAX_UNACKNOWLEDGED = 32

    def __init__(
        self,
        produce: Produce | None,
        declare: Declare,
        retry_delay: float = 0.5,
        *,
        delivery: BatchDelivery | None = None,
    ) -> None:
        if delivery is None:
            if produce is None:
                raise ValueError("TopicWriter needs a produce function or a batch delivery")
            delivery = PerRecordDelivery(produce)
        self._delivery = delivery
        self._declare = declare
        self._declared: set[str] = set()
        self._queue: list[Record] = []
        self._unacknowledged: deque[asyncio.Future[None]] = deque()
        self.retry_delay = retry_delay
        self.sent = 0
        self.retries = 0

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._queue.append((topic, key, value))

    async def commit(self, on_acknowledged: OnAcknowledged | None = None) -> None:
        """Hand the queued records over; `on_acknowledged` runs once the broker has all of them,
        with the time each topic's records were acknowledged where the delivery reports it."""
        self._raise_failure()
        while len(self._unacknowledged) >= self.MAX_UNACKNOWLEDGED:
            await asyncio.wait([self._unacknowledged[0]])
            self._raise_failure()
        queue, self._queue = self._queue, []
        if not queue:
            if on_acknowledged is not None:
                on_acknowledged({})
            return
        new_topics = {topic for topic, _, _ in queue} - self._declared
        if new_topics:
            await asyncio.gather(*(self._declare(topic) for topic in new_topics))
            self._declared |= new_topics
        outcome = await self._delivery.hand_over(queue)
        settled = asyncio.ensure_future(self._settle(queue, outcome, on_acknowledged))
        self._unacknowledged.append(settled)
        settled.add_done_callback(self._forget_settled)

    async def flush(self) -> None:
        """Commit what is queued and wait until every record handed over is acknowledged."""
        await self.commit()
        while self._unacknowledged:
            await asyncio.wait(list(self._unacknowledged))
            self._raise_failure()

    async def close(self) -> None:
        """Release the delivery's client; call after `flush`."""
        await self._delivery.aclose()

    async def _settle(
        self, queue: list[Record], outcome: Awaitable[Outcome], on_acknowledged: OnAcknowledged | None
    ) -> None:
        acknowledged_at: dict[str, int] = {}
        while True:
            failed, error, times = await outcome
            acknowledged_at.update(times)  # a retried topic's later time replaces its earlier one
            self.sent += len(queue) - len(failed)
            if not failed:
                break
            self.retries += len(failed)
            log.warning("%d records not acknowledged (%r); retrying", len(failed), error)
            await asyncio.sleep(self.retry_delay)
            queue = failed
            outcome = await self._delivery.hand_over(queue)
        if on_acknowledged is not None:
            on_acknowledged(acknowledged_at)

    def _forget_settled(self, settled: asyncio.Future[None]) -> None:
        if settled.cancelled() or settled.exception() is None:
            self._unacknowledged.remove(settled)

    def _raise_failure(self) -> None:
        """A delivery that raised (not merely failed and retried) surfaces in the next call."""
        for settled in self._unacknowledged:
            if settled.done() and not settled.cancelled() and settled.exception() is not None:
                self._unacknowledged.remove(settled)
                raise settled.exception()  # type: ignore[misc]


# Errors no retry can fix (the record itself is unacceptable to the broker).
UNDELIVERABLE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG})


def confluent_settings(
    bootstrap_servers: list[str], linger_ms: int, compression: str, **overrides: Any
) -> dict[str, Any]:
    return {
        "bootstrap.servers": ",".join(bootstrap_servers),
        "linger.ms": linger_ms,
        "compression.type": compression,
        "acks": "all",
        # Idempotence would also keep order and avoid duplicates across librdkafka's own retries, but
        # the embedded broker (Tansu) then spends ~5x longer per partition on each produce request,
        # and a commit touches one partition per symbol (docs/benchmarks.md). Without it a retry can
        # reorder or repeat records; every record carries its natural id, so consumers dedupe.
        "enable.idempotence": False,
        # librdkafka never gives up on a record: a broker outage stalls the commits instead of losing
        # records, and nothing comes back for the TopicWriter to send again after later records (out
        # of order) or while the first copy still waits in the paused broker's socket (twice).
        "message.timeout.ms": 0,
        # How long one produce attempt waits for its answer (librdkafka's ceiling: 5 minutes). A
        # request that times out is sent again, and a broker that was only paused (SIGSTOP, a long GC,
        # a stalled disk) then writes both copies: so a pause shorter than this duplicates nothing.
        # Longer pauses are covered where it is cheap, by the idempotent raw producer.
        "socket.timeout.ms": 300_000,
        # A timed-out request (a metadata request during a long pause) does not close the connection:
        # that would fail the produce requests still in flight on it, and librdkafka would send them
        # again on a new one while the paused broker still holds the first copies.
        "socket.max.fails": 0,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "batch.size": 1_000_000,
        # Keys are hashed as Java clients and aiokafka do, so a key lands on the same partition
        # whichever client wrote it.
        "partitioner": "murmur2_random",
        **LIBRDKAFKA_LOGGING,
        **overrides,
    }


class InDoubtDelivery:
    """What a market delivery keeps to settle hand-overs, whichever client carries the records: the
    open hand-overs, the offsets acknowledged per partition, and the look-up of records in doubt (taken
    back from a broker that stopped answering), read back on their partitions once it answers."""

    # Under the client's request timeout (300 s, when it would send a request again), with room to spare.
    STALL_PURGE_SECONDS = 240.0
    READ_BACK_ATTEMPTS = 5  # a purged request may be written just after the broker first answers
    READ_BACK_TIMEOUT = 60.0

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._open: dict[Handover, float] = {}  # open hand-overs, oldest first → when (monotonic)
        self.polled_at = 0  # ms since the epoch when the latest acknowledgements were taken in
        self.undeliverable_records = 0
        # Per partition, the offset of the newest record acknowledged: where an in-doubt record would be.
        self.acknowledged_offsets: dict[tuple[str, int], int] = {}
        self.acknowledged_at_purge: dict[tuple[str, int], int] = {}  # the same, when the last purge began
        self._to_look_up: list[Handover] = []  # hand-overs whose in-doubt records wait for the broker
        self._looker: asyncio.Task[None] | None = None
        self.purges = 0
        self.found_in_doubt = 0  # purged records found on their partitions (not sent again)
        self.resent_in_doubt = 0  # purged records not found there (sent again)

    def undeliverable(self, error: KafkaError, topic: str | None, value: bytes | None) -> bool:
        raise NotImplementedError

    def _new_handover(self, records: list[Record]) -> tuple[asyncio.Future[Outcome], Handover | None]:
        """The outcome to return, and the hand-over that settles it (None: no records, settled)."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if not records:
            done.set_result(([], None, {}))
            return done, None
        return done, Handover(self, len(records), done)

    def closed(self, handover: Handover) -> None:
        self._open.pop(handover, None)

    def look_up(self, handover: Handover) -> None:
        """Settle a hand-over with in-doubt records once they have been looked up. Every hand-over
        waiting when the broker answers is looked up in one read."""
        self._to_look_up.append(handover)
        if self._looker is None or self._looker.done():
            self._looker = asyncio.ensure_future(self._look_up_waiting())

    async def _look_up_waiting(self) -> None:
        await self._until_the_broker_answers()
        while self._to_look_up:
            handovers, self._to_look_up = self._to_look_up, []
            in_doubt = [record for handover in handovers for record in handover.in_doubt]
            starts: dict[tuple[str, int], int | None] = {}
            for handover in handovers:
                for where, start in handover.look_from.items():
                    earlier = starts.get(where, start)
                    starts[where] = None if start is None or earlier is None else min(start, earlier)
            try:
                missing = await self._still_missing(in_doubt, starts)
            except Exception:  # the broker boundary: sent again, a possible duplicate rather than a loss
                log.exception("kafka producer: %d records in doubt could not be looked up; sending them"
                              " again", len(in_doubt))  # fmt: skip
                missing = in_doubt
            self.found_in_doubt += len(in_doubt) - len(missing)
            self.resent_in_doubt += len(missing)
            left = Counter(missing)
            for handover in handovers:
                for record in handover.in_doubt:
                    if left[record]:
                        left[record] -= 1
                        topic, _, key, value = record
                        handover.failed.append((topic, key, value))
                        handover.error = KafkaException(KafkaError(KafkaError._PURGE_INFLIGHT))
                handover.in_doubt = []
                handover.finish()

    def _metadata_client(self) -> Producer:
        """A librdkafka client whose metadata request tells whether the broker answers."""
        raise NotImplementedError

    async def _until_the_broker_answers(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._metadata_client()
        while True:
            try:
                await loop.run_in_executor(None, functools.partial(client.list_topics, timeout=5))
                return
            except KafkaException:  # still no answer
                await asyncio.sleep(1.0)

    async def _still_missing(
        self, in_doubt: list[InDoubt], starts: dict[tuple[str, int], int | None]
    ) -> list[InDoubt]:
        loop = asyncio.get_running_loop()
        missing = in_doubt
        for attempt in range(self.READ_BACK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(1.0)
            read = await loop.run_in_executor(
                None,
                functools.partial(
                    read_back, self._bootstrap, starts, self.READ_BACK_TIMEOUT, **LIBRDKAFKA_LOGGING
                ),
            )
            missing = still_missing(in_doubt, read)
            if not missing:
                break
        log.warning("kafka producer: %d records in doubt: %d on their partitions, %d sent again",
                    len(in_doubt), len(in_doubt) - len(missing), len(missing))  # fmt: skip
        return missing


class Handover:
    """The records of one `hand_over`, counted down by librdkafka's delivery reports."""

    __slots__ = (
        "_delivery", "acknowledged_at", "done", "error", "failed", "in_doubt", "look_from", "remaining",
    )  # fmt: skip

    def __init__(self, delivery: InDoubtDelivery, count: int, done: asyncio.Future[Outcome]) -> None:
        self._delivery = delivery
        self.remaining = count
        self.failed: list[Record] = []
        self.in_doubt: list[InDoubt] = []  # purged in flight: the broker may have written them
        self.look_from: dict[tuple[str, int], int | None] = {}  # where to look for them (None: the tail)
        self.error: BaseException | None = None
        self.acknowledged_at: dict[str, int] = {}
        self.done = done

    def on_delivery(self, error: KafkaError | None, message: Message) -> None:
        # Runs in the event loop thread: only ConfluentDelivery's poll serves delivery reports.
        topic, partition = message.topic() or "", message.partition() or 0
        if error is None:
            self.acknowledged(topic, partition, message.offset() or 0)
        elif error.code() == KafkaError._PURGE_INFLIGHT:
            self.taken_back(topic, partition, message.key() or b"", message.value() or b"")
        elif not self._delivery.undeliverable(error, topic, message.value()):
            self.failed.append((topic, message.key() or b"", message.value() or b""))
            self.error = KafkaException(error)
        self.settle(1)

    def acknowledged(self, topic: str, partition: int, offset: int) -> None:
        # Acknowledgements come in a partition's order, so the topic's last covers all its records.
        self.acknowledged_at[topic] = self._delivery.polled_at
        self._delivery.acknowledged_offsets[topic, partition] = offset

    def taken_back(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        """A record of a request taken back from a silent broker: it may have been written."""
        where = (topic, partition)
        self.in_doubt.append((*where, key, value))
        # Where it would be: after what was acknowledged before the purge (acknowledgements that
        # came after it are of later requests).
        acknowledged = self._delivery.acknowledged_at_purge.get(where)
        start = None if acknowledged is None else acknowledged + 1
        earlier = self.look_from.get(where, start)
        self.look_from[where] = None if start is None or earlier is None else min(start, earlier)

    def give_up(self, records: list[Record], error: BaseException) -> None:
        """Records librdkafka never accepted count as failed at once."""
        self.failed += records
        self.error = error
        self.settle(len(records))

    def settle(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0 and not self.done.done():
            if self.in_doubt:
                self._delivery.look_up(self)
            else:
                self.finish()

    def finish(self) -> None:
        self._delivery.closed(self)
        self.done.set_result((self.failed, self.error, self.acknowledged_at))


class ConfluentDelivery(InDoubtDelivery):
    """The librdkafka producers owned by one writer: one, and one more per TOPICS_PER_PRODUCER topics.

    Producing is a cheap C call from the event loop thread; librdkafka compresses, sends and
    collects acknowledgements in its own threads. Delivery reports are served by `poll` on the event
    loop, so the report callbacks never race it: at every hand-over (the loop is awake then anyway),
    and by a task that looks for the oldest open hand-over's reports `linger.ms` plus a round trip
    (FIRST_LOOK_AFTER) after it was handed over, and then every REPORT_INTERVAL while it stays open.
    No report can come sooner than `linger.ms` (25 by default) after its record was handed over, so
    a faster timer only wakes the loop for nothing: every 2 ms it was 500 wake-ups a second at any
    rate, a tenth of a quiet worker's CPU; and at a 10 ms pace while any hand-over was open, a
    quiet worker handing over every 40 ms was looked at 100 times a second for 25 reports
    (docs/benchmarks.md). Under load the hand-overs serve the reports.

    A broker that answers nothing for STALL_PURGE_SECONDS (paused, not gone: its connection stays
    open) gets its requests in flight taken back before librdkafka's 5-minute request timeout would
    send them again: they are in doubt (agents/indoubt.py), looked up on their partitions once the
    broker answers, and only those missing there are retried, so a long pause writes no record twice.
    """

    REPORT_INTERVAL = 0.010  # an acknowledgement is seen at most this late (the latency histogram's step)
    FIRST_LOOK_AFTER = 0.003  # past linger.ms: a produce request's round trip to a broker nearby
    # librdkafka's broker thread visits, under a lock each, every partition it leads at each wake-up,
    # and it wakes about twice per produce request, a request per partition: at 1,000 symbols (2,000
    # topics) that walk was most of the worker's CPU. Split over producers of this many topics each, a
    # wake-up walks only its producer's share (docs/benchmarks.md).
    TOPICS_PER_PRODUCER = 1000
    POLL_INTERVAL = 0.002  # while waiting for room in librdkafka's full queue

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings["bootstrap.servers"])
        self._settings = settings
        self._first_report_after = settings.get("linger.ms", 0) / 1000 + self.FIRST_LOOK_AFTER
        self._producers = [self._new_producer()]
        # Each topic's records always go through the same producer: its partitions keep their order.
        self._producer_of: dict[str, Producer] = {}
        self._poller: asyncio.Task[None] | None = None
        self._answered_at = time.monotonic()  # when a report last came (or a hand-over began after none)

    def undeliverable(self, error: KafkaError, topic: str | None, value: bytes | None) -> bool:
        """True (counted and logged) when no retry can deliver the record: it is dropped."""
        if error.code() not in UNDELIVERABLE:
            return False
        # Retrying cannot help and would stall every later commit of the agent for good.
        self.undeliverable_records += 1
        log.error(
            "record for %s can never be delivered (%s, %d bytes); dropped", topic, error, len(value or b"")
        )
        return True

    def _on_client_error(self, error: KafkaError) -> None:
        log.warning("kafka producer: %s", error)

    def _new_producer(self) -> Producer:
        return Producer({**self._settings, "error_cb": self._on_client_error})

    def _assign_producer(self, topic: str) -> Producer:
        index = len(self._producer_of) // self.TOPICS_PER_PRODUCER
        if index == len(self._producers):
            self._producers.append(self._new_producer())
        producer = self._producer_of[topic] = self._producers[index]
        return producer

    @property
    def producer_count(self) -> int:
        return len(self._producers)

    def _held(self) -> int:
        """Records librdkafka holds: queued, in flight, or with a report not yet served."""
        return sum(len(producer) for producer in self._producers)

    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        done, handover = self._new_handover(records)
        if handover is None:
            return done
        now = time.monotonic()
        if not self._open:
            self._answered_at = now  # nothing was outstanding: the stall clock starts now
        self._open[handover] = now
        self._serve_reports()
        self._keep_polling()
        producer_of, on_delivery = self._producer_of, handover.on_delivery
        for index, (topic, key, value) in enumerate(records):
            producer = producer_of.get(topic)
            if producer is None:  # not `or`: a Producer holding no records is falsy (len 0)
                producer = self._assign_producer(topic)
            try:
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                except BufferError:  # librdkafka's queue is full: let it drain, then go on
                    await self._wait_for_room()
                    producer.produce(topic, value, key, on_delivery=on_delivery)
            except BufferError as exc:  # still full: the writer retries the rest later
                handover.give_up(records[index:], exc)
                break
            except KafkaException as exc:  # refused before sending: too large, unknown topic, ...
                if self.undeliverable(exc.args[0], topic, value):
                    handover.settle(1)
                else:
                    handover.give_up([(topic, key, value)], exc)
        return done

    def _keep_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        looked_for: Handover | None = None  # the oldest open hand-over when it was last looked for
        while self._open:
            oldest, handed_over_at = next(iter(self._open.items()))
            if oldest is looked_for:
                delay = self.REPORT_INTERVAL
            else:
                delay = handed_over_at + self._first_report_after - time.monotonic()
            await asyncio.sleep(max(delay, 0.0))
            if not self._open:
                break  # the hand-overs meanwhile served every report
            if next(iter(self._open)) is not oldest:
                continue  # a hand-over served the oldest's reports meanwhile: wait for the new oldest's
            self._serve_reports()
            now = time.monotonic()
            # Only records librdkafka holds count: hand-overs waiting for a look-up hold none.
            if self._held() and now - self._answered_at > self.STALL_PURGE_SECONDS:
                self._purge_in_flight()
            # A hand-over that was due by now has been looked for by this poll as well.
            looked_for = next(iter(self._open), None)
            if looked_for is not None and self._open[looked_for] + self._first_report_after > now:
                looked_for = None

    def _purge_in_flight(self) -> None:
        """Take back the requests the silent broker holds: their records come back in doubt."""
        self._answered_at = time.monotonic()
        self.purges += 1
        self.acknowledged_at_purge = dict(self.acknowledged_offsets)
        log.warning(
            "kafka producer: no answer for %.0f s; taking back the requests in flight before they time"
            " out and are sent again (a paused broker would write them twice): their records are looked"
            " up once the broker answers", self.STALL_PURGE_SECONDS,
        )  # fmt: skip
        for producer in self._producers:
            producer.purge(in_queue=False, in_flight=True)

    def _metadata_client(self) -> Producer:
        return self._producers[0]

    async def _wait_for_room(self) -> None:
        limit = self._held() // 2
        while self._held() > limit:
            self._serve_reports()
            await asyncio.sleep(self.POLL_INTERVAL)

    def _serve_reports(self) -> None:
        self.polled_at = now_ms()
        served = 0
        for producer in self._producers:  # at every hand-over: a loop, not a generator, on this path
            served += producer.poll(0)
        if served:
            self._answered_at = time.monotonic()

    async def aclose(self) -> None:
        self.close(0.0)  # serves the last reports; librdkafka's threads end with the producer

    def close(self, timeout: float = 5.0) -> None:
        self.polled_at = now_ms()
        deadline = time.monotonic() + timeout
        for producer in self._producers:
            producer.flush(max(deadline - time.monotonic(), 0.0))


# The sources batch frames already (agents/connection.py): where the normalize agent reads the raw
# topic back, lingering again would only add latency.
RAW_LINGER_MS = 1
# Where the raw batches reach the normalizer in-process (agents/handoff.py), the raw topic is a record
# of the frames as received that nothing on the data path waits for. librdkafka sends one request per
# partition, so at quiet rates every flush was a request per connection group; lingering collects a
# partition's batches into one request (a tenth of a quiet worker's CPU was librdkafka's raw thread).
RAW_SIDE_OUTPUT_LINGER_MS = 100
# ... and there a connection's batches of this long travel as one record: a batch handed to the spool
# and librdkafka costs the event loop about the same whatever it carries, and at quiet rates a flush
# carries two or three frames (about a point of a quiet worker's CPU, docs/benchmarks.md).
RAW_SIDE_OUTPUT_COALESCE = 0.1
RAW_MAX_BYTES = 8 * 1024 * 1024  # a raw record holds one frame of up to 6 MiB (agents/connection.py)
DEFAULT_SPOOL_MEMORY = 64 * 1024 * 1024
SPOOL_DIRECTORY = "raw-spool"  # in the worker's data directory
# Errors librdkafka reports when it stops (purge) or after a fatal error: the batch was not delivered
# by this producer and is handed back to the spool.
_HANDED_BACK = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._FATAL})


def raw_spool_limits(memory_bytes: int, disk_bytes: int) -> SpoolLimits:
    """The spool's bounds. A quarter of the memory may be handed to librdkafka unacknowledged: ample
    while the broker answers (15 MB/s of raw batches and a 20 ms round trip keep ~300 KB in flight),
    while a paused broker's backlog stays in the spool, where it is bounded and spills to disk."""
    return SpoolLimits(memory_bytes, disk_bytes, window_bytes=memory_bytes // 4)


def raw_producer_settings(settings: dict[str, Any], linger_ms: int = RAW_LINGER_MS) -> dict[str, Any]:
    """librdkafka settings of the raw producer, from the common ones (`confluent_settings`)."""
    return {
        **settings,
        "linger.ms": linger_ms,
        "message.max.bytes": RAW_MAX_BYTES,
        # Idempotent: a produce request that timed out while the broker was paused (after
        # socket.timeout.ms, at most 5 minutes) and is sent again cannot be written twice, and the
        # batches of a partition keep their order. On the embedded broker it costs nothing measurable
        # here: raw batches span 8 partitions per exchange (docs/benchmarks.md).
        "enable.idempotence": True,
        "max.in.flight.requests.per.connection": 1,
    }


class RawProducer:
    """A librdkafka producer for raw batches behind a spool: the source hands a batch over and goes on
    reading, whether the broker answers or not.

    Every batch goes through the spool (streams/spool.py): the spool hands batches to librdkafka in
    order per partition within its window, and forgets one only when the broker has acknowledged it.
    While the broker is away the batches wait in the spool, in memory and then on disk; when it is
    back they go out oldest first. A batch librdkafka gives up on goes back to the front of its
    partition's queue and is sent again; one no broker can take (too large) is dropped and counted.
    When the spool is full, new batches are dropped and counted, and the start and end of each such
    episode logged: the dropped frames' sequence numbers are missing from the raw topic, so the
    normalize agent sees the gap. Nothing is resent after a restart: the spool lives as long as the
    producer.
    """

    POLL_INTERVAL = 0.05  # how often delivery reports are served and the spool's window refilled
    # Batches in flight and no acknowledgement for this long: does the broker answer anything?
    WEDGE_SUSPECT_MS = 60_000
    # It answered a metadata request this long ago and still acknowledges no batch: the producer is
    # wedged (an embedded broker that restarted empty no longer knows its producer id, and librdkafka
    # retries forever), and a new one takes over.
    WEDGE_CONFIRM_MS = 30_000
    PROBE_EVERY_MS = 10_000

    def __init__(
        self,
        settings: dict[str, Any],
        limits: SpoolLimits | None = None,
        directory: Path | None = None,
        linger_ms: int = RAW_LINGER_MS,
        coalesce_seconds: float = 0.0,
    ) -> None:
        self._settings = {**raw_producer_settings(settings, linger_ms), "error_cb": self._on_client_error}
        # 0: every batch goes to the spool as it comes. Else batches wait this long, per partition and
        # key, and go as fewer records (streams/raw.py `coalesce`).
        self._coalesce_seconds = coalesce_seconds
        self._coalescing: dict[tuple[str, int, bytes], list[bytes]] = {}
        self._coalesce_timer: asyncio.TimerHandle | None = None
        limits = limits or raw_spool_limits(DEFAULT_SPOOL_MEMORY, 0)
        if limits.disk_bytes and directory is None:
            raise ValueError("a raw spool with disk_bytes needs a directory")
        self._segments = FileSegments(directory) if limits.disk_bytes and directory is not None else None
        self.spool = Spool(limits, self._segments)
        self._producer = Producer(self._settings)
        self._poller: asyncio.Task[None] | None = None
        self._fatal: KafkaError | None = None
        self._said_handed_back: set[int] = set()  # error codes logged since the last acknowledgement
        self.failed = 0  # batches librdkafka gave up on (handed back and sent again)
        # When the broker last acknowledged a batch, or nothing was waiting for it (epoch ms).
        self._answered_at = now_ms()
        self._metadata_answered_at: int | None = None  # while suspected wedged: a metadata answer came
        self._probe: asyncio.Future[Any] | None = None
        self._probed_at = 0
        self._retired: list[Producer] = []  # replaced producers whose batches are still coming back
        self.renewals = 0

    @classmethod
    def from_config(
        cls, settings: dict[str, Any], spool: SpoolConfig, datadir: Path, linger_ms: int = RAW_LINGER_MS,
        coalesce_seconds: float = 0.0,
    ) -> RawProducer:  # fmt: skip
        """The raw producer `kafka.spool` asks for; its disk is `directory`, else raw-spool in `datadir`."""
        directory = Path(spool.directory) if spool.directory else Path(datadir) / SPOOL_DIRECTORY
        limits = raw_spool_limits(spool.memoryBytes, spool.diskBytes)
        return cls(settings, limits, directory, linger_ms, coalesce_seconds)

    async def send(self, topic: str, key: bytes, value: bytes, partition: int = -1) -> None:
        """Hand a batch over; `partition` -1 lets the key choose it. Never waits for the broker."""
        if not self._coalesce_seconds:
            self._add(topic, key, value, partition)
            return
        waiting = self._coalescing.setdefault((topic, partition, key), [])
        waiting.append(value)
        if self._coalesce_timer is None:
            loop = asyncio.get_running_loop()
            self._coalesce_timer = loop.call_later(self._coalesce_seconds, self._send_coalesced)

    def _send_coalesced(self) -> None:
        self._coalesce_timer = None
        waiting, self._coalescing = self._coalescing, {}
        for (topic, partition, key), values in waiting.items():
            for value in coalesce(values):
                self._add(topic, key, value, partition)

    def _add(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())
        dropping = self.spool.dropping
        kept = self.spool.add((topic, partition), key, value)
        if not kept and not dropping:
            self._said_dropping()
        elif kept and dropping:
            self._said_kept_again()
        self._pump()

    def _pump(self) -> None:
        """Hand over what the spool's window allows."""
        outgoing = self.spool.take()
        for index, batch in enumerate(outgoing):
            topic, partition = batch.lane
            report = functools.partial(self._on_delivery, batch.ticket, batch.key)
            try:
                self._producer.produce(topic, batch.value, batch.key, partition=partition, on_delivery=report)
            except BufferError:  # librdkafka's queue is full: the rest waits for the next round
                self._hand_back(outgoing[index:])
                return
            except KafkaException as exc:  # refused before sending
                error = exc.args[0]
                if error.code() in UNDELIVERABLE:
                    self.spool.undeliverable(batch.ticket)
                    log.error("raw batch for %s can never be delivered (%s, %d bytes); dropped",
                              topic, error, len(batch.value))  # fmt: skip
                    continue
                self._hand_back(outgoing[index:])
                log.warning("raw batch for %s refused by the producer (%s); kept to send again", topic, error)
                return

    def _hand_back(self, batches: list[Outgoing]) -> None:
        for batch in batches:
            self.spool.hand_back(batch.ticket, batch.value, batch.key)

    def _on_delivery(self, ticket: int, key: bytes, error: KafkaError | None, message: Message) -> None:
        # Runs in the event loop thread: only this producer's poll serves delivery reports.
        if error is None:
            self.spool.acknowledged(ticket)
            self._said_handed_back.clear()
            self._answered_at = now_ms()
            return
        if error.code() in UNDELIVERABLE:
            self.spool.undeliverable(ticket)
            log.error("raw batch for %s can never be delivered (%s, %d bytes); dropped",
                      message.topic(), error, len(message.value() or b""))  # fmt: skip
            return
        self.failed += 1
        self.spool.hand_back(ticket, message.value() or b"", key)
        if error.code() not in self._said_handed_back and error.code() not in _HANDED_BACK:
            self._said_handed_back.add(error.code())
            log.warning("raw batch for %s not delivered (%s); kept and sent again", message.topic(), error)

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        log.warning("kafka raw producer: %s", error)

    def _check_wedged(self) -> None:
        """A broker that answers metadata but acknowledges no batch for long gets a new producer."""
        now = now_ms()
        if not self.spool.in_flight or now - self._answered_at < self.WEDGE_SUSPECT_MS:
            self._metadata_answered_at = None
            return
        if self._metadata_answered_at is None:
            if (self._probe is None or self._probe.done()) and now - self._probed_at > self.PROBE_EVERY_MS:
                self._probed_at = now
                self._probe = asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(self._producer.list_topics, timeout=5)
                )
                self._probe.add_done_callback(self._probed)
            return
        if now - self._metadata_answered_at > self.WEDGE_CONFIRM_MS:
            silent = (now - self._answered_at) / 1000
            self._renew(f"the broker answers but has acknowledged no raw batch for {silent:.0f} s")

    def _probed(self, probe: asyncio.Future[Any]) -> None:
        if not probe.cancelled() and probe.exception() is None and self._metadata_answered_at is None:
            self._metadata_answered_at = now_ms()

    def _renew(self, reason: str) -> None:
        """After a fatal error or a wedge (the idempotent producer's state cannot be recovered): every
        batch the old producer holds goes back to the spool, and a new producer sends them again."""
        log.error("kafka raw producer: %s; starting a new producer", reason)
        self.renewals += 1
        self._answered_at = now_ms()
        self._metadata_answered_at = None
        old, self._fatal = self._producer, None
        with contextlib.suppress(KafkaException):
            old.purge(in_queue=True, in_flight=True, blocking=False)
        # Polled until its purged batches' reports have handed them back to the spool.
        self._retired.append(old)
        self._producer = Producer(self._settings)

    def _serve_retired(self) -> None:
        for old in list(self._retired):
            old.poll(0)
            if not len(old):
                self._retired.remove(old)

    async def _poll(self) -> None:
        # Ends when nothing is left to send or to hear about; the next `send` starts it again.
        while True:
            self._serve()
            if not (self.spool.in_flight or self.spool.held_bytes or self._retired or len(self._producer)):
                return
            await asyncio.sleep(self.POLL_INTERVAL)

    def _serve(self) -> None:
        self._producer.poll(0)
        self._serve_retired()
        if self._fatal is not None:
            self._renew(f"fatal error {self._fatal}")
        self._check_wedged()
        self._pump()
        self.report()

    def report(self) -> None:
        """Publish the spool's figures per exchange (metrics, flow summaries), and since when the
        broker has acknowledged nothing while batches wait (the manager holds its judgement then)."""
        if not (self.spool.in_flight or self.spool.held_bytes):
            self._answered_at = now_ms()
            metrics.broker_unanswered(0)
        else:
            metrics.broker_unanswered(self._answered_at)
        for topic, usage in self.spool.usage().items():
            metrics.spool_reported(
                topic.removeprefix("raw."),
                QueueUsage(
                    bytes=usage.held_bytes,
                    memory_bytes=usage.memory_bytes,
                    disk_bytes=usage.disk_bytes,
                    in_flight_bytes=usage.in_flight_bytes,
                    batches=usage.batches,
                    dropped_batches=usage.dropped_batches,
                    dropped_bytes=usage.dropped_bytes,
                ),
            )

    def _said_dropping(self) -> None:
        limits = self.spool.limits
        log.error(
            "raw spool full (%d MiB in memory and %d MiB on disk held for the broker): new raw batches"
            " are dropped until it is down to %.0f%%; the normalize agents see the sequence gaps",
            limits.memory_bytes >> 20, limits.disk_bytes >> 20, limits.resume_fraction * 100,
        )  # fmt: skip

    def _said_kept_again(self) -> None:
        episode = self.spool.episode
        assert episode is not None
        dropped = ", ".join(
            f"{topic}: {count} batches ({episode.bytes[topic]} bytes)"
            for topic, count in episode.batches.items()
        )
        log.error("raw spool keeps batches again; dropped while full: %s", dropped)

    async def close(self, seconds: float = 10.0) -> None:
        """Deliver what is spooled and queued (within `seconds`), then stop; what is left is lost
        (logged): a restarted worker repairs it from REST."""
        if self._coalesce_timer is not None:
            self._coalesce_timer.cancel()
            self._send_coalesced()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if self._poller is not None:
            self._poller.cancel()
        while (self.spool.in_flight or self.spool.held_bytes) and loop.time() < deadline:
            self._serve()
            await asyncio.sleep(self.POLL_INTERVAL)
        left = await loop.run_in_executor(None, self._producer.flush, max(deadline - loop.time(), 0.0))
        if left:  # the broker is still away: what librdkafka holds comes back to the spool
            with contextlib.suppress(KafkaException):
                self._producer.purge(in_queue=True, in_flight=True)
            self._producer.poll(0)
        forgotten = self.spool.clear()
        if forgotten:
            batches = sum(count for count, _ in forgotten.values())
            size = sum(size for _, size in forgotten.values())
            log.error("%d raw batches (%d bytes) not delivered at stop: the broker did not take them"
                      " within %.0f s; a restarted worker repairs them from REST",
                      batches, size, seconds)  # fmt: skip
        self.report()
        if self._segments is not None:
            self._segments.close()
