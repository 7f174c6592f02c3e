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
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from agents.metrics import now_ms

log = logging.getLogger(__name__)
_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

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


class PerRecordDelivery:
    """Adapts a per-record `produce` coroutine (it returns a delivery future) to `BatchDelivery`."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce

    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        deliveries = [await self._produce(topic, key, value) for topic, key, value in records]
        return self._outcome(records, deliveries)

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
        # A record librdkafka could not deliver within this time is reported back, and the
        # TopicWriter retries it: a broker outage stalls the commits instead of losing records.
        "message.timeout.ms": 30_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "batch.size": 1_000_000,
        # Keys are hashed as Java clients and aiokafka do, so a key lands on the same partition
        # whichever client wrote it.
        "partitioner": "murmur2_random",
        # librdkafka's own log lines (a broker that cannot be reached is reported every second) go
        # through Python logging, in the worker's log format, instead of raw to stderr.
        "logger": _LIBRDKAFKA_LOG,
        "log.connection.close": False,
        **overrides,
    }


class _Handover:
    """The records of one `hand_over`, counted down by librdkafka's delivery reports."""

    __slots__ = ("_delivery", "acknowledged_at", "done", "error", "failed", "remaining")

    def __init__(self, delivery: ConfluentDelivery, count: int, done: asyncio.Future[Outcome]) -> None:
        self._delivery = delivery
        self.remaining = count
        self.failed: list[Record] = []
        self.error: BaseException | None = None
        self.acknowledged_at: dict[str, int] = {}
        self.done = done

    def on_delivery(self, error: KafkaError | None, message: Message) -> None:
        # Runs in the event loop thread: only ConfluentDelivery's poll serves delivery reports.
        if error is None:
            # Reports arrive in a partition's order, so the topic's last report covers all its records.
            self.acknowledged_at[message.topic() or ""] = self._delivery.polled_at
        elif not self._delivery.undeliverable(error, message.topic(), message.value()):
            self.failed.append((message.topic() or "", message.key() or b"", message.value() or b""))
            self.error = KafkaException(error)
        self.settle(1)

    def give_up(self, records: list[Record], error: BaseException) -> None:
        """Records librdkafka never accepted count as failed at once."""
        self.failed += records
        self.error = error
        self.settle(len(records))

    def settle(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0 and not self.done.done():
            self._delivery.handovers_open -= 1
            self.done.set_result((self.failed, self.error, self.acknowledged_at))


class ConfluentDelivery:
    """A librdkafka producer owned by one writer.

    Producing is a cheap C call from the event loop thread; librdkafka compresses, sends and
    collects acknowledgements in its own threads. Delivery reports are served by `poll`, which a
    task of this delivery calls on the event loop every POLL_INTERVAL while any hand-over is open,
    so the report callbacks never race the loop.
    """

    POLL_INTERVAL = 0.002

    def __init__(self, settings: dict[str, Any]) -> None:
        self._producer = Producer({**settings, "error_cb": self._on_client_error})
        self.handovers_open = 0
        self.polled_at = 0  # ms since the epoch of the latest poll: when its delivery reports arrived
        self._poller: asyncio.Task[None] | None = None
        self.undeliverable_records = 0

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

    async def hand_over(self, records: list[Record]) -> Awaitable[Outcome]:
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if not records:
            done.set_result(([], None, {}))
            return done
        handover = _Handover(self, len(records), done)
        self.handovers_open += 1
        self._keep_polling()
        producer, on_delivery = self._producer, handover.on_delivery
        for index, (topic, key, value) in enumerate(records):
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
        while self.handovers_open:
            self._serve_reports()
            await asyncio.sleep(self.POLL_INTERVAL)

    async def _wait_for_room(self) -> None:
        producer = self._producer
        limit = len(producer) // 2
        while len(producer) > limit:
            self._serve_reports()
            await asyncio.sleep(self.POLL_INTERVAL)

    def _serve_reports(self) -> None:
        self.polled_at = now_ms()
        self._producer.poll(0)

    def close(self, timeout: float = 5.0) -> None:
        self.polled_at = now_ms()
        self._producer.flush(timeout)


RAW_MAX_BYTES = 8 * 1024 * 1024  # a raw record holds one frame of up to 6 MiB (agents/connection.py)


class RawProducer:
    """A librdkafka producer for raw batches: the source hands a batch over and goes on reading.

    Nobody waits for a raw batch's acknowledgement (the normalize agents read it back from the
    topic); librdkafka retries it within message.timeout.ms and a final failure is logged. One
    request in flight per connection keeps a group's batches in order across those retries, which
    the normalize agents' id checks rely on. lz4 runs in librdkafka's threads, not the event loop.
    """

    POLL_INTERVAL = 0.05  # only failures are reported, so reports are served rarely

    def __init__(self, settings: dict[str, Any]) -> None:
        self._producer = Producer(
            {
                **settings,
                # The sources batch frames already (agents/connection.py); lingering again only adds latency.
                "linger.ms": 1,
                "message.max.bytes": RAW_MAX_BYTES,
                "max.in.flight.requests.per.connection": 1,
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
                "error_cb": self._on_client_error,
            }
        )
        self._poller: asyncio.Task[None] | None = None
        self.failed = 0

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed += 1
            log.error("raw batch for %s not delivered: %s", message.topic(), error)

    def _on_client_error(self, error: KafkaError) -> None:
        log.warning("kafka raw producer: %s", error)

    async def send(self, topic: str, key: bytes, value: bytes, partition: int = -1) -> None:
        """Hand a batch over; `partition` -1 lets the key choose it."""
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())
        while True:
            try:
                self._producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:  # librdkafka's queue is full: the reader waits, as TCP will make the exchange
                await asyncio.sleep(self.POLL_INTERVAL)

    async def _poll(self) -> None:
        producer = self._producer
        while True:
            producer.poll(0)
            await asyncio.sleep(self.POLL_INTERVAL)

    async def close(self, seconds: float = 10.0) -> None:
        """Deliver what is queued (within `seconds`), then stop serving reports."""
        left = await asyncio.get_running_loop().run_in_executor(None, self._producer.flush, seconds)
        if left:
            log.error("%d raw batches not delivered at stop", left)
        if self._poller is not None:
            self._poller.cancel()
