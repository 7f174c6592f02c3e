"""Batched, acknowledged writes to many topics.

`send` only queues; `flush` declares topics it has not seen, hands every queued record to the
producer and returns once the broker has acknowledged all of them, retrying failed records, so a
caller that commits its input after `flush` never commits input whose output was lost.

Two ways to reach the broker: a per-record `produce` coroutine (Faust's aiokafka producer), or a
`BatchDelivery` such as `ConfluentDelivery`, which hands a whole batch to librdkafka and waits for it
once. Per-record awaits cost tens of microseconds each in Python; librdkafka's produce call costs
about one, and its network and acknowledgement work runs in its own threads (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)

Record = tuple[str, bytes, bytes]  # topic, key, value
Produce = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]
Declare = Callable[[str], Awaitable[None]]


class BatchDelivery(Protocol):
    async def deliver(self, records: list[Record]) -> tuple[list[Record], BaseException | None]:
        """Produce every record and wait for all of them; returns the failed ones and one error."""
        ...


class PerRecordDelivery:
    """Adapts a per-record `produce` coroutine (it returns a delivery future) to `BatchDelivery`."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce

    async def deliver(self, records: list[Record]) -> tuple[list[Record], BaseException | None]:
        deliveries = [await self._produce(topic, key, value) for topic, key, value in records]
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        failed = [records[i] for i, result in enumerate(results) if isinstance(result, BaseException)]
        error = next((r for r in results if isinstance(r, BaseException)), None)
        return failed, error


class TopicWriter:
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
        self.retry_delay = retry_delay
        self.sent = 0
        self.retries = 0

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._queue.append((topic, key, value))

    async def flush(self) -> None:
        queue, self._queue = self._queue, []
        if not queue:
            return
        new_topics = {topic for topic, _, _ in queue} - self._declared
        if new_topics:
            await asyncio.gather(*(self._declare(topic) for topic in new_topics))
            self._declared |= new_topics
        while queue:
            failed, error = await self._delivery.deliver(queue)
            self.sent += len(queue) - len(failed)
            if failed:
                self.retries += len(failed)
                log.warning("%d records not acknowledged (%r); retrying", len(failed), error)
                await asyncio.sleep(self.retry_delay)
            queue = failed


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
        # and a flush touches one partition per symbol (docs/benchmarks.md). Without it a retry can
        # reorder or repeat records; every record carries its natural id, so consumers dedupe.
        "enable.idempotence": False,
        # A record librdkafka could not deliver within this time is reported back, and the
        # TopicWriter retries it: a broker outage stalls the flush instead of losing records.
        "message.timeout.ms": 30_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "batch.size": 1_000_000,
        # Only failures produce delivery reports: success is known from the queue emptying.
        "delivery.report.only.error": True,
        **overrides,
    }


class ConfluentDelivery:
    """A librdkafka producer owned by one writer.

    `deliver` produces the batch from the event loop thread (cheap C calls), then waits in an
    executor thread until librdkafka's queue is empty. Because only this writer uses the producer
    and only failures are reported, an empty queue means every record of the batch was acknowledged
    except those the error callback collected.
    """

    WAIT_SLICE = 0.5  # seconds per blocking wait, so a stopping worker is never held for long

    def __init__(self, settings: dict[str, Any]) -> None:
        self._producer = Producer({**settings, "error_cb": self._on_client_error})
        self._failed: list[Record] = []
        self._error: BaseException | None = None
        self.undeliverable = 0

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:  # runs in the waiting thread, inside librdkafka's flush
            return
        topic, key, value = message.topic() or "", message.key() or b"", message.value() or b""
        if self._undeliverable(error, topic, value):
            return
        self._failed.append((topic, key, value))
        self._error = KafkaException(error)

    def _undeliverable(self, error: KafkaError, topic: str, value: bytes) -> bool:
        if error.code() not in UNDELIVERABLE:
            return False
        # Retrying cannot help and would stall every later record of the agent for good.
        self.undeliverable += 1
        log.error("record for %s can never be delivered (%s, %d bytes); dropped", topic, error, len(value))
        return True

    def _on_client_error(self, error: KafkaError) -> None:
        log.warning("kafka producer: %s", error)

    async def deliver(self, records: list[Record]) -> tuple[list[Record], BaseException | None]:
        loop = asyncio.get_running_loop()
        producer, on_delivery = self._producer, self._on_delivery
        self._failed, self._error = [], None
        not_produced: list[Record] = []
        for index, (topic, key, value) in enumerate(records):
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery)
            except BufferError:  # librdkafka's queue is full: let it drain, then go on
                await self._wait_empty(loop)
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                except (BufferError, KafkaException) as exc:
                    not_produced += records[index:]
                    self._error = exc
                    break
            except KafkaException as exc:
                if not self._undeliverable(exc.args[0], topic, value):
                    not_produced.append((topic, key, value))
                    self._error = exc
        await self._wait_empty(loop)
        return self._failed + not_produced, self._error

    async def _wait_empty(self, loop: asyncio.AbstractEventLoop) -> None:
        producer = self._producer
        producer.poll(0)
        while len(producer):
            await loop.run_in_executor(None, producer.flush, self.WAIT_SLICE)

    def close(self, timeout: float = 5.0) -> None:
        self._producer.flush(timeout)
