"""One WebSocket session (a `Link`) and the raw-frame batcher it writes through.

A link connects, sends paced SUBSCRIBE/UNSUBSCRIBE requests and reads frames until the connection
fails, goes silent, the exchange announces a shutdown, or its owner closes it. Frames go out as raw
batches keyed by connection GROUP, so everything a group receives (WebSocket, REST, both links of a
rollover) stays in order on one raw partition. Frames are written as they come: the continuity
engine, downstream of the raw topic, puts each symbol's trades in order and repairs what a connection
missed (streams/continuity/). A link watches its own pace (streams/liveness.py) and says when it has
stalled, so that its slot replaces it make-before-break.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Literal

import aiohttp

from agents import metrics
from streams.exchanges.base import Ack, ErrorReply, ExchangeAdapter, ServerShutdown, SubscriptionList
from streams.limits import SlidingWindow, message_window
from streams.liveness import FlowWatch
from streams.raw import MAX_BATCH_BYTES, MAX_BATCH_FRAMES, RawBatch, RawFrame, encode_batch

log = logging.getLogger(__name__)

SendRaw = Callable[[str, bytes], Awaitable[None]]
Emit = Callable[..., Awaitable[None]]  # (kind, detail, connection_id=None)

FLUSH_INTERVAL = 0.005  # seconds a frame may wait in a batch while frames come fast
# ... and while they trickle in (the default of `connections.quietFlushMs`). Each flush is a normalize
# step, a hand-over and a produce request, which cost about the same whatever they carry, and each
# market topic a step touches is a record batch of its own: at a quiet worker's rates the flushes and
# the batches were most of its CPU (docs/benchmarks.md, "A longer flush window while frames trickle").
QUIET_FLUSH_INTERVAL = 0.050
# The window is the shortest at this pace and faster (every target step with 100 or more symbols), the
# quiet one at QUIET_PACE and slower, and in between in proportion to the gap between frames: a window
# of 25 frames at every pace put the 100-symbol 5,000 frames/s step on the edge of the shortest window,
# at up to twice its p99 (docs/benchmarks.md, "A longer flush window while frames trickle").
FAST_PACE = 3_200  # frames a second
QUIET_PACE = 500
# A frame travels in a raw record of its own when it is large; it must fit the producer's 8 MiB
# record limit (RAW_MAX_BYTES, agents/writer.py), else the frames batched with it would be lost with it.
MAX_FRAME_BYTES = 6 * 1024 * 1024
SUBSCRIBE_CHUNK = 200  # streams per SUBSCRIBE message
ACK_TIMEOUT = 10.0
OPEN_TIMEOUT = 10.0  # the TCP, TLS and WebSocket handshakes together
CLOSE_TIMEOUT = 2.0
PACE_CHECK = 0.25  # seconds between a link's looks at its own silence
LAG_CHECKS = 4  # a look later than this many PACE_CHECKs: the event loop was blocked, nothing is judged


TEXT, BINARY = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY
WebSocket = aiohttp.ClientWebSocketResponse[Literal[False]]


async def connect_websocket(url: str) -> tuple[aiohttp.ClientSession, WebSocket]:
    """A WebSocket to an exchange, in a session of its own that the caller closes after it.

    aiohttp rather than websockets: its frame reader is compiled, and at a quiet worker's 500 frames a
    second reading took ~1 point of a core less (docs/benchmarks.md)."""
    # No session-wide time limit (aiohttp's default is 5 minutes): a link lives for hours.
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that comes as
        # the handshake completes, and a slot being stopped would go on with the new connection.
        async with asyncio.timeout(OPEN_TIMEOUT):
            ws = await session.ws_connect(
                url,
                autoping=True,  # the exchange pings us; ours would count against its limits
                heartbeat=None,
                max_msg_size=MAX_FRAME_BYTES,
                compress=0,
                # Text frames as bytes, undecoded: one that is not UTF-8 is dead-lettered downstream
                # rather than failing the connection.
                decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )
    except BaseException:
        await session.close()
        raise
    return session, ws


def _ended_by(message: Any, ws: WebSocket) -> str:
    """Why the connection ended, from the message aiohttp reads in place of a frame."""
    if message.type is aiohttp.WSMsgType.ERROR:
        return f"{type(message.data).__name__}: {message.data}"
    if message.type is aiohttp.WSMsgType.CLOSE:
        return f"closed by the exchange: code {message.data} {message.extra or ''}".rstrip()
    return "connection closed" if ws.close_code is None else f"connection closed (code {ws.close_code})"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def wait_until_allowed(delay_now: Callable[[], float]) -> None:
    """Sleep until a limiter says go; `delay_now` returns the seconds still to wait (0: go now)."""
    while True:
        delay = delay_now()
        if delay <= 0:
            return
        await asyncio.sleep(delay)


class FrameBatcher:
    """Collects one connection's frames and hands them on as raw batches under `key`."""

    def __init__(
        self, exchange: str, connection_id: str, send_raw: SendRaw, key: str | None = None, source: str = "ws"
    ) -> None:
        self.exchange = exchange
        self.connection_id = connection_id
        self.key = key or connection_id
        self.source = source
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

    def discard(self) -> None:
        self._frames, self._bytes = [], 0

    @property
    def pending(self) -> int:
        return len(self._frames)

    async def flush(self) -> None:
        if not self._frames:
            return
        metrics.frames_received(self.exchange, len(self._frames), self._bytes)
        frames, self._frames, self._bytes = self._frames, [], 0
        for chunk in _chunks(frames):
            batch = RawBatch(
                exchange=self.exchange, connection_id=self.connection_id, frames=chunk, source=self.source
            )
            await self._send_raw(self.key, encode_batch(batch))


def _chunks(frames: list[RawFrame]) -> list[list[RawFrame]]:
    """Split frames into batches within MAX_BATCH_FRAMES and MAX_BATCH_BYTES (a big frame goes alone)."""
    chunks: list[list[RawFrame]] = []
    current: list[RawFrame] = []
    size = 0
    for frame in frames:
        if current and (len(current) >= MAX_BATCH_FRAMES or size + len(frame.payload) > MAX_BATCH_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(frame)
        size += len(frame.payload)
    if current:
        chunks.append(current)
    return chunks


def flush_window(frames: int, elapsed: float, shortest: float, longest: float) -> float:
    """How long the next batch may collect frames, after a flush of `frames` frames that came in the
    `elapsed` seconds since the flush before: `shortest` at FAST_PACE and faster, `longest` at
    QUIET_PACE and slower, in proportion to the gap between frames in between."""
    if frames <= 0:
        return longest
    fast_gap, quiet_gap = 1 / FAST_PACE, 1 / QUIET_PACE
    share = (elapsed / frames - fast_gap) / (quiet_gap - fast_gap)
    return min(max(shortest + share * (longest - shortest), shortest), longest)


class FlushClock:
    """Flushes the batches of all of a source's links together, one window after the first frame
    any of them took since the last flush.

    With a timer per link, frames trickling in on several connections woke the event loop for a
    flush per connection, and each flush made a normalize step and a hand-over to librdkafka of its
    own: at a quiet worker's rates those wake-ups were most of its CPU (docs/benchmarks.md). The
    window is `interval` while frames come fast (3,200 a second and more) and grows towards
    `quiet_interval` as they slow down (`flush_window`), so that no step carries a frame or two."""

    def __init__(
        self, interval: float = FLUSH_INTERVAL, quiet_interval: float = QUIET_FLUSH_INTERVAL
    ) -> None:
        self.interval = interval
        self.quiet_interval = max(quiet_interval, interval)
        self.window = interval  # the next flush's; the first frames are not kept waiting
        self._last_flush: float | None = None  # loop time
        self._due: dict[FrameBatcher, None] = {}  # an ordered set: flushed in the order they filled
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()  # referenced until done

    def due(self, batcher: FrameBatcher) -> None:
        """`batcher` holds frames: flush it within the window."""
        self._due[batcher] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._fire)

    def _fire(self) -> None:
        self._timer = None
        batchers, self._due = list(self._due), {}
        # Batches flushed on filling up are not counted: a connection fills one within a window only
        # at a pace where the window is short, and it is never longer than `quiet_interval` anyway.
        now = asyncio.get_running_loop().time()
        elapsed = self.window if self._last_flush is None else now - self._last_flush
        self._last_flush = now
        frames = sum(batcher.pending for batcher in batchers)
        self.window = flush_window(frames, elapsed, self.interval, self.quiet_interval)
        task = asyncio.ensure_future(_flush_each(batchers))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)


async def _flush_each(batchers: list[FrameBatcher]) -> None:
    for batcher in batchers:
        try:
            await batcher.flush()
        except Exception:  # one link's failure must not keep the others' frames
            log.exception("writing %s's frames failed", batcher.connection_id)


class LinkEnded(Exception):
    """Why a link stopped: `reason` is a short slug, `shutdown` when the exchange asked us to leave."""

    def __init__(self, reason: str, shutdown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.shutdown = shutdown


class Link:
    """One WebSocket connection of a group's slot."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        url: str,
        connection_id: str,
        group_key: str,
        send_raw: SendRaw,
        emit: Emit,
        *,
        silence_timeout: float,
        stall_factor: float = 8.0,
        flush_clock: FlushClock | None = None,
    ) -> None:
        self.adapter = adapter
        self.url = url
        self.connection_id = connection_id
        self.batcher = FrameBatcher(adapter.name, connection_id, send_raw, key=group_key)
        self._emit = emit
        self.silence_timeout = silence_timeout  # the longest silence, whatever the pace
        self.stall_factor = stall_factor  # a silence this many usual gaps long is a stall; 0: not judged
        self.first_live: dict[str, int] = {}  # symbol → first trade id this link received
        # Only a replacement link waiting to take over needs its first trades marked; a live link
        # stops, since decoding every trade frame for it cost ~6 % of a quiet worker's CPU.
        self.marking = True
        self.watch: FlowWatch | None = None
        self.stalled = asyncio.Event()  # set when the link's silence is long for its pace
        self.flush_clock = flush_clock or FlushClock()  # shared by a source's links
        self.subscribed: set[str] = set()
        self._pending: dict[int, tuple[str, tuple[str, ...], asyncio.Future[bool]]] = {}
        self._request_id = 0
        self._pacer: SlidingWindow = message_window(adapter.limits.max_incoming_messages_per_second)
        self._send_lock = asyncio.Lock()
        self.ws: WebSocket | None = None
        self._session: aiohttp.ClientSession | None = None
        self.opened_at = 0.0
        self.last_frame_at = 0.0
        self.last_received_at: int | None = None  # epoch ms of the newest frame: the flow summary reports it
        self.ended: asyncio.Future[LinkEnded] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[Any]] = []
        self.trade_seen = asyncio.Event()

    async def open(self) -> None:
        self._session, self.ws = await connect_websocket(self.url)
        self.opened_at = self.last_frame_at = time.monotonic()
        self.watch = FlowWatch(
            self.opened_at, max_silence=self.silence_timeout, factor=self.stall_factor or FlowWatch.FACTOR
        )
        reader = asyncio.create_task(self._read(), name=f"read-{self.connection_id}")
        self._tasks = [
            reader,
            asyncio.create_task(self._watch_pace(reader), name=f"pace-{self.connection_id}"),
        ]
        if self.adapter.keepalive is not None:
            self._tasks.append(
                asyncio.create_task(
                    self._keep_alive(*self.adapter.keepalive), name=f"keepalive-{self.connection_id}"
                )
            )

    async def _keep_alive(self, interval: float, message: bytes) -> None:
        """Exchanges that close idle connections and never ping (Upbit: 120 s) get a text keepalive."""
        assert self.ws is not None
        while True:
            await asyncio.sleep(interval)
            async with self._send_lock:
                await self.ws.send_frame(message, TEXT)

    # -- subscriptions ----------------------------------------------------------------------------

    async def subscribe(self, streams: Collection[str]) -> bool:
        if self.adapter.replaces_subscriptions:
            return await self._replace(self.subscribed | set(streams))
        return await self._request("SUBSCRIBE", sorted(set(streams) - self.subscribed))

    async def unsubscribe(self, streams: Collection[str]) -> bool:
        if self.adapter.replaces_subscriptions:
            return await self._replace(self.subscribed - set(streams))
        return await self._request("UNSUBSCRIBE", sorted(set(streams) & self.subscribed))

    async def _replace(self, streams: set[str]) -> bool:
        """Exchanges whose every request replaces the set (Upbit, Bithumb): one request, the whole set."""
        if streams == self.subscribed:
            return True
        if not streams:
            # An empty request is an error there; the link just stops counting the old streams.
            self.subscribed.clear()
            return True
        future = await self._send_request("SUBSCRIBE", tuple(sorted(streams)))
        try:
            ok = await asyncio.wait_for(future, ACK_TIMEOUT)
        except TimeoutError:
            return False
        if ok:
            self.subscribed.intersection_update(streams)
        return ok

    async def _request(self, method: str, streams: Sequence[str]) -> bool:
        """Send paced requests in chunks and wait for every acknowledgement; False if any failed."""
        futures = []
        for start in range(0, len(streams), SUBSCRIBE_CHUNK):
            chunk = tuple(streams[start : start + SUBSCRIBE_CHUNK])
            futures.append(await self._send_request(method, chunk))
        if not futures:
            return True
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT)
        except TimeoutError:
            return False
        return all(results)

    async def _send_request(self, method: str, chunk: tuple[str, ...]) -> asyncio.Future[bool]:
        assert self.ws is not None
        async with self._send_lock:
            await wait_until_allowed(lambda: self._pacer.delay(time.monotonic()))
            self._pacer.record(time.monotonic())
            self._request_id += 1
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._pending[self._request_id] = (method, chunk, future)
            adapter = self.adapter
            make = adapter.subscribe_message if method == "SUBSCRIBE" else adapter.unsubscribe_message
            if method == "SUBSCRIBE":
                await self._emit("subscribe-requested", {"streams": list(chunk)}, self.connection_id)
            await self.ws.send_frame(make(chunk, self._request_id), TEXT)
            if not self.adapter.acknowledges_subscriptions:
                self._settle(self._request_id, ok=True)
            return future

    def _settle(self, request_id: int, ok: bool) -> tuple[str, tuple[str, ...]] | None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return None
        method, chunk, future = pending
        if ok:
            if method == "SUBSCRIBE":
                self.subscribed.update(chunk)
            else:
                self.subscribed.difference_update(chunk)
        if not future.done():
            future.set_result(ok)
        return method, chunk

    # -- reading ----------------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self.ws is not None
        ws, adapter, batcher = self.ws, self.adapter, self.batcher
        marker, keepalive_reply = adapter.trade_marker, adapter.keepalive_reply
        flush_soon = self.flush_clock.due
        watch = self.watch
        assert watch is not None
        try:
            while True:
                message = await ws.receive()
                if message.type is TEXT or message.type is BINARY:
                    payload = message.data
                else:
                    raise LinkEnded(_ended_by(message, ws))
                received_at = self.last_received_at = now_ms()
                self.last_frame_at = now = time.monotonic()
                if not keepalive_reply(payload):
                    watch.frame(now)
                if self.marking:
                    mark = marker(payload)
                    if mark is not None and mark[0] not in self.first_live:
                        self.first_live[mark[0]] = mark[1]
                        self.trade_seen.set()
                if batcher.add(payload, received_at):
                    await batcher.flush()
                elif batcher.pending == 1:
                    flush_soon(batcher)
                for event in adapter.control_events(payload):
                    if isinstance(event, ServerShutdown):
                        raise LinkEnded("server-shutdown", shutdown=True)
                    await self._on_control(event)
        except LinkEnded as ended:
            self._end(ended)
        except asyncio.CancelledError:
            self._end(LinkEnded("closed"))
            raise
        except (OSError, aiohttp.ClientError) as exc:
            self._end(LinkEnded(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # the I/O boundary: log it, the slot reconnects
            log.exception("link %s failed unexpectedly", self.connection_id)
            self._end(LinkEnded(f"{type(exc).__name__}: {exc}"))

    async def _on_control(self, event: Ack | ErrorReply | SubscriptionList) -> None:
        if isinstance(event, Ack) and isinstance(event.request_id, int):
            settled = self._settle(event.request_id, ok=True)
            if settled is not None:
                kind = "subscribed" if settled[0] == "SUBSCRIBE" else "unsubscribed"
                await self._emit(kind, {"streams": list(settled[1])}, self.connection_id)
        elif isinstance(event, ErrorReply):
            settled = None
            if isinstance(event.request_id, int):
                settled = self._settle(event.request_id, ok=False)
            log.error("%s rejected a request: %s %s", self.connection_id, event.code, event.message)
            streams = list(settled[1]) if settled else []
            detail = {"code": event.code, "message": event.message, "streams": streams}
            await self._emit("subscribe-failed", detail, self.connection_id)

    async def _watch_pace(self, reader: asyncio.Task[None]) -> None:
        """Say when the link has stalled: silent far longer than its own recent pace (a quiet market
        is not a stall), and end it when it stays silent for `silence_timeout`.

        A busy event loop also keeps frames unread: a check that comes late (the loop was blocked) does
        not judge, and a stall is only called on two checks in a row, so that the reader has had its
        turn at what arrived meanwhile.

        While nothing is suspected it sleeps until the silence could first reach a limit, not a
        PACE_CHECK: frames arriving meanwhile only push that moment later. Looking four times a second
        on every link was a fixed cost of tens of wake-ups a second whatever the traffic."""
        watch = self.watch
        assert watch is not None
        due = time.monotonic()  # when this look was meant to happen
        suspected = False
        while not reader.done():
            now = time.monotonic()
            loop_lagged = now - due > PACE_CHECK * (LAG_CHECKS - 1)
            delay = PACE_CHECK
            if self.subscribed and not loop_lagged:
                if now - self.last_frame_at >= self.silence_timeout:
                    self._end(LinkEnded("stale"))
                    reader.cancel()
                    return
                if self.stall_factor > 0 and watch.stalled(now):
                    if suspected and not self.stalled.is_set():
                        log.warning(
                            "%s stalled: silent %.1f s against its usual pace (limit %.1f s)",
                            self.connection_id, now - watch.last_frame, watch.silence_limit(now),
                        )  # fmt: skip
                        self.stalled.set()
                    suspected = True
                else:
                    suspected = False
                    if self.stalled.is_set():
                        self.stalled.clear()  # frames again before it was replaced
                if not suspected and not self.stalled.is_set():
                    delay = max(PACE_CHECK, self._first_limit_at(watch, now) - now)
            else:
                suspected = False
            due = now + delay
            await asyncio.sleep(delay)

    def _first_limit_at(self, watch: FlowWatch, now: float) -> float:
        """The first moment (monotonic) a silence could be judged stale or stalled."""
        stale_at = self.last_frame_at + self.silence_timeout  # frames only move this later
        return min(stale_at, watch.next_judgement(now)) if self.stall_factor > 0 else stale_at

    def _end(self, ended: LinkEnded) -> None:
        if not self.ended.done():
            self.ended.set_result(ended)
        for _, _, future in self._pending.values():
            if not future.done():
                future.set_result(False)
        self._pending.clear()

    async def close(self) -> None:
        """Close the socket, stop reading, and write what it received."""
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        if others:
            # asyncio.wait, not `await task` under suppress(CancelledError): that would also swallow
            # a cancellation of close() itself, and the slot being stopped would carry on.
            await asyncio.wait(others)
        self._end(LinkEnded("closed"))
        if self.ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                    await self.ws.close()
        if self._session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._session.close()
        await self.batcher.flush()
