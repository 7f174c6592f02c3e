"""What every dialect's WebSocket connections share: an outbound queue, keepalive and limits.

A connection owns exactly one writer task that drains its queue. Publishers append complete frames
that were encoded (and framed) once for all subscribers, so fanning a frame out costs one append per
connection and never an asyncio task per message. The writer joins the queued text frames into one
transport write: at tens of thousands of frames per second a system call per frame would dominate.
Control frames (ping, pong, close) still go through aiohttp, which owns the protocol state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, Generic, TypeVar

from aiohttp import web

log = logging.getLogger(__name__)

# Frame kinds that the writer treats specially; every other kind is a text frame counted under its name.
PING = "ping"
PONG = "pong"
CLOSE = "close"
_CONTROL_KINDS = frozenset((PING, PONG, CLOSE))
# What a data stall (`keepalive: true`) still sends: keepalive, replies to the client and announcements.
KEEPALIVE_KINDS = frozenset((PING, PONG, CLOSE, "status", "control", "error", "serverShutdown"))
_MAX_BATCH_FRAMES = 1024
# Stop writing while the transport holds more than HIGH, resume below LOW: bounded memory per client.
_HIGH_WATER = 4 * 1024 * 1024
_LOW_WATER = 1024 * 1024
_DRAIN_POLL = 0.002

# Dropping a client whose queue grows past this is what a real exchange does to a slow consumer.
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client text frame: unmasked, unfragmented, uncompressed (RFC 6455 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


class Connection:
    """One client WebSocket as the simulator sees it."""

    def __init__(
        self,
        connection_id: str,
        ws: web.WebSocketResponse,
        request: web.Request,
        frames_sent: dict[str, int],
        *,
        now: float,
        max_messages_per_second: int,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self.id = connection_id
        self.ws = ws
        self.remote = request.remote
        self.opened_at = now
        self.streams: dict[str, None] = {}  # an ordered set: LIST_SUBSCRIPTIONS keeps the order
        self.last_ping_at = now
        self.closing = False
        self.stalled = False  # a stall fault: open, but nothing is sent, not even pings or pongs
        self.data_stalled = False  # a data stall: keepalive goes on, data frames are withheld
        self.withheld = 0  # data frames a data stall kept from this connection
        self.slow_consumer = False
        self._transport = request.transport
        self._frames_sent = frames_sent  # shared by all connections of a dialect, so totals survive closes
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        self._wakeup = asyncio.Event()
        self._close_code = 1000
        self._pending_pings: dict[bytes, float] = {}  # payload -> sent at, oldest first
        self._recent_messages: deque[float] = deque(maxlen=max_messages_per_second)
        self._writer = asyncio.create_task(self._write_loop(), name=f"simulator-writer-{connection_id}")

    # -- outbound ---------------------------------------------------------------------------------

    def send(self, kind: str, frame: bytes) -> None:
        """Queue a frame made by `text_frame` (for PING and PONG: just the payload)."""
        if self.closing or self.stalled:
            return
        if self.data_stalled and kind not in KEEPALIVE_KINDS:
            self.withheld += 1
            return
        self._queue.append((kind, frame))
        self._queued_bytes += len(frame)
        if self._queued_bytes > self._max_queued_bytes:
            self.slow_consumer = True
            log.warning("dropping %s: %d bytes queued", self.id, self._queued_bytes)
            self.abort()
            return
        self._wakeup.set()

    def send_ping(self, payload: bytes, now: float) -> None:
        self.last_ping_at = now
        self._pending_pings[payload] = now
        self.send(PING, payload)

    def close(self, code: int = 1000, *, discard_queued: bool = False) -> None:
        """Close with a close frame after the queued frames (or instead of them)."""
        if self.closing:
            return
        if discard_queued:
            self._queue.clear()
            self._queued_bytes = 0
        self._queue.append((CLOSE, b""))
        self._close_code = code
        self.closing = True
        self._wakeup.set()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame, as a network failure would."""
        self.closing = True
        self._queue.clear()
        self._queued_bytes = 0
        if self._transport is not None:
            self._transport.abort()
        self._writer.cancel()

    async def finished(self, close_timeout: float) -> None:
        """Called by the handler when it stops reading: let a requested close finish, then stop."""
        if self.closing and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), close_timeout)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    async def _write_loop(self) -> None:
        ws, queue, counts, transport = self.ws, self._queue, self._frames_sent, self._transport
        batch: list[bytes] = []
        try:
            while True:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                while queue and queue[0][0] not in _CONTROL_KINDS and len(batch) < _MAX_BATCH_FRAMES:
                    kind, frame = queue.popleft()
                    batch.append(frame)
                    counts[kind] = counts.get(kind, 0) + 1
                if batch:
                    data = b"".join(batch)
                    batch.clear()
                    self._queued_bytes -= len(data)
                    if transport is None or transport.is_closing():
                        raise ConnectionResetError("transport closed")
                    transport.write(data)
                    if transport.get_write_buffer_size() > _HIGH_WATER:
                        await _drained(transport)
                    continue
                kind, frame = queue.popleft()
                self._queued_bytes -= len(frame)
                if kind == PING:
                    await ws.ping(frame)
                elif kind == PONG:
                    await ws.pong(frame)
                else:
                    await ws.close(code=self._close_code)
                    return
                counts[kind] = counts.get(kind, 0) + 1
        except (TimeoutError, ConnectionError, RuntimeError) as error:
            # The peer went away mid-write; the handler's read loop sees the same and cleans up.
            log.debug("writer of %s stopped: %r", self.id, error)
            self.closing = True
            if self._transport is not None:
                self._transport.abort()

    # -- inbound ----------------------------------------------------------------------------------

    def note_incoming(self, now: float) -> bool:
        """Record one incoming message; False when it exceeds the messages-per-second limit."""
        recent = self._recent_messages
        over = len(recent) == recent.maxlen and now - recent[0] < 1.0
        recent.append(now)
        return not over

    def pong_received(self, payload: bytes | bytearray) -> None:
        # A pong answers its ping and, implicitly, every older one; unsolicited pongs answer nothing.
        payload = bytes(payload)  # aiohttp hands over a bytearray, which cannot be a dict key
        if payload not in self._pending_pings:
            return
        while self._pending_pings:
            answered = next(iter(self._pending_pings))
            del self._pending_pings[answered]
            if answered == payload:
                break

    def pong_overdue(self, now: float, timeout: float) -> bool:
        if not self._pending_pings:
            return False
        return now - next(iter(self._pending_pings.values())) > timeout

    def describe(self) -> dict[str, Any]:
        return {"remote": self.remote, "streams": list(self.streams), "queued": len(self._queue)}


C = TypeVar("C", bound=Connection)


async def _drained(transport: asyncio.Transport) -> None:
    # aiohttp keeps its drain waiter private (and resume_writing goes to its protocol, not to us),
    # so there is no event to wait on; a client this far behind is rare enough for polling to do.
    while transport.get_write_buffer_size() > _LOW_WATER and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_DRAIN_POLL)


class StreamHub(Generic[C]):
    """Which connections are subscribed to which stream."""

    def __init__(self) -> None:
        self.subscribers: dict[str, dict[C, None]] = {}  # insertion-ordered sets

    def subscribe(self, connection: C, stream: str) -> bool:
        """Returns True when this is the stream's first subscriber."""
        connection.streams[stream] = None
        subscribers = self.subscribers.get(stream)
        if subscribers is None:
            self.subscribers[stream] = {connection: None}
            return True
        subscribers[connection] = None
        return False

    def unsubscribe(self, connection: C, stream: str) -> bool:
        """Returns True when the stream lost its last subscriber."""
        connection.streams.pop(stream, None)
        subscribers = self.subscribers.get(stream)
        if subscribers is None or connection not in subscribers:
            return False
        del subscribers[connection]
        if not subscribers:
            del self.subscribers[stream]
            return True
        return False

    def drop(self, connection: C) -> list[str]:
        """Unsubscribe a closed connection; returns the streams left without subscribers."""
        orphaned = [stream for stream in list(connection.streams) if self.unsubscribe(connection, stream)]
        connection.streams.clear()
        return orphaned
