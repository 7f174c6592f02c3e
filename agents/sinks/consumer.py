"""A sink's Kafka consumer: its own consumer group over a topic pattern, offsets committed by hand.

librdkafka (confluent-kafka) fetches and decompresses in its own threads; its blocking calls run on one
thread of our own, so the event loop, and the collection sharing it, never wait on the broker for us.

The embedded broker (Tansu) gets slower for every fetch that returns data, in proportion to the
record batches the partition holds, and holds every fetch for its full wait. So the sink asks for
few, large fetches: each waits up to `FETCH_WAIT_MS` for `FETCH_MIN_BYTES`. On a real Kafka cluster
the same settings answer as soon as a megabyte is there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from agents.sinks.batch import SinkMessage

log = logging.getLogger(__name__)

FETCH_WAIT_MS = 500
FETCH_MIN_BYTES = 1 << 20
METADATA_REFRESH_MS = 5000  # how soon a new symbol's topic is picked up by the pattern
QUEUED_KBYTES = 16 * 1024  # what librdkafka prefetches ahead of the sink, all partitions together


def consumer_settings(bootstrap_servers: Sequence[str], group_id: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": ",".join(bootstrap_servers),
        "group.id": group_id,
        "client.id": group_id,
        "enable.auto.commit": False,  # offsets are committed after the database commit
        "auto.offset.reset": "earliest",  # a new sink stores the history the topics still hold
        "fetch.wait.max.ms": FETCH_WAIT_MS,
        "fetch.min.bytes": FETCH_MIN_BYTES,
        "fetch.max.bytes": 64 << 20,
        "max.partition.fetch.bytes": 8 << 20,
        "queued.max.messages.kbytes": QUEUED_KBYTES,
        # When that prefetch queue is full librdkafka pauses fetching for 1 s by default: a stall of two
        # fetch waits for a sink that is only catching up.
        "fetch.queue.backoff.ms": 50,
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        # The embedded broker holds a group join for session_timeout / 2 (reference/platform.md).
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "socket.keepalive.enable": True,
        "log_level": 3,  # librdkafka's own errors only; our log says what matters
    }


class SinkConsumer:
    """The consumer of one sink. Every librdkafka call runs on the one thread this object owns."""

    def __init__(self, bootstrap_servers: Sequence[str], group_id: str, pattern: str) -> None:
        self.group_id = group_id
        self.pattern = pattern
        self._settings = {**consumer_settings(bootstrap_servers, group_id), "on_commit": self._on_commit}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{group_id}")
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self.assigned: set[tuple[str, int]] = set()
        self._refused: dict[tuple[str, int], int] = {}

    async def _call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def start(self) -> None:
        await self._call(self._start)

    def _start(self) -> None:
        consumer = Consumer(self._settings)
        consumer.subscribe([self.pattern], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._consumer = consumer

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self.assigned |= {(p.topic, p.partition) for p in partitions}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self.assigned -= {(p.topic, p.partition) for p in partitions}

    def assigned_now(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.assigned)

    def poll(
        self, max_records: int, wait_seconds: float, commit: dict[tuple[str, int], int] | None = None
    ) -> asyncio.Future[list[SinkMessage]]:
        """Up to `max_records` records, waiting at most `wait_seconds` for them to gather. `commit`:
        offsets of records already stored, committed first (asynchronously: a refused commit comes
        back from `refused_commits`). The read starts on the consumer's thread at once; the caller
        awaits the future when it wants the records."""
        return asyncio.get_running_loop().run_in_executor(
            self._thread, self._poll, max_records, wait_seconds, commit
        )

    def _poll(
        self, max_records: int, wait_seconds: float, commit: dict[tuple[str, int], int] | None
    ) -> list[SinkMessage]:
        assert self._consumer is not None
        if commit:
            self._consumer.commit(offsets=_partitions(commit), asynchronous=True)
        received = self._consumer.consume(num_messages=max_records, timeout=wait_seconds)
        messages = []
        for message in received:
            error = message.error()
            if error is not None:
                # No market topic yet is normal for a new deployment: the pattern picks them up later.
                quiet = error.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART)
                (log.debug if quiet else log.warning)("sink consumer %s: %s", self.group_id, error)
                continue
            messages.append(
                SinkMessage(
                    message.topic() or "", message.partition() or 0, message.offset() or 0,
                    message.timestamp()[1], message.value(),
                )
            )  # fmt: skip
        return messages

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's answer to an asynchronous commit, served inside `consume` on our thread."""
        failed = {(p.topic, p.partition): p.offset for p in partitions if error is not None or p.error}
        if failed:
            log.warning("sink consumer %s: committing %d offsets failed: %s", self.group_id, len(failed),
                        error or next(p.error for p in partitions if p.error))  # fmt: skip
            with self._lock:
                for key, offset in failed.items():
                    self._refused[key] = max(offset, self._refused.get(key, -1))

    def refused_commits(self) -> dict[tuple[str, int], int]:
        """Offsets whose commit failed since the last call: the caller commits them again."""
        with self._lock:
            refused, self._refused = self._refused, {}
        return refused

    async def close(self, commit: dict[tuple[str, int], int] | None = None) -> None:
        """Commit `commit` (synchronously) and leave the group."""
        try:
            await self._call(self._close, commit)
        finally:
            self._thread.shutdown(wait=False)

    def _close(self, commit: dict[tuple[str, int], int] | None) -> None:
        if self._consumer is None:
            return
        try:
            if commit:
                self._consumer.commit(offsets=_partitions(commit), asynchronous=False)
        except KafkaException as exc:  # the records are stored: the next owner reads them again
            log.warning("sink consumer %s: the last commit failed: %s", self.group_id, exc)
        finally:
            self._consumer.close()  # leaves the group: another sink worker takes the partitions at once
            self._consumer = None


def _partitions(offsets: dict[tuple[str, int], int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
