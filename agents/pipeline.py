"""The data path of one worker: exchange sources → `raw.<exchange>` → normalize agents → market topics.

`Pipeline` holds what the path shares (raw topics, the raw producer, the sources, the normalizers);
`install_pipeline` registers its service, the normalize agents and the rebalance handler on the app.
The composition root (agents/worker.py) builds it only on workers that collect. On a worker that runs
its own embedded broker, the raw batches reach the normalizer in-process instead of through the
raw topic (agents/handoff.py says why); they are still written to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, cast

import faust
from mode import Service

from agents.adapters import AdapterDirectory
from agents.aiokafka_delivery import AiokafkaDelivery
from agents.connection import SendRaw
from agents.declare import TopicDeclarer
from agents.handoff import RawHandoff, normalize_handed_over
from agents.lastseen import RECENT_TRADES, read_seeds
from agents.metrics import now_ms
from agents.normalize import Normalizer, RawInput
from agents.ownership import GroupOwnership
from agents.source import ExchangeSource
from agents.writer import (
    RAW_LINGER_MS,
    RAW_SIDE_OUTPUT_COALESCE,
    RAW_SIDE_OUTPUT_LINGER_MS,
    BatchDelivery,
    ConfluentDelivery,
    RawProducer,
    TopicWriter,
    confluent_settings,
)
from streams.app import RAW_PARTITIONS
from streams.config import CollectorConfig
from streams.continuity import FetchRequest, Seed
from streams.events import CollectorEvent
from streams.topics import raw_topic
from tables.subscription_rules import group_partition

log = logging.getLogger(__name__)

MARKET_PARTITIONS = 1  # one partition per market topic keeps each symbol's records in order
# Raw records (each a batch of frames) handled per normalize step. One step runs without yielding to
# the WebSocket readers: 256 stalled them long enough for the exchange to drop slow connections. A
# step no longer waits for the broker (agents/writer.py), so a short take window costs little.
TAKE_MAX = 64
TAKE_WITHIN = 0.002
STOP_FLUSH_SECONDS = 10.0
TICK_INTERVAL = 0.25  # seconds between the continuity engines' clock ticks

EmitEvent = Callable[[CollectorEvent], Awaitable[None]]


class Pipeline:
    """What the sources and normalize agents of one worker share."""

    def __init__(
        self,
        app: faust.App,
        config: CollectorConfig,
        adapters: AdapterDirectory,
        emit_event: EmitEvent,
        ownership: GroupOwnership,
        frames_heard: dict[str, Callable[[], dict[str, int]]],
        bootstrap_servers: list[str],
        in_process: bool = False,
    ) -> None:
        self.app = app
        self.config = config
        self.bootstrap_servers = bootstrap_servers
        # exchange → the in-process handoff, on a worker that runs its own embedded broker
        self.handoffs = {name: RawHandoff(name) for name in config.exchanges} if in_process else {}
        self.adapters = adapters
        self.emit_event = emit_event
        self.ownership = ownership
        self.frames_heard = frames_heard  # filled with each source's; the state agents report them
        self.raw_topics = {
            # internal: Faust creates it with RAW_PARTITIONS before subscribing; a topic the broker
            # created on first use would get the broker's default partition count.
            name: app.topic(
                raw_topic(name),
                partitions=RAW_PARTITIONS,
                key_serializer="raw",
                value_serializer="raw",
                internal=True,
            )
            for name in config.exchanges
        }
        self.sources: dict[str, ExchangeSource] = {}
        self.normalizers: dict[str, Normalizer] = {}
        self.raw_producer: RawProducer | None = None  # made when the sources start, with librdkafka's threads
        self.declarer = TopicDeclarer(
            ",".join(self.bootstrap_servers), MARKET_PARTITIONS, app.conf.topic_replication_factor
        )

    def confluent_settings(self) -> dict[str, Any]:
        producer = self.config.kafka.producer
        return confluent_settings(self.bootstrap_servers, producer.lingerMs, producer.compression)

    @property
    def raw_linger_ms(self) -> int:
        """How long the raw producer lingers: long where the raw topic is only a side output."""
        return RAW_SIDE_OUTPUT_LINGER_MS if self.handoffs else RAW_LINGER_MS

    def raw_sender(self, exchange: str) -> SendRaw:
        name = raw_topic(exchange)

        async def send_raw(group: str, value: bytes) -> None:
            # Partition = connection group: a group's WebSocket and REST input stays in order on one
            # partition, the one the worker running the group also normalizes (streams/app.py).
            assert self.raw_producer is not None
            await self.raw_producer.send(name, group.encode(), value, group_partition(group))
            if handoff is not None:
                handoff.put(group, value)

        handoff = self.handoffs.get(exchange)
        return send_raw

    def seed_reader(self, exchange: str) -> Callable[[Collection[str]], Awaitable[dict[str, Seed]]]:
        async def read(symbols: Collection[str]) -> dict[str, Seed]:
            adapter = await self.adapters.get(exchange)
            if adapter.trade_ids == "none":
                return {}
            unique = adapter.trade_ids == "unique"
            position = getattr(adapter, "trade_position", None) if unique else None
            recent = RECENT_TRADES if unique else 1
            return await read_seeds(self.bootstrap_servers, exchange, symbols, recent, position)

        return read

    # The continuity engine and the source meet here, on the worker that runs the group and
    # normalizes its raw partition (they are assigned together: streams/app.py).

    def fetch_history(self, exchange: str) -> Callable[[FetchRequest], None]:
        def fetch(command: FetchRequest) -> None:
            source = self.sources.get(exchange)
            if source is not None:
                source.fetch_history(command)

        return fetch

    def book_wanted(self, exchange: str) -> Callable[[str], bool]:
        """Whether this worker's source carries the symbol's depth stream: only then is a book kept."""

        def wanted(symbol: str) -> bool:
            source = self.sources.get(exchange)
            return source is not None and source.carries_depth(symbol)

        return wanted

    def stream_changed(self, exchange: str) -> Callable[[str, list[str], bool], None]:
        def changed(group: str, symbols: list[str], down: bool) -> None:
            normalizer = self.normalizers.get(exchange)
            if normalizer is not None:
                (normalizer.stream_down if down else normalizer.stream_up)(group, symbols, now_ms())

        return changed

    def history_refused(self, exchange: str) -> Callable[[str, str, int], None]:
        def refused(symbol: str, request_id: str, retry_after_ms: int) -> None:
            normalizer = self.normalizers.get(exchange)
            if normalizer is not None:
                normalizer.refused(symbol, request_id, retry_after_ms, now_ms())

        return refused

    async def declare_topic(self, name: str) -> None:
        await self.declarer.declare(name)

    def market_delivery(self) -> BatchDelivery:
        producer = self.config.kafka.producer
        if producer.client == "aiokafka":
            # A window's records, one batch per partition and one request for all partitions: the
            # embedded broker pays per request (docs/benchmarks.md, "The market producer alone").
            return AiokafkaDelivery(self.bootstrap_servers, producer.lingerMs, producer.compression)
        # librdkafka: 5 requests in flight. One left records queueing behind the embedded broker's
        # slow many-partition requests; unbounded, the requests swamped it (docs/benchmarks.md).
        return ConfluentDelivery({**self.confluent_settings(), "max.in.flight.requests.per.connection": 5})

    async def start_sources(self, service: Service) -> None:
        self.raw_producer = RawProducer.from_config(
            self.confluent_settings(), self.config.kafka.spool, self.app.conf.datadir, self.raw_linger_ms,
            RAW_SIDE_OUTPUT_COALESCE if self.handoffs else 0.0,
        )  # fmt: skip
        for exchange, settings in self.config.exchanges.items():
            await self.raw_topics[exchange].maybe_declare()
            source = ExchangeSource(
                exchange, settings, functools.partial(self.adapters.get, exchange), self.raw_sender(exchange),
                self.emit_event, self.stream_changed(exchange), self.history_refused(exchange),
                loop=service.loop,
            )  # fmt: skip
            self.sources[exchange] = source
            self.frames_heard[exchange] = source.frames_heard
            await service.add_runtime_dependency(source)
            self.ownership.attach(exchange, source)  # runs the groups whose partitions we own

    async def close_raw_producer(self) -> None:
        if self.raw_producer is not None:
            await self.raw_producer.close()

    async def _normalizer(self, exchange: str) -> Normalizer:
        adapter = await self.adapters.get(exchange)
        normalizer = Normalizer(
            adapter, TopicWriter(None, self.declare_topic, delivery=self.market_delivery()),
            self.config.validation.clockSkewSeconds, self.seed_reader(exchange), self.fetch_history(exchange),
            book_wanted=self.book_wanted(exchange),
        )  # fmt: skip
        self.normalizers[exchange] = normalizer
        return normalizer

    async def normalize_in_process(self, exchange: str) -> None:
        normalizer = await self._normalizer(exchange)
        try:
            await normalize_handed_over(self.handoffs[exchange], normalizer)
        finally:
            self.normalizers.pop(exchange, None)
            await _flush_on_stop(normalizer)

    async def normalize(self, exchange: str, stream_of_raw: faust.StreamT[bytes]) -> None:
        stream = cast(faust.Stream[bytes], stream_of_raw)  # the protocol lacks take_events
        normalizer = await self._normalizer(exchange)
        try:
            async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
                # take_events acks its events when this body returns; the extra reference keeps each
                # offset uncommitted until everything its raw record produced is safe with the broker.
                inputs = []
                for event in events:
                    message = event.message
                    message.incref()
                    group = f"{exchange}:{message.partition}"
                    inputs.append(RawInput(event.value, group, self._acker(message)))
                try:
                    await normalizer.handle(inputs, _nothing)
                except Exception:  # a bug must not leave these records open: Faust would wait on them
                    log.exception("normalize.%s: a step failed; its raw records are skipped", exchange)
                    for item in inputs:
                        if item.settle is not None:
                            item.settle()
        finally:
            self.normalizers.pop(exchange, None)
            await _flush_on_stop(normalizer)

    def _acker(self, message: Any) -> Callable[[], None]:
        def ack() -> None:
            message.ack(self.app.consumer)

        return ack

    async def seed(self) -> None:
        """Read where every engine continues before the new assignment's raw records flow: seeded
        inside a normalize step, the records taken would stay open while the market topics are read,
        and a rebalance waits for every open record."""
        for normalizer in list(self.normalizers.values()):
            try:
                await normalizer.seed()
            except Exception:  # the broker boundary: the next step seeds it then
                log.exception("normalize.%s: reading where to continue failed", normalizer.exchange)

    async def tick(self) -> None:
        now = now_ms()
        for normalizer in list(self.normalizers.values()):
            await normalizer.tick(now)

    def forget(self) -> None:
        # Another worker may publish these partitions' trades now: what the engines hold is dropped
        # (its raw records are read again by whoever owns them) and the market topics read again.
        # Normalizing in-process, nothing moves with the partitions (the groups' trades are normalized
        # where their connections run) and nothing would be read again: the engines keep everything.
        if self.handoffs:
            return
        for normalizer in self.normalizers.values():
            normalizer.forget()


def _nothing() -> None:
    """A step's acknowledgement needs no action of its own: each raw record settles itself."""


async def _flush_on_stop(normalizer: Normalizer) -> None:
    """A stopping agent still delivers (and so acks) what it handed over: the worker's last commit
    then covers it, and a restart does not normalize those raw records again."""
    try:
        await asyncio.wait_for(asyncio.shield(normalizer.writer.flush()), STOP_FLUSH_SECONDS)
    except Exception:  # the I/O boundary of a stopping agent: what is not acknowledged is redone
        log.exception("normalize.%s: records still unacknowledged at stop", normalizer.exchange)
    try:
        await normalizer.writer.close()
    except Exception:  # the I/O boundary of a stopping agent
        log.exception("normalize.%s: the market producer did not close", normalizer.exchange)


class SourceService(Service):
    """Starts one ExchangeSource per configured exchange when the worker is ready."""

    def __init__(self, pipeline: Pipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    async def on_start(self) -> None:
        await self.pipeline.start_sources(self)
        for exchange in self.pipeline.handoffs:
            self.add_future(self.pipeline.normalize_in_process(exchange))

    async def on_shutdown(self) -> None:  # after the sources stopped and flushed their batches
        await self.pipeline.close_raw_producer()


def install_pipeline(app: faust.App, pipeline: Pipeline) -> None:
    """The source service, one normalize agent per exchange and the rebalance handler."""
    app.service(SourceService(pipeline))  # type: ignore[arg-type]  # an instance: Faust starts it as is
    for exchange, topic in pipeline.raw_topics.items():
        if exchange in pipeline.handoffs:
            continue  # normalized in-process: nothing reads the raw topic back

        async def normalize(stream: faust.StreamT[bytes], exchange: str = exchange) -> None:
            await pipeline.normalize(exchange, stream)

        name = f"normalize_{exchange.replace('-', '_')}"
        normalize.__name__ = normalize.__qualname__ = name
        app.agent(topic, name=f"normalize.{exchange}")(normalize)

    async def forget(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        pipeline.forget()

    async def seed(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await pipeline.seed()

    async def tick() -> None:
        await pipeline.tick()

    app.on_partitions_revoked.connect(forget)
    app.on_partitions_assigned.connect(seed)
    app.timer(TICK_INTERVAL, name="normalize.tick")(tick)
