"""Live distribution: `/ws/exchange` clients served from the market topics, on every worker.

One `MarketFeed` per worker reads the market topics its clients' filters need, itself: a consumer
with no group and a manual assignment, so Kafka's rebalances between workers never move or replay
what a client gets. It refreshes the topic list every second while clients are connected, starts a
topic a client newly needs at its end and a topic created since the last refresh at its beginning,
and fetches nothing when no client is connected (the embedded broker pays for every fetch).

The `Hub` hands each record to the clients whose filter matches its topic. The record's Kafka value
is already the JSON text a client gets: it is framed once (`text_frame`) and the same bytes are
written to every client, straight onto its socket's transport, whose write buffer is the client's
bounded buffer. A client still holding unsent data when more would take it past
`distribution.maxBufferBytes` is closed with 1008 `too slow`; nothing ever waits for a client, so a
slow one delays neither the others nor collection.
Control replies (`subscribed`, `error`) go through the same buffer, so a client sees `subscribed`
exactly where its new filter starts: every matching record appended after it follows it, once, in
per-partition (so per-symbol) order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faust
from aiohttp import WSMsgType, web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust import web as faust_web
from mode import Service

from agents import metrics
from agents.consumer_stop import stop_consumer
from streams.config import CollectorConfig
from streams.distribution import (
    MAX_MESSAGE_BYTES,
    Filter,
    FilterError,
    RateMeter,
    TopicKey,
    apply_change,
    error_message,
    is_text,
    parse_client_message,
    parse_market_topic,
    parse_query,
    subscribed_message,
    text_frame,
)
from streams.exchanges import adapters

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parents[1] / "tables" / "static"
WS_PATH = "/ws/exchange"
METADATA_INTERVAL = 1.0  # seconds between topic-list refreshes while clients are connected
FETCH_TIMEOUT_MS = 50  # a getmany returns after this with nothing, so filter changes wait at most this
MAX_RECORDS = 5_000  # records per dispatch round: what one round may add to a client's buffer
HEALTH_TIMEOUT = 3.0  # seconds a Kafka or Redis reachability check may take
RETRY_SECONDS = 2.0
CLOSE_TOO_SLOW = 1008
CLOSE_GOING_AWAY = 1001
STOP_CLOSE_SECONDS = 5.0


class Transport(Protocol):
    """What a client's bytes go to: an asyncio transport (its write buffer is the client's buffer)."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...


class RedisState(Protocol):
    """What the Redis sink can tell the distribution: where clients find it, and whether it answers."""

    @property
    def public_url(self) -> str: ...

    async def reachable(self) -> tuple[bool, str]: ...


class Client:
    """One `/ws/exchange` connection: its filter and the frames queued for it in this round."""

    def __init__(
        self, client_id: int, transport: Transport, max_buffer_bytes: int, close: Callable[[int, str], None]
    ) -> None:
        self.id = client_id
        self.transport = transport
        self.max_buffer_bytes = max_buffer_bytes
        self.filter: Filter | None = None  # None until its first filter took effect
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.sent = 0  # data messages written
        self.dropped: str | None = None  # why the server closed it
        self._close = close

    def queue(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.pending_bytes += len(frame)

    def flush(self) -> int:
        """Write what is queued; returns the messages written. A client whose buffer would overflow
        is dropped instead (closed with 1008 `too slow`) and gets nothing more."""
        if not self.pending or self.dropped is not None:
            self.pending, self.pending_bytes = [], 0
            return 0
        frames, size = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        if self.transport.is_closing():
            return 0
        # A client that has read everything always takes the round, however large (a catch-up after a
        # pause); one still holding unsent data may hold at most its buffer's worth.
        buffered = self.transport.get_write_buffer_size()
        if buffered and buffered + size > self.max_buffer_bytes:
            self.drop("too-slow", CLOSE_TOO_SLOW, "too slow")
            return 0
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        return len(frames)

    def drop(self, reason: str, code: int, message: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            self._close(code, message)


class Hub:
    """Routes each market topic's records to the clients whose filter matches it. Never awaits."""

    def __init__(self, rate: RateMeter | None = None) -> None:
        self.clients: dict[int, Client] = {}
        self.rate = rate or RateMeter()
        self.dropped = 0  # clients the server closed (too slow)
        self._keys: dict[str, TopicKey] = {}  # known market topics
        self._routes: dict[str, list[Client]] = {}  # topic → clients that want it

    # -- clients --------------------------------------------------------------------------------------

    def connect(self, client: Client) -> None:
        self.clients[client.id] = client
        metrics.WS_CLIENTS.set(len(self.clients))

    def disconnect(self, client: Client, reason: str) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        self._route(client, None)
        metrics.WS_CLIENTS.set(len(self.clients))
        metrics.WS_DISCONNECTS.labels(reason).inc()

    def set_filter(self, client: Client, new: Filter) -> None:
        """The client's filter from now on; the `subscribed` reply is queued before anything it matches."""
        if client.id not in self.clients:
            return
        client.filter = new
        self._route(client, new)
        client.queue(text_frame(subscribed_message(new)))
        self._flush(client)

    def reply(self, client: Client, payload: bytes) -> None:
        client.queue(text_frame(payload))
        self._flush(client)

    def _flush(self, client: Client) -> int:
        connected = client.dropped is None
        written = client.flush()
        if connected and client.dropped is not None:
            self.dropped += 1
        return written

    def _route(self, client: Client, new: Filter | None) -> None:
        for topic, key in self._keys.items():
            routed = self._routes[topic]
            wanted = new is not None and new.matches(key)
            if wanted and client not in routed:
                routed.append(client)
            elif not wanted and client in routed:
                routed.remove(client)

    # -- topics ---------------------------------------------------------------------------------------

    def learn(self, topics: Iterable[str]) -> None:
        """Market topics that exist; each is routed to the clients already connected that want it."""
        for topic in topics:
            if topic in self._keys:
                continue
            key = parse_market_topic(topic)
            if key is None:
                continue
            self._keys[topic] = key
            self._routes[topic] = [
                c for c in self.clients.values() if c.filter is not None and c.filter.matches(key)
            ]

    def known(self) -> set[str]:
        return set(self._keys)

    def needed(self, extra: Iterable[Filter] = ()) -> set[str]:
        """Known topics some client's filter (or one of `extra`, filters about to take effect) matches."""
        filters = list(extra)
        return {
            topic
            for topic, key in self._keys.items()
            if self._routes[topic] or any(f.matches(key) for f in filters)
        }

    # -- records --------------------------------------------------------------------------------------

    def dispatch(self, batches: Mapping[str, Sequence[bytes]]) -> int:
        """Queue each topic's record values to its clients, framed once, then write each client once."""
        touched: dict[int, Client] = {}
        for topic, values in batches.items():
            routed = self._routes.get(topic)
            if not routed:
                continue
            frames = [text_frame(value) for value in values]
            size = sum(map(len, frames))
            for client in routed:
                client.pending.extend(frames)
                client.pending_bytes += size
                touched[client.id] = client
        sent = 0
        for client in touched.values():
            written = self._flush(client)
            client.sent += written
            sent += written
        if sent:
            metrics.WS_MESSAGES_SENT.inc(sent)
            self.rate.add(sent)
        return sent


@dataclass
class _Change:
    client: Client
    filter: Filter
    done: asyncio.Future[None]


@dataclass
class FeedState:
    """Where the feed stands, for the health view and tests."""

    assigned: set[str] = field(default_factory=set)
    last_error: str | None = None


class MarketFeed:
    """The worker's one consumer of the market topics its clients need (see the module's doc)."""

    def __init__(self, bootstrap_servers: list[str], hub: Hub, fetch_max_wait_ms: int) -> None:
        self.hub = hub
        self.state = FeedState()
        self._bootstrap = bootstrap_servers
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._changes: list[_Change] = []
        self._wake = asyncio.Event()
        self._positions: dict[TopicPartition, int] = {}  # next offset to hand out, per assigned partition
        self._partitions: dict[str, list[int]] = {}
        self._last_refresh: float | None = None  # None: refreshes lapsed (no clients)
        self._created_since_refresh: set[str] = set()

    async def change(self, client: Client, new: Filter) -> None:
        """Give the client `new` as its filter; returns once it took effect (its reply is queued)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changes.append(_Change(client, new, done))
        self._wake.set()
        await done

    def wake(self) -> None:
        self._wake.set()

    async def reachable(self) -> tuple[bool, str]:
        consumer = self._consumer
        if consumer is None:
            return False, self.state.last_error or "the distribution's consumer has not started"
        try:
            await asyncio.wait_for(consumer._client.fetch_all_metadata(), HEALTH_TIMEOUT)
        except (KafkaError, TimeoutError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return True, "metadata received"

    async def run(self) -> None:
        """Start the consumer (retrying while the broker is away) and feed the hub until cancelled."""
        while self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="latest",
                # The embedded broker holds a fetch for the full wait even when data is there, so
                # this is the latency it adds; a real Kafka answers as soon as data arrives.
                fetch_max_wait_ms=self._fetch_max_wait_ms,
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )
            try:
                await consumer.start()
            except (KafkaError, OSError) as exc:
                self.state.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("distribution: cannot reach Kafka (%s); retrying", self.state.last_error)
                await stop_consumer(consumer, "distribution")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._consumer = consumer
        try:
            while True:
                await self._round(self._consumer)
        finally:
            for change in self._changes:
                if not change.done.done():
                    change.done.cancel()
            await stop_consumer(self._consumer, "distribution")

    async def _round(self, consumer: AIOKafkaConsumer) -> None:
        if not self.hub.clients and not self._changes:
            if self.state.assigned:
                self._assign(consumer, set(), {})
            self._last_refresh = None  # the next refresh starts afresh: nothing in it is "new"
            self._wake.clear()
            await self._wake.wait()
            return
        try:
            now = time.monotonic()
            if self._last_refresh is None or now - self._last_refresh >= METADATA_INTERVAL:
                await self._refresh(consumer, now)
            await self._apply(consumer)
        except (KafkaError, OSError, TimeoutError) as exc:
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("distribution: %s; retrying", self.state.last_error)
            await asyncio.sleep(RETRY_SECONDS)
            return
        if not self.state.assigned:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), METADATA_INTERVAL)
            return
        try:
            batches = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=MAX_RECORDS)
        except KafkaError as exc:  # the broker boundary: positions are ours, so the next round resumes
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("distribution: fetching failed (%s); retrying", self.state.last_error)
            await asyncio.sleep(RETRY_SECONDS)
            return
        self._dispatch(batches)

    async def _refresh(self, consumer: AIOKafkaConsumer, now: float) -> None:
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), HEALTH_TIMEOUT * 2)
        market = {t for t in cluster.topics() if parse_market_topic(t) is not None}
        fresh = market - self.hub.known()
        for topic in fresh:
            self._partitions[topic] = sorted(cluster.partitions_for_topic(topic) or ())
        # A topic that appeared since the last refresh was created after every filter now in effect
        # took effect: all its records are for them, so it starts at its beginning. After a lapse
        # (no clients), topics seen now existed before the filters about to take effect: their end.
        if self._last_refresh is not None:
            self._created_since_refresh |= fresh
        self.hub.learn(fresh)
        self._last_refresh = now
        self.state.last_error = None

    async def _apply(self, consumer: AIOKafkaConsumer) -> None:
        changes, self._changes = self._changes, []
        live = [c for c in changes if c.client.id in self.hub.clients]
        needed = self.hub.needed(c.filter for c in live)
        starts: dict[TopicPartition, int] = {}
        added = needed - self.state.assigned
        if added or self.state.assigned - needed:
            new_partitions = [TopicPartition(t, p) for t in added for p in self._partitions.get(t, [0])]
            from_end = [tp for tp in new_partitions if tp.topic not in self._created_since_refresh]
            ends = await consumer.end_offsets(from_end) if from_end else {}
            for tp in new_partitions:
                starts[tp] = ends.get(tp, 0)
            self._assign(consumer, needed, starts)
        self._created_since_refresh.clear()
        for change in changes:
            self.hub.set_filter(change.client, change.filter)
            if not change.done.done():
                change.done.set_result(None)

    def _assign(
        self, consumer: AIOKafkaConsumer, topics: set[str], starts: dict[TopicPartition, int]
    ) -> None:
        """Assign exactly `topics`: kept partitions resume where they were, new ones at `starts`."""
        partitions = [TopicPartition(t, p) for t in sorted(topics) for p in self._partitions.get(t, [0])]
        positions = {tp: self._positions.get(tp, starts.get(tp, 0)) for tp in partitions}
        consumer.assign(partitions)  # replaces the assignment and forgets positions: set them again
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        self._positions = positions
        self.state.assigned = set(topics)

    def _dispatch(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        values: dict[str, list[bytes]] = {}
        for tp, records in batches.items():
            position = self._positions.get(tp)
            if position is None:
                continue  # fetched before the partition was unassigned
            found = values.setdefault(tp.topic, [])
            for record in records:
                # Records before the position were fetched before a reassignment: already handed out.
                if record.offset < position:
                    continue
                position = record.offset + 1
                value = record.value
                if value is not None and is_text(value):
                    found.append(value)
                else:
                    log.warning(
                        "distribution: %s offset %d is not UTF-8 text; not sent", tp.topic, record.offset
                    )
            self._positions[tp] = position
        self.hub.dispatch(values)


def _known_exchanges() -> list[str]:
    return sorted(adapters())


class Distribution(Service):
    """The worker's distribution: the hub, its feed, and the web handlers that use them."""

    def __init__(
        self,
        app: faust.App,
        config: CollectorConfig,
        bootstrap_servers: list[str],
        redis: RedisState | None = None,
        workers: Callable[[], Iterable[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.config = config
        self.settings = config.distribution
        self.bootstrap_servers = bootstrap_servers
        self.redis = redis
        self.hub = Hub()
        self.feed = MarketFeed(bootstrap_servers, self.hub, self.settings.fetchMaxWaitMs)
        self._workers = workers or self._group_workers
        self._ids = itertools.count(1)
        self._sockets: dict[int, web.WebSocketResponse] = {}
        self._exchanges = _known_exchanges()
        self._stopping = False

    @Service.task
    async def _run_feed(self) -> None:
        await self.feed.run()

    async def on_stop(self) -> None:
        self._stopping = True
        closing = [
            asyncio.ensure_future(ws.close(code=CLOSE_GOING_AWAY, message=b"server stopping"))
            for ws in self._sockets.values()
        ]
        if closing:  # a client that does not answer its close is not waited for long
            await asyncio.wait(closing, timeout=STOP_CLOSE_SECONDS)

    # -- /ws/exchange -------------------------------------------------------------------------------------

    async def serve_client(self, request: web.Request) -> web.StreamResponse:
        try:
            initial = parse_query(request.query, self._exchanges)
        except FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.pingIntervalSeconds, compress=False, max_msg_size=MAX_MESSAGE_BYTES
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # the peer left during the handshake
            return ws
        _bound_kernel_buffer(transport, self.settings.maxBufferBytes)
        client_id = next(self._ids)

        def close(code: int, message: str) -> None:
            self.add_future(ws.close(code=code, message=message.encode()))

        client = Client(client_id, transport, self.settings.maxBufferBytes, close)
        self._sockets[client_id] = ws
        self.hub.connect(client)
        reason = "client"
        try:
            await self.feed.change(client, initial)
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await self._on_message(client, message.data)
                elif message.type == WSMsgType.BINARY:
                    self.hub.reply(client, error_message("send filter changes as text frames"))
                elif message.type == WSMsgType.ERROR:
                    break
            exception = ws.exception()
            if client.dropped is not None:
                reason = client.dropped
            elif self._stopping:
                reason = "server-stop"
            elif isinstance(exception, TimeoutError):
                reason = "ping-timeout"
            elif exception is not None:
                reason = "error"
            elif ws.close_code is None or ws.close_code == 1006:
                reason = "connection-lost"
        except asyncio.CancelledError:
            reason = "server-stop"
            raise
        finally:
            self._sockets.pop(client_id, None)
            self.hub.disconnect(client, client.dropped or reason)
            self.feed.wake()
        return ws

    async def _on_message(self, client: Client, text: str) -> None:
        if client.filter is None:
            return
        try:
            change = parse_client_message(text, self._exchanges)
            new = apply_change(client.filter, change)
        except FilterError as exc:
            self.hub.reply(client, error_message(str(exc)))
            return
        await self.feed.change(client, new)

    # -- /ws/info and /api/ws/infra-health ----------------------------------------------------------------

    def _group_workers(self) -> Iterable[str]:
        """Web addresses of the workers in Kafka's consumer group (those holding table partitions)."""
        try:
            return list(self.app.router.tables_metadata())
        except (AttributeError, KeyError, RuntimeError):
            return []

    def info(self, request: web.Request) -> dict[str, Any]:
        scheme = "wss" if request.secure else "ws"
        me = str(self.app.conf.canonical_url).rstrip("/")
        urls = [me, *sorted({str(url).rstrip("/") for url in self._workers()} - {me})]
        return {
            "endpoints": {
                "exchange": f"{scheme}://{request.host}{WS_PATH}",
                "redis": self.redis.public_url if self.redis is not None else None,
                "kafka": ",".join(self.bootstrap_servers),
            },
            "workers": [{"url": url, "exchange": ws_url(url, WS_PATH), "self": url == me} for url in urls],
        }

    async def infra_health(self) -> tuple[int, dict[str, Any]]:
        reasons = []
        kafka_ok, kafka_detail = await self.feed.reachable()
        if not kafka_ok:
            reasons.append(f"kafka unreachable: {kafka_detail}")
        redis: dict[str, Any] | None = None
        if self.redis is not None:
            try:
                redis_ok, redis_detail = await asyncio.wait_for(self.redis.reachable(), HEALTH_TIMEOUT)
            except TimeoutError:
                redis_ok, redis_detail = False, f"no answer in {HEALTH_TIMEOUT:.0f} s"
            redis = {"reachable": redis_ok, "detail": redis_detail, "url": self.redis.public_url}
            if not redis_ok:
                reasons.append(f"redis unreachable: {redis_detail}")
        body = {
            "status": "ok" if not reasons else "unhealthy",
            "reasons": reasons,
            "kafka": {"reachable": kafka_ok, "detail": kafka_detail},
            "redis": redis,
            "clients": len(self.hub.clients),
            "messagesPerSecond": round(self.hub.rate.rate(), 1),
            "clientsDropped": self.hub.dropped,
            "topicsFetched": len(self.feed.state.assigned),
            "worker": str(self.app.conf.canonical_url),
            "time": time.time_ns() // 1_000_000,
        }
        return (200 if not reasons else 503), body


def _bound_kernel_buffer(transport: Any, max_buffer_bytes: int) -> None:
    """Limit the socket's kernel send buffer to a quarter of the client's buffer. Left to autotune, it
    grows to 4 MB on its own (net.ipv4.tcp_wmem), and a slow client would hold up that much more
    before its buffer even starts to fill."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(max_buffer_bytes // 4, 16 * 1024))


def ws_url(http_url: str, path: str) -> str:
    """`http://host:6066` → `ws://host:6066/ws/exchange` (https → wss)."""
    scheme, _, rest = http_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{path}"


def install_distribution(
    app: faust.App,
    config: CollectorConfig,
    bootstrap_servers: list[str],
    redis: RedisState | None = None,
    workers: Callable[[], Iterable[str]] | None = None,
) -> Distribution:
    """Register live distribution on `app`: `/ws/exchange`, `/ws/info`, `/api/ws/infra-health`, `/live`,
    and the service that runs the feed, which reads the market topics from `bootstrap_servers` (the
    embedded broker's actual address when the worker runs one). `redis` (the Redis sink's state) is
    optional; `workers` lists the web addresses of the workers to offer clients (default: the members
    of Kafka's consumer group)."""
    distribution = Distribution(app, config, bootstrap_servers, redis=redis, workers=workers)
    app.service(distribution)  # type: ignore[arg-type]  # an instance: Faust starts it as it is
    # A WebSocket is not a Faust view (an HTTP request/response): it goes on aiohttp's router directly.
    app.web.web_app.router.add_get(WS_PATH, distribution.serve_client)  # type: ignore[attr-defined]

    @app.page("/ws/info")
    class EndpointInfo(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            return self.json(distribution.info(request))  # type: ignore[arg-type]

    @app.page("/api/ws/infra-health")
    class InfraHealth(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            status, body = await distribution.infra_health()
            return self.json(body, status=status)

    @app.page("/live")
    class LivePage(faust_web.View):
        async def get(self, request: faust_web.Request) -> faust_web.Response:
            return self.html((STATIC / "live.html").read_text(encoding="utf-8"))

    return distribution
