"""The TopicWriter over librdkafka (ConfluentDelivery) and the RawProducer against the real embedded
broker: `commit` hands records over without waiting and calls back only once the broker has all of
them, `flush` returns only once every record is acknowledged, and both keep retrying while the broker
is gone."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents import metrics
from agents.embedded_broker import EmbeddedBroker
from agents.metrics import now_ms
from agents.writer import (
    AcknowledgedAt,
    ConfluentDelivery,
    RawProducer,
    Record,
    TopicWriter,
    confluent_settings,
    raw_spool_limits,
)
from streams.raw import RawBatch, RawFrame, decode_batch, encode_batch
from streams.spool import SpoolLimits
from tests.harness import broker_paused

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


async def test_flush_returns_with_every_record_of_many_topics_in_order_on_the_broker(
    shared_broker: EmbeddedBroker,
) -> None:
    broker = shared_broker
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


async def test_topics_past_one_producers_share_go_to_more_producers_each_topic_in_order(
    shared_broker: EmbeddedBroker,
) -> None:
    broker = shared_broker
    delivery = ConfluentDelivery(_settings(broker.bootstrap))
    delivery.TOPICS_PER_PRODUCER = 6  # 20 topics: four producers (the default is 1,000 topics each)
    writer = TopicWriter(None, _declarer(broker.bootstrap), delivery=delivery)
    topics = [f"market.trade.test.p{i}" for i in range(20)]
    for round_ in range(3):  # topics seen again stay with their producer
        for n in range(round_ * 600, (round_ + 1) * 600):
            writer.send(topics[n % 20], b"key", str(n).encode())
        await asyncio.wait_for(writer.flush(), timeout=30)
        assert delivery.producer_count == 4
    assert writer.sent == 1800 and writer.retries == 0
    found = _read_all(broker.bootstrap, topics, 1800, timeout=10)
    for i, topic in enumerate(topics):
        assert [int(v) for v in found[topic]] == list(range(i, 1800, 20))
    delivery.close()


async def _writer_on_a_broker_to_stop(topic: str) -> tuple[EmbeddedBroker, TopicWriter]:
    """A writer that has delivered once to `topic` (so it is declared), with 1 s delivery timeouts."""
    broker = EmbeddedBroker().start()
    declare = _declarer(broker.bootstrap)
    await declare(topic)
    settings = _settings(broker.bootstrap, **{"message.timeout.ms": 1000, "reconnect.backoff.max.ms": 200})
    writer = TopicWriter(None, declare, retry_delay=0.1, delivery=ConfluentDelivery(settings))
    writer.send(topic, b"k", b"warm-up")
    await asyncio.wait_for(writer.flush(), timeout=20)
    return broker, writer


async def test_flush_keeps_retrying_while_the_broker_is_down_and_finishes_when_it_is_back() -> None:
    broker, writer = await _writer_on_a_broker_to_stop("market.trade.test.retry")
    port = broker.port
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
    assert delivery.undeliverable_records == 1
    assert writer.retries == 0


async def test_commit_returns_at_once_and_calls_back_only_when_the_broker_has_every_record(
    shared_broker: EmbeddedBroker,
) -> None:
    broker = shared_broker
    declare = _declarer(broker.bootstrap)
    topics = [f"market.trade.test.c{i}" for i in range(5)]
    for topic in topics:
        await declare(topic)
    delivery = ConfluentDelivery(_settings(broker.bootstrap))
    writer = TopicWriter(None, declare, delivery=delivery)
    acknowledged: list[int] = []
    all_acknowledged = asyncio.Event()
    committed_at: dict[int, int] = {}

    def on_acknowledged(step: int, acknowledged_at: AcknowledgedAt) -> None:
        # Each topic's acknowledgement time, between the step's commit and this callback.
        assert set(acknowledged_at) == set(topics)
        assert all(committed_at[step] <= t <= now_ms() for t in acknowledged_at.values())
        acknowledged.append(step)
        if len(acknowledged) == 3:
            all_acknowledged.set()

    for step in range(3):
        for n in range(100):
            writer.send(topics[n % 5], b"key", f"{step}:{n}".encode())
        committed_at[step] = now_ms()
        await writer.commit(functools.partial(on_acknowledged, step))
    # Delivery reports are served on this event loop, so none can have arrived yet.
    assert acknowledged == []
    await asyncio.wait_for(all_acknowledged.wait(), timeout=30)
    assert sorted(acknowledged) == [0, 1, 2] and writer.sent == 300
    found = _read_all(broker.bootstrap, topics, 300, timeout=10)
    assert sorted(v.decode() for values in found.values() for v in values) == sorted(
        f"{step}:{n}" for step in range(3) for n in range(100)
    )
    delivery.close()


async def test_commits_wait_while_too_many_are_unacknowledged_and_none_is_called_back_early() -> None:
    broker, writer = await _writer_on_a_broker_to_stop("market.trade.test.bound")
    port = broker.port
    writer.MAX_UNACKNOWLEDGED = 2
    broker.stop()

    acknowledged: list[int] = []
    for step in range(2):
        writer.send("market.trade.test.bound", b"k", f"s{step}".encode())
        await asyncio.wait_for(writer.commit(lambda _, step=step: acknowledged.append(step)), timeout=5)
    writer.send("market.trade.test.bound", b"k", b"s2")
    third = asyncio.ensure_future(writer.commit(lambda _: acknowledged.append(2)))
    # Proving that the third commit waits needs a window: 3 s covers several 1 s delivery timeouts.
    done, _ = await asyncio.wait({third}, timeout=3)
    assert not done and acknowledged == [] and writer.retries > 0

    revived = EmbeddedBroker(port=port).start()
    try:
        _create_topic(revived.bootstrap, "market.trade.test.bound")
        await asyncio.wait_for(third, timeout=30)
        await asyncio.wait_for(writer.flush(), timeout=30)
        assert sorted(acknowledged) == [0, 1, 2]
        found = _read_all(revived.bootstrap, ["market.trade.test.bound"], 3)  # the revived broker is empty
        assert sorted(found["market.trade.test.bound"]) == [b"s0", b"s1", b"s2"]
    finally:
        revived.stop()


async def test_the_raw_producer_keeps_a_key_in_order_carries_big_frames_and_delivers_on_close(
    shared_broker: EmbeddedBroker,
) -> None:
    broker = shared_broker
    _create_topic(broker.bootstrap, "raw.test")
    producer = RawProducer(_settings(broker.bootstrap))
    big = b"b" * (6 * 1024 * 1024)  # the largest frame a connection accepts travels alone
    values = [f"r{n}".encode() for n in range(500)]
    for value in values[:250]:
        await producer.send("raw.test", b"binance:0", value)
    await producer.send("raw.test", b"binance:0", big)
    for value in values[250:]:
        await producer.send("raw.test", b"binance:0", value)
    await asyncio.wait_for(producer.close(), timeout=30)
    assert producer.failed == 0
    found = _read_all(broker.bootstrap, ["raw.test"], 501, timeout=20)["raw.test"]
    assert found == [*values[:250], big, *values[250:]]


async def test_a_coalescing_raw_producer_sends_a_windows_batches_of_a_connection_as_one_record(
    shared_broker: EmbeddedBroker,
) -> None:
    broker = shared_broker
    _create_topic(broker.bootstrap, "raw.coalesce")
    producer = RawProducer(_settings(broker.bootstrap), coalesce_seconds=0.05)

    def batch(connection: str, first: int, count: int) -> bytes:
        frames = [RawFrame(n, 1_700_000_000_000 + n, f"f{n}".encode()) for n in range(first, first + count)]
        return encode_batch(RawBatch(exchange="binance", connection_id=connection, frames=frames))

    # Two windows: the first collects three batches of one connection under one key and one of
    # another key; the second is sent by close().
    for first in (0, 2, 5):
        await producer.send("raw.coalesce", b"binance:0", batch("c0", first, 2 if first < 5 else 1))
    await producer.send("raw.coalesce", b"binance:1", batch("c1", 0, 1))
    # The window's end sends them, without a close: two records reach the broker.
    first = await asyncio.to_thread(_read_all, broker.bootstrap, ["raw.coalesce"], 2, timeout=20)
    assert len(first["raw.coalesce"]) == 2
    await producer.send("raw.coalesce", b"binance:0", batch("c0", 6, 1))
    await asyncio.wait_for(producer.close(), timeout=30)
    values = _read_all(broker.bootstrap, ["raw.coalesce"], 3, timeout=20)["raw.coalesce"]
    found = [decode_batch(value) for value in values]
    by_connection = sorted(([f.sequence for f in b.frames], b.connection_id) for b in found)
    assert by_connection == [([0], "c1"), ([0, 1, 2, 3, 5], "c0"), ([6], "c0")]


# -- a paused broker (SIGSTOP): it keeps every connection open and answers nothing until continued ----
# librdkafka gives a produce attempt socket.timeout.ms (at most 5 minutes) and then sends it again, and
# the woken broker writes both copies. These tests shrink that to seconds.


async def _produce_steadily(writer: TopicWriter, topic: str, until: asyncio.Event, sent: list[bytes]) -> None:
    n = 0
    while not until.is_set():
        for _ in range(20):
            value = f"m{n:06d}".encode()
            writer.send(topic, b"k", value)
            sent.append(value)
            n += 1
        await writer.commit()
        await asyncio.sleep(0.005)


async def test_market_records_in_flight_through_a_pause_past_the_request_timeout_are_written_once(
    broker: EmbeddedBroker,
) -> None:
    topic = "market.trade.test.paused"
    declare = _declarer(broker.bootstrap)
    await declare(topic)
    delivery = ConfluentDelivery(_settings(broker.bootstrap, **{"socket.timeout.ms": 6000}))
    delivery.STALL_PURGE_SECONDS = 3.0  # before the 6 s request timeout, as 240 s is before 300 s
    sent, found = await _produce_through_a_pause(broker, TopicWriter(None, declare, delivery=delivery), topic)
    assert delivery.purges >= 1 and delivery.found_in_doubt > 0  # records were in flight: in doubt
    assert len(found) == len(sent) and found == sent  # each once, in order
    delivery.close()


async def _produce_through_a_pause(
    broker: EmbeddedBroker, writer: TopicWriter, topic: str
) -> tuple[list[bytes], list[bytes]]:
    """Records sent steadily from 1 s before a 9 s pause of the broker to 1 s after: what was sent,
    and what the topic holds once the writer has flushed."""
    sent: list[bytes] = []
    stop = asyncio.Event()
    producing = asyncio.ensure_future(_produce_steadily(writer, topic, stop, sent))
    await asyncio.sleep(1.0)
    with broker_paused(broker):
        await asyncio.sleep(9.0)  # the pause itself: past the purge and the request timeout
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(producing, timeout=60)
    await asyncio.wait_for(writer.flush(), timeout=60)
    return sent, _read_all(broker.bootstrap, [topic], len(sent) + 1, timeout=5)[topic]  # one more: none


async def test_raw_batches_through_a_pause_wait_in_the_spool_on_disk_and_go_out_once_in_order(
    broker: EmbeddedBroker,
    tmp_path: Path,
) -> None:
    _create_topic(broker.bootstrap, "raw.test")
    settings = _settings(broker.bootstrap, **{"socket.timeout.ms": 4000})
    producer = RawProducer(settings, raw_spool_limits(64 * 1024, 64 * 1024 * 1024), tmp_path)
    values = [f"r{n:06d}".encode() * 50 for n in range(3000)]  # 350 bytes each
    for value in values[:500]:
        await producer.send("raw.test", b"binance:0", value, partition=0)
    await asyncio.sleep(0.5)
    with broker_paused(broker):
        for value in values[500:2500]:  # while the broker answers nothing: 700 KB, past memory
            await producer.send("raw.test", b"binance:0", value, partition=0)
            await asyncio.sleep(0.002)
        await asyncio.sleep(6.0)  # past the request timeout: the request in flight is sent again
        usage = producer.spool.usage()["raw.test"]
        assert usage.disk_bytes > 0 and usage.held_bytes > 600_000
        assert files_in(tmp_path)  # spilled to the worker's directory
    for value in values[2500:]:
        await producer.send("raw.test", b"binance:0", value, partition=0)
    await asyncio.wait_for(producer.close(), timeout=60)
    found = _read_all(broker.bootstrap, ["raw.test"], len(values) + 1, timeout=5)["raw.test"]
    assert found == values  # none lost, none twice, in order
    assert producer.spool.usage()["raw.test"].dropped_batches == 0
    assert files_in(tmp_path) == []


async def test_a_full_raw_spool_drops_the_newest_batches_counts_them_and_logs_once(
    broker: EmbeddedBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _create_topic(broker.bootstrap, "raw.full")
    producer = RawProducer(_settings(broker.bootstrap), SpoolLimits(200_000, 0, 50_000, resume_fraction=0.5))
    values = [f"f{n:06d}".encode() * 1000 for n in range(100)]  # 7 KB each
    with broker_paused(broker):
        for value in values:
            await producer.send("raw.full", b"binance:0", value, partition=0)
        usage = producer.spool.usage()["raw.full"]
        kept = 100 - usage.dropped_batches
        assert 0 < kept < 100 and usage.dropped_bytes == 7000 * usage.dropped_batches
        assert producer.spool.dropping
        producer.report()
        exposition = metrics.exposition().decode()
    assert f'collector_spool_dropped_batches_total{{exchange="full"}} {usage.dropped_batches}.0' in exposition
    await asyncio.wait_for(producer.close(), timeout=60)
    found = _read_all(broker.bootstrap, ["raw.full"], kept, timeout=20)["raw.full"]
    assert found == values[:kept]  # the oldest kept, in order; the newest dropped
    full = [r for r in caplog.records if "raw spool full" in r.getMessage()]
    assert len(full) == 1


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def test_closing_while_the_broker_is_paused_gives_up_after_the_wait_and_says_what_was_lost(
    broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _create_topic(broker.bootstrap, "raw.stop")
    producer = RawProducer(_settings(broker.bootstrap), raw_spool_limits(1 << 20, 1 << 20), tmp_path)
    with broker_paused(broker):
        for n in range(200):
            await producer.send("raw.stop", b"binance:0", f"{n:05d}".encode() * 2000, partition=0)
        assert files_in(tmp_path)  # past memory: on disk
        await asyncio.wait_for(producer.close(seconds=1.0), timeout=15)
    [lost] = [r.getMessage() for r in caplog.records if "not delivered at stop" in r.getMessage()]
    assert lost.startswith("200 raw batches (2000000 bytes) not delivered at stop")
    assert producer.spool.held_bytes == 0 and files_in(tmp_path) == []


async def test_after_the_broker_restarted_empty_a_wedged_raw_producer_is_replaced_and_delivers() -> None:
    # The restarted embedded broker no longer knows the idempotent producer's id, and librdkafka
    # retries forever: the raw producer sees the broker answer metadata but acknowledge nothing.
    broker = EmbeddedBroker().start()
    port = broker.port
    _create_topic(broker.bootstrap, "raw.restart")
    settings = _settings(broker.bootstrap, **{"reconnect.backoff.max.ms": 200, "log_level": 0})
    producer = RawProducer(settings, raw_spool_limits(1 << 20, 0))
    producer.WEDGE_SUSPECT_MS, producer.WEDGE_CONFIRM_MS, producer.PROBE_EVERY_MS = 4000, 2000, 500
    await producer.send("raw.restart", b"k", b"before", partition=0)
    await asyncio.sleep(1.0)
    broker.stop()
    values = [f"v{n}".encode() for n in range(50)]
    for value in values[:25]:  # while no broker runs
        await producer.send("raw.restart", b"k", value, partition=0)
    revived = EmbeddedBroker(port=port).start()
    try:
        _create_topic(revived.bootstrap, "raw.restart")
        for value in values[25:]:
            await producer.send("raw.restart", b"k", value, partition=0)
        await asyncio.wait_for(producer.close(seconds=40), timeout=60)
        assert producer.renewals >= 1
        found = _read_all(revived.bootstrap, ["raw.restart"], len(values) + 1, timeout=5)["raw.restart"]
        assert found == values  # the revived broker is empty: everything sent since, in order
    finally:
        revived.stop()


async def test_a_hand_over_serves_the_reports_that_came_in_since_the_last(
    shared_broker: EmbeddedBroker,
) -> None:
    # The timer polls once and then not for an hour: only later hand-overs can serve the first
    # record's report. Before, a 2 ms poll woke a quiet worker 500 times a second.
    broker = shared_broker
    topic = "market.trade.test.served"
    await _declarer(broker.bootstrap)(topic)
    delivery = ConfluentDelivery(_settings(broker.bootstrap))
    delivery.REPORT_INTERVAL = 3600.0
    first = asyncio.ensure_future(await delivery.hand_over([(topic, b"k", b"first")]))
    handed_over = 1
    deadline = time.monotonic() + 20
    while not first.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the broker acknowledges meanwhile; nothing polls
        await delivery.hand_over([(topic, b"k", b"next")])
        handed_over += 1
    assert first.done(), "no hand-over served the first record's report"
    failed, error, acknowledged_at = first.result()
    assert failed == [] and error is None and set(acknowledged_at) == {topic}
    delivery.close()
    found = _read_all(broker.bootstrap, [topic], handed_over, timeout=10)
    assert found[topic][0] == b"first" and len(found[topic]) == handed_over


async def test_a_quiet_writer_looks_for_reports_only_when_they_can_be_there(
    shared_broker: EmbeddedBroker,
) -> None:
    # Hand-overs every 40 ms (a quiet feed whose symbols all trade in the same tick) at the default
    # 25 ms linger, so some hand-over is always open. Polling every 10 ms while any was open looked
    # ~4 times per hand-over (118 polls here), mostly before any report could exist. The timer now looks
    # for the oldest open hand-over once its linger (+3 ms) has passed, then every 10 ms while it stays
    # open: never sooner, however slow the broker (a count of polls would depend on its speed).
    broker = shared_broker
    topics = [f"market.trade.test.quiet{n}" for n in range(5)]
    for topic in topics:
        await _declarer(broker.bootstrap)(topic)
    delivery = ConfluentDelivery(confluent_settings([broker.bootstrap], linger_ms=25, compression="lz4"))
    serve = delivery._serve_reports
    handing_over = False
    timer_looks: list[float] = []  # per look by the timer: how long the oldest open one had been open

    def counted() -> None:
        if not handing_over and delivery._open:
            timer_looks.append(time.monotonic() - next(iter(delivery._open.values())))
        serve()

    delivery._serve_reports = counted  # type: ignore[method-assign]
    outcomes = []
    for tick in range(30):
        records = [(topic, b"k", f"{tick}".encode()) for topic in topics]
        handing_over = True
        outcomes.append(asyncio.ensure_future(await delivery.hand_over(records)))
        handing_over = False
        await asyncio.sleep(0.04)
    done, _ = await asyncio.wait(outcomes, timeout=20)
    assert len(done) == len(outcomes) and all(o.result()[:2] == ([], None) for o in outcomes)
    assert timer_looks, "the timer never looked: reports were served only by hand-overs"
    early = [round(age * 1000, 1) for age in timer_looks if age < delivery._first_report_after]
    assert not early, f"{len(early)} of {len(timer_looks)} looks came before a report could: {early} ms"
    delivery.close()
