"""Every patch of Faust's and aiokafka's internals, in one place, pinned to the versions it was written for.

A patch reaches into private code, so it is only known to be right for the versions below;
tests/test_faust_patches.py fails when the installed versions differ, so an upgrade gets a look at
each patch instead of silently running on changed internals. `apply()` is idempotent: the
composition root calls it for every worker it builds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)

# The versions whose internals these patches were written against.
PATCHED_VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}

# The embedded broker holds every fetch for the full wait, so this bounds the raw hop's latency;
# each fetch also costs the broker ~0.4 ms plus ~0.05 ms per partition (docs/benchmarks.md).
FETCH_MAX_WAIT_MS = 10
# Where no raw topic is read back (the worker normalizes in-process), only commands, events and flow
# summaries are fetched: half a second of latency there saves a hundred fetches a second. (At 250 ms
# the fetches alone kept aiokafka's thread at ~0.8 % of a core in an idle worker; 0.5 % at 1 s.)
RELAXED_FETCH_MAX_WAIT_MS = 500


def _prompt_fetches() -> None:
    """Faust asks for fetches that may wait 1.5 s for data and offers no setting for it. Kafka answers
    as soon as any data is there, but the embedded broker (Tansu) holds every fetch for the full wait,
    which put 0.5-1.5 s between a raw record's append and its normalization (docs/benchmarks.md)."""
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer

    def create_prompt(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        # Read when the consumer starts its fetcher. An app may ask for its own (CollectorApp does: a
        # worker that reads no raw topic back has no hurry, and every fetch costs the broker).
        wait = getattr(getattr(transport, "app", None), "fetch_max_wait_ms", FETCH_MAX_WAIT_MS)
        consumer._fetch_max_wait_ms = wait
        return consumer

    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_prompt  # type: ignore[method-assign]


# How long a rewind waits for the fetcher to let go of records it fetched before it; a fetch returns
# within its own 1 s timeout once the flow is stopped.
SEEK_SETTLE_SECONDS = 5.0


def _settled_seeks() -> None:
    """Faust rewinds stream partitions to their committed offsets when a rebalance's recovery ends,
    but with the flow already running (table recovery resumed it) and the fetcher still holding
    records it fetched before the rewind. The first such record then lands after the rewind: Faust
    takes the offsets between the committed one and it for a gap, commits them as processed and drops
    them when they are fetched again. After a SIGKILLed worker's partitions moved, that lost seconds
    of raw records of groups that never moved (tests/test_e2e_two_workers.py). So a rewind first
    stops the flow and waits until no fetched record is held, then seeks; recovery resumes the flow
    right after its rewind."""
    consumer_class = faust_aiokafka.Consumer
    fetch, getmany, seek = consumer_class._getmany, consumer_class.getmany, consumer_class.perform_seek

    def released(consumer: Any) -> asyncio.Event:
        """Set while the consumer holds no fetched record that getmany may still deliver."""
        if not hasattr(consumer, "_fetched_records_released"):
            consumer._fetched_records_released = asyncio.Event()
            consumer._fetched_records_released.set()
        event: asyncio.Event = consumer._fetched_records_released
        return event

    async def tracked_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        released(self).clear()  # until the getmany that asked for these records is done
        return await fetch(self, *args, **kwargs)

    async def tracked_getmany(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            async for item in getmany(self, *args, **kwargs):
                yield item
        finally:
            released(self).set()

    async def settled_seek(self: Any) -> None:
        if not self.flow_active:  # Faust's own rewind from inside getmany: nothing is delivered now
            await seek(self)
            return
        self.stop_flow()  # getmany delivers nothing more; the caller resumes the flow after the rewind
        try:
            await asyncio.wait_for(released(self).wait(), SEEK_SETTLE_SECONDS)
        except TimeoutError:
            log.warning("the fetcher still held records after %.0f s; rewinding anyway", SEEK_SETTLE_SECONDS)
        await seek(self)

    consumer_class._getmany = tracked_fetch  # type: ignore[method-assign]
    consumer_class.getmany = tracked_getmany  # type: ignore[method-assign]
    consumer_class.perform_seek = settled_seek  # type: ignore[method-assign]


class Deliverable:
    """The partitions a fetch may drain at the moment it drains: those Faust has active. Always true,
    so that aiokafka never reads "no partition is active" as "every partition"."""

    __slots__ = ("_active",)

    def __init__(self, active: Collection[Any]) -> None:
        self._active = active  # Faust's own set, which pauses and resumes change in place

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self._active


def _no_fetch_drains_everything() -> None:
    """aiokafka's `fetched_records(partitions)` drains every partition when `partitions` is empty, and a
    fetch waits up to a second in the consumer's thread, reading Faust's active set as it changes. A
    rebalance pauses every partition (the set goes empty) until table recovery resumes the changelogs;
    a fetch still waiting then drained what the new assignment's first fetches brought, changelogs
    included, and Faust dropped it with its flow stopped. Nothing reads a changelog again after its
    recovery's seek, so the recovery waited for records it would never see, and the worker's stream
    partitions (its raw topic's among them) stayed paused until the next rebalance: a minute without
    normalizing, in about one rebalance in forty of tests/test_e2e_distribution.py. So an empty set
    drains nothing (tests/test_faust_patches.py)."""
    thread_class = faust_aiokafka.AIOKafkaConsumerThread
    fetch = thread_class._fetch_records

    async def active_only_fetch(self: Any, consumer: Any, active_partitions: Any, **kwargs: Any) -> Any:
        if active_partitions is not None:  # None: a client-only app reads everything it is assigned
            active_partitions = Deliverable(active_partitions)
        return await fetch(self, consumer, active_partitions, **kwargs)

    thread_class._fetch_records = active_only_fetch  # type: ignore[method-assign,assignment]


def apply() -> None:
    """Install every patch once per process (they patch classes, which every worker shares)."""
    if not getattr(faust_aiokafka.Consumer, "_collector_patched", False):
        _prompt_fetches()
        _settled_seeks()
        _no_fetch_drains_everything()
        faust_aiokafka.Consumer._collector_patched = True  # type: ignore[attr-defined]
