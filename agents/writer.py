"""Batched, acknowledged writes to many topics.

`send` only queues; `flush` declares topics it has not seen, hands every queued record to the
producer and returns once the broker has acknowledged all of them, retrying failed records, so a
caller that commits its input after `flush` never commits input whose output was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Produce = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]
Declare = Callable[[str], Awaitable[None]]


class TopicWriter:
    def __init__(self, produce: Produce, declare: Declare, retry_delay: float = 0.5) -> None:
        self._produce = produce
        self._declare = declare
        self._declared: set[str] = set()
        self._queue: list[tuple[str, bytes, bytes]] = []
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
            deliveries = [await self._produce(topic, key, value) for topic, key, value in queue]
            results = await asyncio.gather(*deliveries, return_exceptions=True)
            failed = [queue[i] for i, result in enumerate(results) if isinstance(result, BaseException)]
            self.sent += len(queue) - len(failed)
            if failed:
                self.retries += len(failed)
                error = next(r for r in results if isinstance(r, BaseException))
                log.warning("%d records not acknowledged (%r); retrying", len(failed), error)
                await asyncio.sleep(self.retry_delay)
            queue = failed
