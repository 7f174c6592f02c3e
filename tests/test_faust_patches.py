"""The patches of Faust's and aiokafka's internals are pinned to the versions they were written for."""

from __future__ import annotations

import asyncio
import uuid
from importlib.metadata import version

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from agents import faust_patches
from agents.embedded_broker import EmbeddedBroker
from agents.faust_patches import Deliverable
from bench.reader import create_topics


@pytest.mark.parametrize(("package", "pinned"), sorted(faust_patches.PATCHED_VERSIONS.items()))
def test_the_installed_version_is_the_one_the_patches_were_written_for(package: str, pinned: str) -> None:
    installed = version(package)
    assert installed == pinned, (
        f"{package} {installed} is installed, but agents/faust_patches.py was written for {pinned}: "
        "read each patch against the new version's code, then update PATCHED_VERSIONS"
    )


def test_applying_twice_patches_once() -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    faust_patches.apply()
    first = faust_aiokafka.Consumer.perform_seek
    faust_patches.apply()
    assert faust_aiokafka.Consumer.perform_seek is first
    assert faust_aiokafka.Consumer.perform_seek.__name__ == "settled_seek"
    assert faust_aiokafka.AIOKafkaConsumerThread._fetch_records.__name__ == "active_only_fetch"


@pytest.mark.e2e
def test_a_fetch_drains_only_active_partitions_and_none_when_none_is_active(
    shared_broker: EmbeddedBroker,
) -> None:
    """aiokafka drains every partition for an empty set: during a rebalance (every partition paused,
    Faust's active set empty) a waiting fetch took a table changelog's records and Faust dropped them."""
    suffix = uuid.uuid4().hex[:8]
    changelog, stream = TopicPartition(f"changelog-{suffix}", 0), TopicPartition(f"stream-{suffix}", 0)
    create_topics(shared_broker.bootstrap, [changelog.topic, stream.topic])
    producer = Producer({"bootstrap.servers": shared_broker.bootstrap})
    for tp in (changelog, stream):
        producer.produce(tp.topic, b"record")
    assert producer.flush(30) == 0

    async def scenario() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=shared_broker.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            consumer.assign([changelog, stream])
            fetcher = consumer._fetcher
            while set(fetcher._records) != {changelog, stream}:  # both records fetched and buffered
                await asyncio.wait([fetcher._create_fetch_waiter()], timeout=1.0)  # set on each fetch
            active: set[TopicPartition] = set()  # a rebalance paused everything
            assert await fetcher.fetched_records(Deliverable(active), timeout=0.2) == {}
            active.add(stream)  # the view reads Faust's set as it changes
            assert set(await fetcher.fetched_records(Deliverable(active), timeout=0.2)) == {stream}
            assert await consumer.position(changelog) == 0
            # The same empty set, as aiokafka takes it: every partition, what lost the changelog's records.
            assert set(await fetcher.fetched_records(set(), timeout=0.2)) == {changelog}
        finally:
            await consumer.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
