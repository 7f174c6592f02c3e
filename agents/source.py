"""Source agents: exchange WebSocket I/O → `raw.<exchange>`.

Each connection writes every frame untouched, with its receive time and a per-connection sequence
number, into batches of frames (one Kafka record per batch, see streams/raw.py). Control frames
(acks, errors, serverShutdown) are also read here, through the adapter, to drive the connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from agents import metrics
from streams.events import CollectorEvent
from streams.exchanges.base import (
    Ack,
    ErrorReply,
    ExchangeAdapter,
    Instrument,
    ServerShutdown,
    SubscriptionList,
)
from streams.plan import ConnectionPlan
from streams.raw import RawBatch, RawFrame, encode_batch

log = logging.getLogger(__name__)

SendRaw = Callable[[str, bytes], Awaitable[None]]
EmitEvent = Callable[[CollectorEvent], Awaitable[None]]

FLUSH_INTERVAL = 0.02  # seconds a frame may wait in a batch: bounds the latency batching adds
MAX_BATCH_FRAMES = 1000
MAX_BATCH_BYTES = 512 * 1024
MAX_FRAME_BYTES = 16 * 1024 * 1024
SUBSCRIBE_CHUNK = 200  # streams per SUBSCRIBE message
SUBSCRIBE_PACE = 0.25  # seconds between control messages: stays under 5 msg/s with room for pongs


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def fetch_instruments(
    adapter_type: type[ExchangeAdapter], rest_endpoint: str, attempts: int = 8
) -> list[Instrument]:
    """The exchange's markets, retried with backoff: a worker must not die on a REST hiccup."""
    url = rest_endpoint + adapter_type.instruments_path
    delay = 1.0
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, attempts + 1):
            try:
                async with session.get(url) as response:
                    body = await response.read()
                    metrics.rest_weight_reported(adapter_type.name, response.headers)
                    if response.status == 200:
                        return adapter_type.parse_instruments(body)
                    problem = f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = repr(exc)
            log.warning("instrument list %s failed (attempt %d): %s", url, attempt, problem)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)
    raise RuntimeError(f"could not load instruments from {url}")


class Backoff:
    """Exponential backoff with full jitter, reset once a connection has been stable."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, stable_after: float = 60.0) -> None:
        self.first, self.cap, self.stable_after = first, cap, stable_after
        self.current = first

    def next_delay(self) -> float:
        delay = random.uniform(self.current / 2, self.current)
        self.current = min(self.current * 2, self.cap)
        return delay

    def connection_lasted(self, seconds: float) -> None:
        if seconds >= self.stable_after:
            self.current = self.first


class FrameBatcher:
    """Collects one connection's frames and hands them on as raw batches."""

    def __init__(self, exchange: str, connection_id: str, send_raw: SendRaw) -> None:
        self.exchange = exchange
        self.connection_id = connection_id
        self._send_raw = send_raw
        self._frames: list[RawFrame] = []
        self._bytes = 0
        self.sequence = 0

    def add(self, payload: bytes, received_at: int) -> bool:
        """Add a frame; True when the batch is full and should be flushed now."""
        self._frames.append(RawFrame(self.sequence, received_at, payload))
        self.sequence += 1
        self._bytes += len(payload)
        return len(self._frames) >= MAX_BATCH_FRAMES or self._bytes >= MAX_BATCH_BYTES

    async def flush(self) -> None:
        if not self._frames:
            return
        metrics.frames_received(self.exchange, len(self._frames), self._bytes)
        frames, self._frames, self._bytes = self._frames, [], 0
        batch = RawBatch(exchange=self.exchange, connection_id=self.connection_id, frames=frames)
        await self._send_raw(self.connection_id, encode_batch(batch))


class WebSocketConnection:
    """One connection group: connect, subscribe, read frames, reconnect with backoff."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        plan: ConnectionPlan,
        ws_endpoint: str,
        send_raw: SendRaw,
        emit: EmitEvent,
        silence_timeout: float = 60.0,
    ) -> None:
        self.adapter = adapter
        self.plan = plan
        self.url = ws_endpoint + plan.route
        self._send_raw = send_raw
        self._emit = emit
        self.silence_timeout = silence_timeout
        self.backoff = Backoff()
        self.connects = 0
        self._request_id = 0
        self._pending: dict[int, tuple[str, ...]] = {}
        self.subscribed: set[str] = set()
        self.state = "ready"

    @property
    def name(self) -> str:
        return f"{self.adapter.name}-{self.plan.group}"

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            reason = "closed"
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, websockets.WebSocketException) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the I/O boundary: log it, never let the group die
                log.exception("connection %s failed unexpectedly", self.name)
                reason = f"{type(exc).__name__}: {exc}"
            self.state = "recovering"
            metrics.connection_failed(self.adapter.name)
            self.subscribed.clear()
            self.backoff.connection_lasted(time.monotonic() - started)
            delay = self.backoff.next_delay()
            log.warning("connection %s lost (%s); reconnecting in %.1f s", self.name, reason, delay)
            await self._emit_event("disconnected", {"reason": reason, "retryIn": round(delay, 3)})
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        self.state = "connecting"
        async with websockets.connect(
            self.url,
            ping_interval=None,  # the exchange pings us; our own pings would count against its limits
            max_size=MAX_FRAME_BYTES,
            max_queue=4096,
            open_timeout=10,
            close_timeout=2,
            compression=None,
        ) as ws:
            self.connects += 1
            metrics.connection_opened(self.adapter.name, reconnect=self.connects > 1)
            connection_id = f"{self.name}-{now_ms()}-{self.connects}"
            self.state = "connected"
            await self._emit_event("connected", {"url": self.url}, connection_id)
            batcher = FrameBatcher(self.adapter.name, connection_id, self._send_raw)
            flusher = asyncio.create_task(self._flush_periodically(batcher))
            subscriber = asyncio.create_task(self._subscribe(ws, self.plan.streams))
            try:
                await self._read(ws, batcher, connection_id)
            finally:
                metrics.connection_closed(self.adapter.name)
                subscriber.cancel()
                flusher.cancel()
                await batcher.flush()

    async def _read(self, ws: ClientConnection, batcher: FrameBatcher, connection_id: str) -> None:
        adapter = self.adapter
        while True:
            try:
                payload = await asyncio.wait_for(ws.recv(decode=False), timeout=self.silence_timeout)
            except TimeoutError:
                await self._emit_event("stale", {"silentFor": self.silence_timeout}, connection_id)
                raise
            received_at = now_ms()
            if isinstance(payload, str):
                payload = payload.encode()
            if batcher.add(payload, received_at):
                await batcher.flush()
            for event in adapter.control_events(payload):
                if isinstance(event, ServerShutdown):
                    await self._emit_event("server-shutdown", {"eventTime": event.event_time}, connection_id)
                    return
                await self._on_control(event, connection_id)

    async def _on_control(self, event: Ack | ErrorReply | SubscriptionList, connection_id: str) -> None:
        if isinstance(event, Ack) and isinstance(event.request_id, int):
            streams = self._pending.pop(event.request_id, ())
            self.subscribed.update(streams)
            if self.subscribed.issuperset(self.plan.streams):
                self.state = "subscribed"
            await self._emit_event("subscribed", {"streams": len(streams)}, connection_id)
        elif isinstance(event, ErrorReply):
            failed = self._pending.pop(event.request_id, ()) if isinstance(event.request_id, int) else ()
            log.error("%s rejected a request: %s %s", self.name, event.code, event.message)
            await self._emit_event(
                "subscribe-failed",
                {"code": event.code, "message": event.message, "streams": list(failed)},
                connection_id,
            )

    async def _subscribe(self, ws: ClientConnection, streams: tuple[str, ...]) -> None:
        self.state = "subscription-requesting"
        for start in range(0, len(streams), SUBSCRIBE_CHUNK):
            chunk = streams[start : start + SUBSCRIBE_CHUNK]
            self._request_id += 1
            self._pending[self._request_id] = chunk
            await ws.send(self.adapter.subscribe_message(chunk, self._request_id), text=True)
            await asyncio.sleep(SUBSCRIBE_PACE)

    async def _flush_periodically(self, batcher: FrameBatcher) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await batcher.flush()

    async def _emit_event(self, kind: str, detail: dict[str, Any], connection_id: str | None = None) -> None:
        event = CollectorEvent(
            type=kind, exchange=self.adapter.name, time=now_ms(), connection_id=connection_id, detail=detail
        )
        try:
            await self._emit(event)
        except Exception:  # events are best effort; the data path must not stop for them
            log.exception("could not emit %s event", kind)
