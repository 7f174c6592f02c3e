"""The TopicWriter over librdkafka (ConfluentDelivery) against the real embedded broker:
`flush` returns only once every record is acknowledged, and keeps retrying while the broker is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.embedded_broker import EmbeddedBroker
from agents.writer import ConfluentDelivery, Record, TopicWriter, confluent_settings

pytestmark = pytest.mark.e2e


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        try:
            future.result(timeout=10)
        except KafkaException as exc:  # the broker may have created it for a producer's metadata request
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _declarer(bootstrap: str) -> Callable[[str], Awaitable[None]]:
    async def declare(topic: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, _create_topic, bootstrap, topic)

    return declare


def _read_all(
    bootstrap: str, topics: list[str], expected: int, timeout: float = 20
) -> dict[str, list[bytes]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{time.monotonic_ns()}"})
    consumer.assign([TopicPartition(topic, 0, 0) for topic in topics])
    found: dict[str, list[bytes]] = {topic: [] for topic in topics}
    deadline = time.monotonic() + timeout
    count = 0
    try:
        while count < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=10000, timeout=0.2):
                if message.error() is None:
                    found[message.topic() or ""].append(message.value() or b"")
                    count += 1
    finally:
        consumer.close()
    return found


def _settings(bootstrap: str, **overrides: object) -> dict[str, object]:
    return confluent_settings([bootstrap], linger_ms=5, compression="lz4", **overrides)


async def test_flush_returns_with_every_record_of_many_topics_in_order_on_the_broker() -> None:
    with EmbeddedBroker() as broker:
        delivery = ConfluentDelivery(_settings(broker.bootstrap))
        writer = TopicWriter(None, _declarer(broker.bootstrap), delivery=delivery)
        topics = [f"market.trade.test.s{i}" for i in range(20)]
        for n in range(2000):
            writer.send(topics[n % 20], b"key", str(n).encode())
        await asyncio.wait_for(writer.flush(), timeout=30)
        assert writer.sent == 2000 and writer.retries == 0
        # Acknowledged means readable: nothing is still on its way after flush returned.
        found = _read_all(broker.bootstrap, topics, 2000, timeout=10)
        for i, topic in enumerate(topics):
            assert [int(v) for v in found[topic]] == list(range(i, 2000, 20))
        delivery.close()


async def test_flush_keeps_retrying_while_the_broker_is_down_and_finishes_when_it_is_back() -> None:
    broker = EmbeddedBroker().start()
    port = broker.port
    declare = _declarer(broker.bootstrap)
    await declare("market.trade.test.retry")
    settings = _settings(broker.bootstrap, **{"message.timeout.ms": 1000, "reconnect.backoff.max.ms": 200})
    writer = TopicWriter(None, declare, retry_delay=0.1, delivery=ConfluentDelivery(settings))
    writer.send("market.trade.test.retry", b"k", b"warm-up")
    await asyncio.wait_for(writer.flush(), timeout=20)

    broker.stop()
    records: list[Record] = [("market.trade.test.retry", b"k", f"r{n}".encode()) for n in range(50)]
    for topic, key, value in records:
        writer.send(topic, key, value)
    flush = asyncio.ensure_future(writer.flush())
    # Proving that flush does NOT return needs a window: 4 s covers several 1 s delivery timeouts.
    done, _ = await asyncio.wait({flush}, timeout=4)
    assert not done and writer.retries > 0  # not acknowledged, so flush has not returned

    revived = EmbeddedBroker(port=port).start()
    try:
        _create_topic(revived.bootstrap, "market.trade.test.retry")
        await asyncio.wait_for(flush, timeout=30)
        found = _read_all(revived.bootstrap, ["market.trade.test.retry"], 50)
        assert sorted(found["market.trade.test.retry"]) == sorted(v for _, _, v in records)
    finally:
        revived.stop()


async def test_a_record_the_broker_can_never_accept_is_dropped_instead_of_stalling_the_writer() -> None:
    # librdkafka refuses a record over message.max.bytes locally; no broker is needed to see it.
    delivery = ConfluentDelivery(
        confluent_settings(["127.0.0.1:1"], 0, "none", **{"message.max.bytes": 10_000, "log_level": 0})
    )

    async def declare(topic: str) -> None:
        return None

    writer = TopicWriter(None, declare, retry_delay=0.01, delivery=delivery)
    writer.send("market.trade.binance.btc-usdt", b"k", b"x" * 20_000)
    await asyncio.wait_for(writer.flush(), timeout=10)
    assert delivery.undeliverable == 1
    assert writer.retries == 0
