"""A consumer stopped as its assignment changes: aiokafka waits forever, `stop_consumer` does not."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from agents.consumer_stop import stop_consumer
from agents.embedded_broker import EmbeddedBroker
from bench.reader import create_topics

pytestmark = pytest.mark.e2e


def _unassigned_then_stopped(bootstrap: str, stop: Callable[[AIOKafkaConsumer], Awaitable[object]]) -> None:
    """Runs `stop` on a consumer whose fetch is under way, in the loop turn its assignment changed."""
    tp = TopicPartition(f"stop-{uuid.uuid4().hex[:8]}", 0)
    create_topics(bootstrap, [tp.topic])
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(tp.topic, b"record")
    assert producer.flush(30) == 0

    async def scenario() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="latest"
        )
        await consumer.start()
        consumer.assign([tp])
        assert await consumer.getmany(tp, timeout_ms=300) == {}
        assert any(not task.done() for task in consumer._fetcher._pending_tasks)  # a fetch is under way
        consumer.assign([])  # what the distribution's feed does as its last client leaves
        await stop(consumer)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_aiokafka_never_stops_a_consumer_stopped_as_its_assignment_changes(
    shared_broker: EmbeddedBroker,
) -> None:
    """The defect `stop_consumer` works around: if this fails, aiokafka fixed it and the bound can go."""
    finished: list[bool] = []

    async def plain_stop(consumer: AIOKafkaConsumer) -> None:
        stopping = asyncio.ensure_future(consumer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=3.0)
        finished.append(bool(done))
        stopping.cancel()  # the second cancellation ends it, so the test cleans up
        await asyncio.wait({stopping}, timeout=10.0)
        assert stopping.done()

    _unassigned_then_stopped(shared_broker.bootstrap, plain_stop)
    assert finished == [False], "aiokafka now stops this consumer at once: see agents/consumer_stop.py"


def test_stop_consumer_stops_it_in_two_bounded_rounds(
    shared_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    outcome: list[tuple[bool, float, bool]] = []

    async def bounded_stop(consumer: AIOKafkaConsumer) -> None:
        started = time.monotonic()
        stopped = await stop_consumer(consumer, "test", seconds=1.0)
        outcome.append((stopped, time.monotonic() - started, consumer._fetcher._fetch_task.done()))

    with caplog.at_level(logging.WARNING, logger="agents.consumer_stop"):
        _unassigned_then_stopped(shared_broker.bootstrap, bounded_stop)
    [(stopped, took, fetch_ended)] = outcome
    assert stopped and fetch_ended
    assert took < 2.0 + 1.0  # both rounds' bound, with room for a slow machine
    assert "did not stop within 1.0 s; cancelling its stop" in caplog.text
