"""Wires the data flow into the Faust app: source services and normalize agents per exchange."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service

from agents import control, metrics, state
from agents.connection import SendRaw
from agents.lastseen import last_trade_ids
from agents.normalize import Normalizer
from agents.source import ExchangeSource, fetch_instruments, now_ms
from agents.writer import ConfluentDelivery, RawProducer, TopicWriter, confluent_settings
from streams.app import RAW_PARTITIONS, app, config
from streams.events import CollectorEvent, encode_event
from streams.exchanges import adapter_class
from streams.exchanges.base import ExchangeAdapter
from streams.topics import EVENTS, raw_topic

log = logging.getLogger(__name__)

MARKET_PARTITIONS = 1  # one partition per market topic keeps each symbol's records in order
# Raw records (each a batch of frames) handled per normalize step. One step runs without yielding to
# the WebSocket readers: 256 stalled them long enough for the exchange to drop slow connections. A
# step no longer waits for the broker (agents/writer.py), so a short take window costs little.
TAKE_MAX = 64
TAKE_WITHIN = 0.002
# The embedded broker holds every fetch for the full wait, so this bounds the raw hop's latency;
# each fetch also costs the broker ~0.4 ms plus ~0.05 ms per partition (docs/benchmarks.md).
FETCH_MAX_WAIT_MS = 10


def _prompt_fetches() -> None:
    """Faust asks for fetches that may wait 1.5 s for data and offers no setting for it. Kafka answers
    as soon as any data is there, but the embedded broker (Tansu) holds every fetch for the full wait,
    which put 0.5-1.5 s between a raw record's append and its normalization (docs/benchmarks.md)."""
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer

    def create_prompt(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer

    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_prompt  # type: ignore[method-assign]


_prompt_fetches()

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


_settled_seeks()


class AdapterDirectory:
    """One adapter per exchange per worker, built from the exchange's instrument list."""

    def __init__(self) -> None:
        self._adapters: dict[str, asyncio.Future[ExchangeAdapter]] = {}

    async def get(self, exchange: str) -> ExchangeAdapter:
        if exchange not in self._adapters:
            self._adapters[exchange] = asyncio.ensure_future(self._build(exchange))
        try:
            return await asyncio.shield(self._adapters[exchange])
        except Exception:
            del self._adapters[exchange]
            raise

    async def _build(self, exchange: str) -> ExchangeAdapter:
        settings = config.exchanges[exchange]
        adapter_type = adapter_class(exchange)
        listed = await fetch_instruments(adapter_type, settings.restEndpoint)
        # Every listed market, not only the configured ones: symbols can be subscribed at runtime.
        missing = set(settings.symbols) - {i.symbol for i in listed}
        if missing:
            log.error("%s does not list %s; they are skipped", exchange, ", ".join(sorted(missing)))
            await emit_event(
                CollectorEvent(type="unknown-symbols", exchange=exchange, time=now_ms(),
                               detail={"symbols": sorted(missing)})
            )  # fmt: skip
        return adapter_type(listed)


directory = AdapterDirectory()
state.use_adapters(directory.get)
raw_topics = {
    name: app.topic(raw_topic(name), partitions=RAW_PARTITIONS, key_serializer="raw", value_serializer="raw")
    for name in config.exchanges
}
events_topic = app.topic(EVENTS, partitions=1, key_serializer="raw", value_serializer="raw")


async def declare_topic(name: str, partitions: int = MARKET_PARTITIONS) -> None:
    await app.topic(name, partitions=partitions).maybe_declare()


async def produce(topic: str, key: bytes, value: bytes) -> Any:
    return await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)


async def emit_event(event: CollectorEvent) -> None:
    metrics.event_emitted(event)
    await produce(EVENTS, event.exchange.encode(), encode_event(event))


control.use(directory.get, emit_event)
sources: dict[str, ExchangeSource] = {}  # this worker's sources; ownership assigns their groups


def _confluent_settings() -> dict[str, Any]:
    producer = config.kafka.producer
    return confluent_settings(config.kafka.bootstrap_servers, producer.lingerMs, producer.compression)


raw_producer: RawProducer | None = None  # made when the sources start: librdkafka threads start with it


def _raw_sender(exchange: str) -> SendRaw:
    name = raw_topic(exchange)

    async def send_raw(key: str, value: bytes) -> None:
        # Keyed by connection group: a group's WebSocket and REST input stays in order on one partition.
        assert raw_producer is not None
        await raw_producer.send(name, key.encode(), value)

    return send_raw


def _last_trade_ids(exchange: str) -> Callable[[Collection[str]], Awaitable[dict[str, int]]]:
    async def read(symbols: Collection[str]) -> dict[str, int]:
        adapter = await directory.get(exchange)
        position = getattr(adapter, "trade_position", None)  # where ids are unique but unordered
        return await last_trade_ids(config.kafka.bootstrap_servers, exchange, symbols, position)

    return read


@app.service
class SourceService(Service):
    """Starts one ExchangeSource per configured exchange when the worker is ready."""

    async def on_start(self) -> None:
        global raw_producer
        raw_producer = RawProducer(_confluent_settings())
        await events_topic.maybe_declare()
        for exchange, settings in config.exchanges.items():
            await raw_topics[exchange].maybe_declare()
            source = ExchangeSource(
                exchange, settings, functools.partial(directory.get, exchange), _raw_sender(exchange),
                emit_event, _last_trade_ids(exchange), loop=self.loop,
            )  # fmt: skip
            sources[exchange] = source
            state.frames_heard[exchange] = source.frames_heard
            await self.add_runtime_dependency(source)
            control.ownership.attach(exchange, source)  # runs the groups whose partitions we own

    async def on_shutdown(self) -> None:  # after the sources stopped and flushed their batches
        if raw_producer is not None:
            await raw_producer.close()


def _market_delivery() -> ConfluentDelivery:
    # Market records go through librdkafka: a batch costs ~1 us per record to hand over instead of
    # an awaited aiokafka send per record. One request in flight left them queueing behind the
    # embedded broker's slow many-partition requests; unbounded, the requests swamped it
    # (docs/benchmarks.md).
    return ConfluentDelivery({**_confluent_settings(), "max.in.flight.requests.per.connection": 5})


def _normalize_agent(exchange: str) -> None:
    async def normalize(stream_of_raw: faust.StreamT[bytes]) -> None:
        stream = cast(faust.Stream[bytes], stream_of_raw)  # the protocol lacks take_events
        adapter = await directory.get(exchange)
        normalizer = Normalizer(
            adapter, TopicWriter(None, declare_topic, delivery=_market_delivery()),
            config.validation.clockSkewSeconds,
            _last_trade_ids(exchange),
        )  # fmt: skip
        normalizers.append(normalizer)
        try:
            async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
                # take_events acks its events when this body returns; the extra reference keeps their
                # offsets uncommitted until the broker has acknowledged what they produced.
                messages = [event.message for event in events]
                for message in messages:
                    message.incref()
                await normalizer.handle([event.value for event in events], _acker(messages))
        finally:
            await _flush_on_stop(normalizer)

    normalize.__name__ = normalize.__qualname__ = f"normalize_{exchange.replace('-', '_')}"
    app.agent(raw_topics[exchange], name=f"normalize.{exchange}")(normalize)


normalizers: list[Normalizer] = []
STOP_FLUSH_SECONDS = 10.0


def _acker(messages: list[Any]) -> Callable[[], None]:
    def ack() -> None:
        consumer = app.consumer
        for message in messages:
            message.ack(consumer)

    return ack


async def _flush_on_stop(normalizer: Normalizer) -> None:
    """A stopping agent still delivers (and so acks) what it handed over: the worker's last commit
    then covers it, and a restart does not normalize those raw records again."""
    try:
        await asyncio.wait_for(asyncio.shield(normalizer.writer.flush()), STOP_FLUSH_SECONDS)
    except Exception:  # the I/O boundary of a stopping agent: what is not acknowledged is redone
        log.exception("normalize.%s: records still unacknowledged at stop", normalizer.exchange)


@app.on_partitions_revoked.connect
async def _forget_published(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    # Another worker may publish these partitions' trades now: reread the market topics' ends later.
    for normalizer in normalizers:
        normalizer.published.forget()


for _exchange in config.exchanges:
    _normalize_agent(_exchange)

# composition: distribution (the integrator moves this into the composition root)
from agents.distribution import install_distribution  # noqa: E402

distribution = install_distribution(app, config)
