"""Wires the data flow into the Faust app: source services and normalize agents per exchange."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from mode import Service

from agents import metrics, state
from agents.normalize import Normalizer
from agents.source import WebSocketConnection, fetch_instruments, now_ms
from agents.writer import TopicWriter
from streams.app import RAW_PARTITIONS, app, config
from streams.config import ExchangeConfig
from streams.events import CollectorEvent, encode_event
from streams.exchanges import adapter_class
from streams.exchanges.base import ExchangeAdapter
from streams.plan import plan_connections
from streams.topics import EVENTS, raw_topic

log = logging.getLogger(__name__)

MARKET_PARTITIONS = 1  # one partition per market topic keeps each symbol's records in order
TAKE_MAX = 64  # raw records (each a batch of frames) handled per normalize step
TAKE_WITHIN = 0.01


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
        wanted = set(settings.symbols)
        instruments = [i for i in listed if i.symbol in wanted]
        missing = wanted - {i.symbol for i in instruments}
        if missing:
            log.error("%s does not list %s; they are skipped", exchange, ", ".join(sorted(missing)))
            await emit_event(
                CollectorEvent(type="unknown-symbols", exchange=exchange, time=now_ms(),
                               detail={"symbols": sorted(missing)})
            )  # fmt: skip
        return adapter_type(instruments)


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


def _log_failed_delivery(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("raw batch not delivered: %r", future.exception())


class ExchangeSource(Service):
    """Runs the WebSocket connections of one exchange."""

    def __init__(self, exchange: str, settings: ExchangeConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exchange = exchange
        self.settings = settings
        self.connections: list[WebSocketConnection] = []
        self._raw_name = raw_topic(exchange)

    async def _send_raw(self, connection_id: str, value: bytes) -> None:
        delivery = await produce(self._raw_name, connection_id.encode(), value)
        delivery.add_done_callback(_log_failed_delivery)

    async def on_start(self) -> None:
        await raw_topics[self.exchange].maybe_declare()
        await events_topic.maybe_declare()
        self.add_future(self._run())

    async def _run(self) -> None:
        adapter = await directory.get(self.exchange)
        plans = plan_connections(
            adapter,
            list(adapter.instruments.values()),
            self.settings.data_types,
            max_connections=self.settings.connections.max,
            streams_per_connection=self.settings.connections.streamsPerConnection,
        )
        for plan in plans:
            connection = WebSocketConnection(
                adapter, plan, self.settings.wsEndpoint, self._send_raw, emit_event
            )
            self.connections.append(connection)
            self.add_future(connection.run())
        log.info("%s: %d streams on %d connections", self.exchange, sum(len(p.streams) for p in plans),
                 len(plans))  # fmt: skip


@app.service
class SourceService(Service):
    """Starts one ExchangeSource per configured exchange when the worker is ready."""

    async def on_start(self) -> None:
        for exchange, settings in config.exchanges.items():
            await self.add_runtime_dependency(ExchangeSource(exchange, settings, loop=self.loop))


def _normalize_agent(exchange: str) -> None:
    async def normalize(stream: faust.StreamT[bytes]) -> None:
        adapter = await directory.get(exchange)
        normalizer = Normalizer(adapter, TopicWriter(produce, declare_topic))
        async for raw_values in stream.take(TAKE_MAX, within=TAKE_WITHIN):
            await normalizer.handle(raw_values)

    normalize.__name__ = normalize.__qualname__ = f"normalize_{exchange.replace('-', '_')}"
    app.agent(raw_topics[exchange], name=f"normalize.{exchange}")(normalize)


for _exchange in config.exchanges:
    _normalize_agent(_exchange)
