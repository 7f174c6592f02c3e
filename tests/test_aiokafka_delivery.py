"""The TopicWriter over aiokafka (AiokafkaDelivery, the market producer's default client) against the
real embedded broker: records of many topics in order, a window's records stamped with the time they
were handed over, a broker gone and back, a record too large, and a pause past the request timeout
that writes every record once, in order."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from aiokafka.protocol.produce import ProduceRequest, ProduceResponse_v7
from aiokafka.structs import TopicPartition as AiokafkaPartition
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.aiokafka_delivery import AiokafkaDelivery
from agents.embedded_broker import EmbeddedBroker
from agents.metrics import now_ms
from agents.writer import Record, TopicWriter
from tests.test_writer import _create_topic, _declarer, _produce_through_a_pause, _read_all

pytestmark = pytest.mark.e2e


def _delivery(bootstrap: str, linger_ms: int = 5) -> AiokafkaDelivery:
    return AiokafkaDelivery([bootstrap], linger_ms, "lz4")


async def test_flush_returns_with_every_record_of_many_topics_in_order_on_the_broker(
    shared_broker: EmbeddedBroker,
) -> None:
    delivery = _delivery(shared_broker.bootstrap)
    writer = TopicWriter(None, _declarer(shared_broker.bootstrap), delivery=delivery)
    topics = [f"market.trade.aiotest.s{i}" for i in range(20)]
    for step in range(10):  # several windows, several hand-overs in each
        for n in range(step * 200, (step + 1) * 200):
            writer.send(topics[n % 20], b"key", str(n).encode())
        await writer.commit()
    await asyncio.wait_for(writer.flush(), timeout=30)
    assert writer.sent == 2000 and writer.retries == 0
    found = _read_all(shared_broker.bootstrap, topics, 2000, timeout=10)
    for i, topic in enumerate(topics):
        assert [int(v) for v in found[topic]] == list(range(i, 2000, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unclosed producer"
        await writer.close()


async def test_a_topic_of_several_partitions_gets_each_key_on_its_own_partition_in_order(
    shared_broker: EmbeddedBroker,
) -> None:
    topic = "market.events.aiotest.keyed"
    admin = AdminClient({"bootstrap.servers": shared_broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, 4, 1)]).values():
        future.result(timeout=10)
    delivery = _delivery(shared_broker.bootstrap)
    writer = TopicWriter(None, _declarer(shared_broker.bootstrap), delivery=delivery)
    keys = [f"k{i}".encode() for i in range(8)]
    for n in range(800):
        writer.send(topic, keys[n % 8], str(n).encode())
    await asyncio.wait_for(writer.flush(), timeout=30)
    await writer.close()
    consumer = Consumer(
        {"bootstrap.servers": shared_broker.bootstrap, "group.id": f"t-{time.monotonic_ns()}"}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    by_key: dict[bytes, list[tuple[int, int]]] = {}
    deadline = time.monotonic() + 10
    count = 0
    while count < 800 and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=1000, timeout=0.2):
            if message.error() is None:
                by_key.setdefault(message.key() or b"", []).append(
                    (message.partition() or 0, int(message.value()))
                )
                count += 1
    consumer.close()
    assert count == 800
    partitions_used = set()
    for index, key in enumerate(keys):
        partitions = {partition for partition, _ in by_key[key]}
        assert len(partitions) == 1  # a key stays on one partition (murmur2, as Java clients and librdkafka)
        partitions_used |= partitions
        assert [value for _, value in by_key[key]] == list(range(index, 800, 8))
    assert len(partitions_used) > 1


async def test_a_record_is_stamped_with_the_time_it_was_handed_over_not_when_its_window_left(
    shared_broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.aiotest.stamped"
    delivery = _delivery(shared_broker.bootstrap, linger_ms=300)  # a window far longer than a round trip
    writer = TopicWriter(None, _declarer(shared_broker.bootstrap), delivery=delivery)
    await writer.commit()
    writer.send(topic, b"k", b"first")
    before = now_ms()
    await writer.commit()  # the hand-over: it returns before the window leaves, ~300 ms later
    after = now_ms()
    await asyncio.wait_for(writer.flush(), timeout=30)
    await writer.close()
    consumer = Consumer(
        {"bootstrap.servers": shared_broker.bootstrap, "group.id": f"t-{time.monotonic_ns()}"}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages = [m for m in consumer.consume(num_messages=10, timeout=5) if m.error() is None]
    consumer.close()
    assert [m.value() for m in messages] == [b"first"]
    _, stamp = messages[0].timestamp()
    # Stamped within the hand-over (which may first start the producer), not when the window left.
    assert before <= stamp <= after


async def test_flush_keeps_waiting_while_the_broker_is_down_and_finishes_when_it_is_back() -> None:
    topic = "market.trade.aiotest.retry"
    broker = EmbeddedBroker().start()
    declare = _declarer(broker.bootstrap)
    await declare(topic)
    writer = TopicWriter(None, declare, retry_delay=0.1, delivery=_delivery(broker.bootstrap))
    writer.send(topic, b"k", b"warm-up")
    await asyncio.wait_for(writer.flush(), timeout=20)
    port = broker.port
    broker.stop()
    records: list[Record] = [(topic, b"k", f"r{n}".encode()) for n in range(50)]
    for record in records:
        writer.send(*record)
    flush = asyncio.ensure_future(writer.flush())
    # Proving that flush does NOT return needs a window.
    done, _ = await asyncio.wait({flush}, timeout=3)
    assert not done

    revived = EmbeddedBroker(port=port).start()
    try:
        _create_topic(revived.bootstrap, topic)
        await asyncio.wait_for(flush, timeout=60)
        found = _read_all(revived.bootstrap, [topic], 50)
        assert found[topic] == [value for _, _, value in records]  # each once, in order
        await writer.close()
    finally:
        revived.stop()


async def test_a_record_the_broker_can_never_accept_is_dropped_instead_of_stalling_the_writer(
    shared_broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.aiotest.large"
    delivery = _delivery(shared_broker.bootstrap)
    writer = TopicWriter(None, _declarer(shared_broker.bootstrap), retry_delay=0.01, delivery=delivery)
    writer.send(topic, b"k", b"x" * (AiokafkaDelivery.MAX_RECORD_BYTES + 1))
    writer.send(topic, b"k", b"fits")
    await asyncio.wait_for(writer.flush(), timeout=10)
    await writer.close()
    assert delivery.undeliverable_records == 1 and writer.retries == 0
    assert _read_all(shared_broker.bootstrap, [topic], 1)[topic] == [b"fits"]


async def test_market_records_in_flight_through_a_pause_past_the_request_timeout_are_written_once(
    broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.aiotest.paused"
    declare = _declarer(broker.bootstrap)
    await declare(topic)
    delivery = _delivery(broker.bootstrap)
    delivery.REQUEST_TIMEOUT_MS = 6000
    delivery.STALL_PURGE_SECONDS = 3.0  # before the 6 s request timeout, as 240 s is before 300 s
    writer = TopicWriter(None, declare, delivery=delivery)
    sent, found = await _produce_through_a_pause(broker, writer, topic)
    assert delivery.purges >= 1 and delivery.found_in_doubt + delivery.resent_in_doubt > 0
    assert len(found) == len(sent) and found == sent  # each once, in order
    await writer.close()


async def test_a_purge_while_the_sender_awaits_metadata_loses_nothing_and_writes_nothing_twice(
    shared_broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.aiotest.purged"
    declare = _declarer(shared_broker.bootstrap)
    delivery = _delivery(shared_broker.bootstrap)
    delivery.ALONE_AFTER = float("inf")  # every window lingers: the path whose refresh is held here
    writer = TopicWriter(None, declare, delivery=delivery)
    writer.send(topic, b"k", b"r0")
    await asyncio.wait_for(writer.flush(), timeout=20)
    refreshing, release = asyncio.Event(), asyncio.Event()
    know_topics = delivery._know_topics

    async def held_refresh(*args: object) -> None:
        refreshing.set()
        await release.wait()
        await know_topics(*args)  # type: ignore[arg-type]

    delivery._know_topics = held_refresh  # type: ignore[method-assign]
    for n in range(1, 51):
        writer.send(topic, b"k", f"r{n}".encode())
    await writer.commit()
    await asyncio.wait_for(refreshing.wait(), timeout=10)
    delivery._purge("as the stall watch does")  # while the sender awaits the refresh
    release.set()
    delivery._know_topics = know_topics  # type: ignore[method-assign]
    for n in range(51, 61):
        writer.send(topic, b"k", f"r{n}".encode())
    await asyncio.wait_for(writer.flush(), timeout=60)
    await writer.close()
    assert delivery.purges == 1 and delivery.resent_in_doubt == 50
    found = _read_all(shared_broker.bootstrap, [topic], 62, timeout=5)[topic]  # one more: none
    assert found == [f"r{n}".encode() for n in range(61)]  # each once, in order


def _refusing(delivery: AiokafkaDelivery, refusals: int, fault: str) -> list[int]:
    """Make the producer's first `refusals` produce requests fail as `fault` says, without reaching the
    broker (so nothing is written): the answer a leader that moved gives, or a connection lost before
    the request left. Returns the list the faults are counted in."""
    producer = delivery._producer
    assert producer is not None
    client, send, refused = producer.client, producer.client.send, list[int]()

    async def send_or_refuse(node_id: int, request: object, **kwargs: object) -> object:
        if not isinstance(request, ProduceRequest) or len(refused) >= refusals:
            return await send(node_id, request, **kwargs)
        refused.append(node_id)
        if fault == "connection lost":
            raise KafkaConnectionError("dropped before the request left")
        if fault == "a bug":
            raise RuntimeError("not a broker's answer")
        answer = [
            (topic, [(partition, fault_code(fault), -1, -1, -1) for partition, _ in partitions])
            for topic, partitions in request._topics  # type: ignore[attr-defined]
        ]
        return ProduceResponse_v7(answer, 0)

    client.send = send_or_refuse  # type: ignore[method-assign]
    return refused


async def _warmed_up(
    bootstrap: str, topics: list[str], retry_delay: float = 0.5
) -> tuple[AiokafkaDelivery, TopicWriter]:
    """A writer whose producer has started and written a record to each topic."""
    delivery = _delivery(bootstrap)
    writer = TopicWriter(None, _declarer(bootstrap), retry_delay=retry_delay, delivery=delivery)
    for topic in topics:
        writer.send(topic, b"k", b"warm-up")
    await asyncio.wait_for(writer.flush(), timeout=20)
    return delivery, writer


def fault_code(fault: str) -> int:
    return {"not the leader": 6, "invalid record": 87}[fault]


@pytest.mark.parametrize("fault", ["not the leader", "connection lost"])
async def test_batches_refused_with_an_error_worth_retrying_go_again_each_once_in_order(
    shared_broker: EmbeddedBroker, fault: str
) -> None:
    topics = [f"market.trade.aiotest.again-{fault.replace(' ', '-')}-{i}" for i in range(5)]
    delivery, writer = await _warmed_up(shared_broker.bootstrap, topics)
    refused = _refusing(delivery, 3, fault)
    for step in range(6):  # windows keep coming while the first batches are refused
        for n in range(step * 50, (step + 1) * 50):
            writer.send(topics[n % 5], b"k", str(n).encode())
        await writer.commit()
    await asyncio.wait_for(writer.flush(), timeout=30)
    await writer.close()
    assert len(refused) == 3 and writer.retries == 0  # tried again by the delivery, not the writer
    found = _read_all(shared_broker.bootstrap, topics, 305, timeout=10)
    for i, topic in enumerate(topics):
        assert found[topic] == [b"warm-up"] + [str(n).encode() for n in range(i, 300, 5)]


async def test_batches_refused_for_good_are_handed_back_to_the_writer_which_sends_them_once(
    shared_broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.aiotest.invalid"
    delivery, writer = await _warmed_up(shared_broker.bootstrap, [topic], retry_delay=0.05)
    refused = _refusing(delivery, 1, "invalid record")
    for n in range(20):
        writer.send(topic, b"k", str(n).encode())
    await asyncio.wait_for(writer.flush(), timeout=30)
    await writer.close()
    assert len(refused) == 1 and writer.retries == 20
    found = _read_all(shared_broker.bootstrap, [topic], 22, timeout=5)[topic]  # one more: none
    assert found == [b"warm-up"] + [str(n).encode() for n in range(20)]


async def test_a_partition_without_a_known_leader_waits_for_one_and_fails_after_the_request_timeout(
    shared_broker: EmbeddedBroker,
) -> None:
    led, leaderless = "market.trade.aiotest.led", "market.trade.aiotest.leaderless"
    declare = _declarer(shared_broker.bootstrap)
    for topic in (led, leaderless):
        await declare(topic)
    delivery = _delivery(shared_broker.bootstrap)
    delivery.REQUEST_TIMEOUT_MS = 1500
    warm_up = await delivery.hand_over([(led, b"k", b"warm-up"), (leaderless, b"k", b"warm-up")])
    assert (await asyncio.wait_for(warm_up, timeout=20))[0] == []
    producer = delivery._producer
    assert producer is not None
    cluster = producer.client.cluster
    leader_for_partition = cluster.leader_for_partition
    asked = asyncio.Event()
    force_metadata_update = producer.client.force_metadata_update

    def leader(tp: AiokafkaPartition) -> int | None:
        return None if tp.topic == leaderless else leader_for_partition(tp)

    def update() -> asyncio.Future[bool]:
        asked.set()
        return force_metadata_update()

    cluster.leader_for_partition = leader  # type: ignore[method-assign]
    producer.client.force_metadata_update = update  # type: ignore[method-assign]
    # While no leader is known, the partition waits (and asks for one); the other partition does not.
    waiting = await delivery.hand_over([(led, b"k", b"r1"), (leaderless, b"k", b"r1")])
    await asyncio.wait_for(asked.wait(), timeout=5)
    cluster.leader_for_partition = leader_for_partition  # type: ignore[method-assign]
    failed, error, _ = await asyncio.wait_for(waiting, timeout=10)
    assert failed == [] and error is None
    # A leader that never comes within the request timeout fails the records, not the others.
    cluster.leader_for_partition = leader  # type: ignore[method-assign]
    started = time.monotonic()
    given_up = await delivery.hand_over([(led, b"k", b"r2"), (leaderless, b"k", b"r2")])
    failed, error, _ = await asyncio.wait_for(given_up, timeout=10)
    assert failed == [(leaderless, b"k", b"r2")] and isinstance(error, KafkaTimeoutError)
    assert time.monotonic() - started >= 1.4
    await delivery.aclose()
    found = _read_all(shared_broker.bootstrap, [led, leaderless], 6, timeout=5)
    assert found == {led: [b"warm-up", b"r1", b"r2"], leaderless: [b"warm-up", b"r1"]}


async def test_a_hand_over_after_a_quiet_spell_goes_at_once_and_close_ones_share_a_linger_window(
    shared_broker: EmbeddedBroker,
) -> None:
    topics = [f"market.trade.aiotest.alone-{i}" for i in range(3)]
    declare = _declarer(shared_broker.bootstrap)
    for topic in topics:
        await declare(topic)
    delivery = _delivery(shared_broker.bootstrap, linger_ms=200)
    warm_up = await delivery.hand_over([(topic, b"k", b"warm-up") for topic in topics])
    await asyncio.wait_for(warm_up, timeout=20)
    producer = delivery._producer
    assert producer is not None
    send, requests = producer.client.send, list[list[str]]()

    async def counted(node_id: int, request: object, **kwargs: object) -> object:
        if isinstance(request, ProduceRequest):
            requests.append(sorted(topic for topic, _ in request._topics))  # type: ignore[attr-defined]
        return await send(node_id, request, **kwargs)

    producer.client.send = counted  # type: ignore[method-assign]
    await asyncio.sleep(0.35)  # the quiet spell: longer than 1.5 linger windows
    alone = await delivery.hand_over([(topics[0], b"k", b"a")])
    await asyncio.sleep(0)  # the request's task takes its first step
    assert requests == [[topics[0]]]  # no linger window
    close = [await delivery.hand_over([(topic, b"k", b"b")]) for topic in topics[1:]]
    await asyncio.sleep(0)
    assert requests == [[topics[0]]]  # these two linger together
    for outcome in (alone, *close):
        assert (await asyncio.wait_for(outcome, timeout=20))[0] == []
    assert requests == [[topics[0]], topics[1:]]
    await delivery.aclose()


async def test_a_request_that_fails_by_a_bug_is_logged_and_its_records_are_looked_up_and_written_once(
    shared_broker: EmbeddedBroker,
) -> None:
    """Its broker and partitions stay marked in flight, so the sender would send nothing more there:
    everything not acknowledged is taken back at once and looked up, as after a stall."""
    topic = "market.trade.aiotest.bug"
    delivery, writer = await _warmed_up(shared_broker.bootstrap, [topic])
    logged = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "failed unexpectedly" in record.getMessage() and record.exc_info:
                logged.set()

    seen = Seen()
    logging.getLogger("agents.produce_sender").addHandler(seen)
    try:
        refused = _refusing(delivery, 1, "a bug")
        for n in range(20):  # the first window fails; the rest waits behind it, then goes on
            writer.send(topic, b"k", str(n).encode())
            await writer.commit()
        await asyncio.wait_for(logged.wait(), timeout=10)
        await asyncio.wait_for(writer.flush(), timeout=30)
    finally:
        logging.getLogger("agents.produce_sender").removeHandler(seen)
    await writer.close()
    assert refused and delivery.purges == 1 and writer.retries == 0
    assert delivery.resent_in_doubt == 20 and delivery.found_in_doubt == 0  # all handed over before
    found = _read_all(shared_broker.bootstrap, [topic], 22, timeout=5)[topic]  # one more: none
    assert found == [b"warm-up"] + [str(n).encode() for n in range(20)]


@pytest.mark.parametrize("path", ["linger window", "at once"])
async def test_a_window_that_fails_to_queue_by_a_bug_is_logged_and_each_record_written_once(
    shared_broker: EmbeddedBroker, path: str
) -> None:
    """Records taken out of the window are held nowhere else until the sender has them: a bug while
    they are queued must not leave their hand-overs open for good."""
    topics = [f"market.trade.aiotest.unqueued-{path.replace(' ', '-')}-{i}" for i in range(3)]
    delivery, writer = await _warmed_up(shared_broker.bootstrap, topics)
    if path == "linger window":
        delivery.ALONE_AFTER = float("inf")
    register, failures = delivery._register, list[str]()

    def register_or_fail(producer: object, batches: object, topic: str, items: list[object]) -> None:
        if topic == topics[1] and not failures:
            failures.append(topic)
            raise RuntimeError("not a broker's answer")
        register(producer, batches, topic, items)  # type: ignore[arg-type]

    delivery._register = register_or_fail  # type: ignore[method-assign,assignment]
    for n in range(30):
        writer.send(topics[n % 3], b"k", str(n).encode())
    await writer.commit()
    await asyncio.wait_for(writer.flush(), timeout=30)
    await writer.close()
    assert failures and delivery.purges == 1 and writer.retries == 0
    found = _read_all(shared_broker.bootstrap, topics, 34, timeout=5)  # one more: none
    for i, topic in enumerate(topics):
        assert found[topic] == [b"warm-up"] + [str(n).encode() for n in range(i, 30, 3)]
