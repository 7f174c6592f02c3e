"""Stopping an aiokafka consumer within a bound.

aiokafka's fetcher cancels its pending fetches and awaits them with their `CancelledError`
suppressed (aio-libs/aiokafka#983). When `stop()` cancels the fetch task while it is awaiting
those, in the same loop turn as an assignment change, the suppression swallows `stop()`'s own
cancellation too: the fetch task carries on, waits for an assignment that never comes, and
`stop()` waits for it forever. A worker's stop then hangs: its distribution feed unassigns as
its last client leaves, and it is stopped in the same moment. A second cancellation reaches the
fetch task where it waits next and ends it, so this stops in two bounded rounds.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer

log = logging.getLogger(__name__)

STOP_SECONDS = 2.0  # a healthy stop takes milliseconds; past this it is stuck, not slow


async def stop_consumer(consumer: AIOKafkaConsumer, what: str, seconds: float = STOP_SECONDS) -> bool:
    """Stop `consumer`; True once it stopped, False if it did not within two rounds of `seconds`
    (it is then left to finish on its own, logged)."""
    stopping = asyncio.ensure_future(consumer.stop())
    try:
        done, _ = await asyncio.wait({stopping}, timeout=seconds)
        if not done:
            log.warning(
                "%s: the Kafka consumer did not stop within %.1f s; cancelling its stop", what, seconds
            )
            stopping.cancel()
            done, _ = await asyncio.wait({stopping}, timeout=seconds)
    except asyncio.CancelledError:
        stopping.cancel()
        raise
    if not done:
        log.error("%s: the Kafka consumer did not stop within %.1f s of a cancel; left behind", what, seconds)
        return False
    # A cancelled stop is still a finished one: aiokafka's stop can end on a cancellation it awaited.
    if not stopping.cancelled() and stopping.exception() is not None:
        log.warning("%s: stopping the Kafka consumer: %r", what, stopping.exception())
    return True
