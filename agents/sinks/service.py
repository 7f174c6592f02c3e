"""A sink: read a batch from the market topics, store it, then commit its offsets. Forever.

The offsets of a batch are committed only after its database commit, so a crash or a rebalance
replays records rather than losing them; the natural keys (PostgreSQL) and event-time ranks (Redis)
make the replay change nothing. While the database is down the batch is retried with backoff and
nothing more is read (beyond the one batch read ahead): collection, which has its own consumer group,
does not notice.

Three things overlap: librdkafka fetching (its threads), reading and decoding the next batch (the
consumer's thread, then the event loop between the database's round trips), and writing this one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from mode import Service

from agents.sinks.batch import SinkMessage, merge_offsets, next_offsets, oldest_timestamp
from agents.sinks.checks import Rejected, read_record
from agents.sinks.consumer import SinkConsumer
from agents.sinks.health import SinkStatus
from agents.sinks.metrics import SINK_ERRORS, SINK_LAG, SINK_REJECTED, SINK_ROWS
from agents.sinks.writers import Item, SinkUnavailable, Writer

log = logging.getLogger(__name__)

DECODE_CHUNK = 2000  # records decoded between two yields to the event loop (a few ms)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


def backoff_seconds(attempt: int, jitter: float) -> float:
    """Delay before retry `attempt` (1, 2, ...): doubling from 0.5 s to 30 s, times 0.5-1.0 by `jitter`
    (0-1), so sinks of several workers do not hammer a recovering database together."""
    return min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_MAX) * (0.5 + jitter / 2)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SinkService(Service):
    """One sink (a writer) behind its own Kafka consumer group."""

    def __init__(
        self,
        writer: Writer,
        consumer: SinkConsumer,
        status: SinkStatus,
        *,
        batch_rows: int,
        batch_ms: int,
        clock: Callable[[], int] = now_ms,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.writer = writer
        self.consumer = consumer
        self.status = status
        self.batch_rows = batch_rows
        self.batch_ms = batch_ms
        self._clock = clock
        self._uncommitted: dict[tuple[str, int], int] = {}  # stored, to be committed with the next read
        self._reading: asyncio.Future[tuple[list[SinkMessage], list[Item]]] | None = None
        self._lag = SINK_LAG.labels(writer.name)

    @property
    def label(self) -> str:
        return f"sink {self.writer.name}"

    async def on_start(self) -> None:
        await self.consumer.start()  # creating the consumer does not wait for the broker

    async def on_shutdown(self) -> None:  # after the loop below has been stopped
        self.status.state = "stopped"
        if self._reading is not None:
            self._reading.cancel()  # its records were never stored: they are read again next time
        await self.consumer.close(commit=self._stored_offsets())
        await self.writer.close()

    def _stored_offsets(self) -> dict[tuple[str, int], int]:
        """Offsets of stored records not committed yet, with those whose commit was refused."""
        assigned = self.consumer.assigned_now()
        refused = {k: v for k, v in self.consumer.refused_commits().items() if k in assigned}
        offsets, self._uncommitted = merge_offsets(refused, self._uncommitted), {}
        return offsets

    def _read_next(self) -> asyncio.Future[tuple[list[SinkMessage], list[Item]]]:
        """Start reading and decoding the next batch, committing what is stored so far on the way. The
        read runs on the consumer's thread and the decoding while the database works on this batch,
        so the three overlap."""
        read = self.consumer.poll(self.batch_rows, self.batch_ms / 1000, self._stored_offsets())
        self._reading = asyncio.ensure_future(self._decoded(read))
        return self._reading

    async def _decoded(self, read: asyncio.Future[list[SinkMessage]]) -> tuple[list[SinkMessage], list[Item]]:
        messages = await read
        return messages, await self._decode(messages)

    @Service.task
    async def _run(self) -> None:
        log.info("%s: reading %s as group %s into %s", self.label, self.consumer.pattern,
                 self.consumer.group_id, self.status.target)  # fmt: skip
        reading = self._read_next()
        while not self.should_stop:
            messages, items = await reading
            reading = self._read_next()
            if not messages:
                self.status.caught_up()
                self._lag.set(self.status.lag_seconds(self._clock()))
                continue
            self.status.read(oldest_timestamp(messages))
            if not await self._store(items):
                return  # stopping: the batch is neither stored nor committed, and is read again
            # Committed with the next read: only now, after the database commit.
            self._uncommitted = merge_offsets(self._uncommitted, next_offsets(messages))
            self._lag.set(self.status.lag_seconds(self._clock()))

    async def _decode(self, messages: Sequence[SinkMessage]) -> list[Item]:
        items: list[Item] = []
        for start in range(0, len(messages), DECODE_CHUNK):
            if start:
                await asyncio.sleep(0)  # a big batch must not hold the event loop (the collection's too)
            for message in messages[start : start + DECODE_CHUNK]:
                found = read_record(message.topic, message.value)
                if isinstance(found, Rejected):
                    self._reject(found.reason, f"{message.topic}@{message.offset}: {found.detail}")
                else:
                    items.append((found, message.value or b""))
        return items

    def _reject(self, reason: str, detail: str) -> None:
        SINK_REJECTED.labels(self.writer.name, reason).inc()
        self.status.rejected_one(reason)
        # One line per refused record is bounded by what an attacker can write; the count is the signal.
        log.warning("%s: refused a record (%s) %s", self.label, reason, detail)

    async def _store(self, items: list[Item]) -> bool:
        """Write until it works; False when the service stops first."""
        attempt = 0
        while not self.should_stop:
            try:
                result = await self.writer.write(items) if items else None
            except Exception as exc:  # noqa: BLE001 - an I/O boundary: whatever failed, the batch is retried
                attempt += 1
                SINK_ERRORS.labels(self.writer.name).inc()
                error = str(exc) if isinstance(exc, SinkUnavailable) else f"{type(exc).__name__}: {exc}"
                self.status.failed(error, self._clock())
                self._lag.set(self.status.lag_seconds(self._clock()))
                delay = backoff_seconds(attempt, random.random())
                if attempt == 1 or attempt % 10 == 0:
                    logger = log.warning if isinstance(exc, SinkUnavailable) else log.exception
                    logger("%s: cannot write (%s); retrying every %.0f s at most", self.label, error,
                           BACKOFF_MAX)  # fmt: skip
                await self.sleep(delay)
                continue
            if attempt:
                log.info("%s: writing again after %d failed attempts", self.label, attempt)
            stored: dict[str, int] = {}
            if result is not None:
                for reason, detail in result.rejected:
                    self._reject(reason, detail)
                stored = {kind: count for kind, count in result.stored.items() if count > 0}
                for kind, count in stored.items():
                    SINK_ROWS.labels(self.writer.name, kind).inc(count)
            self.status.stored(stored, self._clock())
            return True
        return False
