"""Market topics created in one request for all the topics a step needs (agents/declare.py)."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka.admin import AdminClient

from agents.declare import TopicDeclarer
from agents.embedded_broker import EmbeddedBroker

pytestmark = pytest.mark.e2e


def test_topics_declared_together_go_out_in_one_request_and_existing_ones_are_fine(
    shared_broker: EmbeddedBroker,
) -> None:
    names = [f"test-declare.together.{n}" for n in range(40)]
    declarer = TopicDeclarer(shared_broker.bootstrap, partitions=1)

    async def declare_all() -> None:
        await asyncio.wait_for(asyncio.gather(*(declarer.declare(name) for name in names)), 60)

    asyncio.run(declare_all())
    assert declarer.requests == 1
    listed = AdminClient({"bootstrap.servers": shared_broker.bootstrap}).list_topics(timeout=10).topics
    assert set(names) <= set(listed)
    assert all(len(listed[name].partitions) == 1 for name in names)

    asyncio.run(declare_all())  # they exist now: no error
    assert declarer.requests == 2
