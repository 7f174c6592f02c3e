"""A connection slot of a group: a succession of WebSocket links, plus REST while none is live.

The slot owns its connection's life: backoff, rollover before the exchange's connection lifetime, and
make-before-break replacement of a link that stalled (silent far longer than its own pace). What its
links missed is not its concern: the continuity engine downstream of the raw topic sees every gap and
asks for history. The slot only tells it when its trade streams go down and come back (`on_stream`),
so that the engine polls history meanwhile, and polls tickers and klines itself while down.
agents/source.py explains the whole; `ExchangeSource` provides what slots of one exchange share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from agents import metrics
from agents.backfill import RestWriter, poll_while_down
from agents.connection import Link, LinkEnded, now_ms
from streams.limits import Backoff

if TYPE_CHECKING:
    from agents.source import ExchangeSource

log = logging.getLogger(__name__)

REPLACEMENT_WAIT_FOR_TRADES = 5.0  # how long a replacing link may take to see a trade on every symbol
ROLLOVER_RETRY = 60.0
STABLE_AFTER = 60.0
STOP_RETRY_SECONDS = 1.0  # how long stop() waits for a cancelled slot before cancelling it again


@dataclass
class ConnectionStatus:
    name: str
    state: str  # ready, connecting, subscription-requesting, connected, recovering
    connection_id: str | None
    streams: int
    subscribed: int
    connects: int
    rollovers: int
    rest_fallback: bool
    last_error: str | None
    stalls: int = 0


class Slot:
    """One connection of a group: a succession of links, plus REST while none is live."""

    def __init__(self, source: ExchangeSource, group: Group, name: str, route: str) -> None:
        self.source = source
        self.group = group
        self.name = name  # also the connector name the state tables show
        self.route = route
        self.desired: set[str] = set()
        self.link: Link | None = None
        self.state = "ready"
        self.connects = 0
        self.rollovers = 0
        self.stalls = 0
        self.last_error: str | None = None
        self.backoff = Backoff(stable_after=STABLE_AFTER)
        self._lock = asyncio.Lock()  # one subscription change at a time per slot
        self._task: asyncio.Task[None] | None = None
        self._fallback: tuple[asyncio.Task[None], asyncio.Event] | None = None
        self._down_since: int | None = None
        self._open_links: set[Link] = set()  # every link not yet closed, live or still being set up

    # -- control from the group -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"slot-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            # Cancelled again until it ends: a cancellation lost in a library's wait (Python 3.11's
            # wait_for can drop one) must not leave stop() waiting on a slot that goes on running.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=STOP_RETRY_SECONDS)
        self._task = None
        await self._stop_fallback()
        for link in list(self._open_links):
            await self._close(link)
        self.link = None
        self.state = "ready"

    @property
    def started(self) -> bool:
        return self._task is not None

    async def _close(self, link: Link) -> None:
        self._open_links.discard(link)
        await link.close()

    async def set_streams(self, streams: Collection[str]) -> None:
        self.desired = set(streams)
        link = self.link
        if link is not None and link.ws is not None and not link.ended.done():
            await self._reconcile(link)

    async def _reconcile(self, link: Link) -> None:
        async with self._lock:
            removed = link.subscribed - self.desired
            added = self.desired - link.subscribed
            if removed:
                await link.unsubscribe(removed)
            if added:
                await link.subscribe(added)

    def trade_symbols(self) -> list[str]:
        return sorted(
            {
                i.instrument.symbol
                for i in self.source.stream_infos(self.desired)
                if i.data_type.kind == "trade"
            }
        )

    # -- the connection loop ----------------------------------------------------------------------

    async def _emit(self, kind: str, detail: dict[str, Any], connection_id: str | None = None) -> None:
        detail = {"connector": self.name, "group": self.group.key, **detail}
        await self.source.emit(kind, detail, connection_id)

    def _new_link(self) -> Link:
        self.connects += 1
        connection_id = f"{self.name}-{now_ms()}-{self.connects}"
        return Link(
            self.source.adapter,
            self.source.settings.wsEndpoint + self.route,
            connection_id,
            self.group.key,
            self.source.send_raw,
            self._emit,
            silence_timeout=self.source.silence_timeout,
            stall_factor=self.source.settings.connections.stallAfterGaps,
            flush_clock=self.source.flush_clock,
        )

    async def _connect(self) -> Link:
        """A new link, connected and subscribed to the desired streams."""
        link = self._new_link()
        self.state = "connecting"
        await self.source.connect_attempt()
        await self._emit("connecting", {"url": link.url}, link.connection_id)
        self._open_links.add(link)
        try:
            await link.open()
        except BaseException:
            await self._close(link)
            raise
        metrics.connection_opened(self.source.exchange, reconnect=self.connects > 1)
        await self._emit("connected", {"url": link.url}, link.connection_id)
        self.state = "subscription-requesting"
        if not await link.subscribe(self.desired) and link.ended.done():
            await self._close(link)
            raise link.ended.result()
        return link

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                link = await self._connect()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, aiohttp.ClientError, LinkEnded) as exc:
                await self._down(f"connect failed: {type(exc).__name__}: {exc}", shutdown=False, lasted=0.0)
                continue
            await self._up(link)
            ended = await self._live(link)
            metrics.connection_closed(self.source.exchange)
            await self._down(ended.reason, ended.shutdown, time.monotonic() - started)

    async def _up(self, link: Link) -> None:
        """The link is live: REST fallback stops, klines missed while down are fetched once."""
        await self._stop_fallback()
        down_since = self._down_since
        link.marking = False
        self.link = link
        self.state = "connected"
        self.last_error = None
        self._down_since = None
        self.source.stream_changed(self.group.key, self.trade_symbols(), down=False)
        if down_since is not None:
            infos = self.source.stream_infos(self.desired)
            for info in infos:
                if info.data_type.kind == "kline" and info.data_type.interval:
                    await self.group.rest.klines(info.instrument, info.data_type.interval, down_since)
            await self._emit("backfill", {"downSince": down_since, "streams": len(infos)}, link.connection_id)
        if not link.ended.done():
            await self._reconcile(link)  # streams may have changed while it connected

    async def _live(self, link: Link) -> LinkEnded:
        """Wait for the link to end, replacing it when it stalls or nears the exchange's lifetime."""
        lifetime = self.source.lifetime
        while True:
            remaining = None if lifetime is None else max(0.0, lifetime - (time.monotonic() - link.opened_at))
            stalled: asyncio.Future[Any] = asyncio.ensure_future(link.stalled.wait())
            watched: set[asyncio.Future[Any]] = {link.ended, stalled}
            try:
                await asyncio.wait(watched, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stalled.cancel()
            if link.ended.done():
                ended = link.ended.result()
                await self._close(link)
                self.link = None
                return ended
            reason = "stall" if link.stalled.is_set() else "rollover"
            replacement = await self._replace(link, reason)
            if replacement is None:
                if reason == "rollover":
                    link.opened_at += ROLLOVER_RETRY  # try again later; the old link still works
                else:
                    link.stalled.clear()  # no replacement now: it is watched again
            else:
                link = replacement

    async def _replace(self, old: Link, reason: str) -> Link | None:
        """Make-before-break: subscribe a new link, let it see trades, then close the old one. Trades
        both carried are dropped as repeats downstream; any the old one missed are repaired there."""
        try:
            new = await self._connect()
        except (OSError, TimeoutError, aiohttp.ClientError, LinkEnded) as exc:
            log.warning("%s: %s replacement connection failed: %r", self.name, reason, exc)
            self.state = "connected"
            return None
        trade_symbols = set(self.trade_symbols())
        deadline = time.monotonic() + REPLACEMENT_WAIT_FOR_TRADES
        # A stalled link brings nothing more: only wait for the new one's first frames.
        while (
            not (trade_symbols <= new.first_live.keys() if reason == "rollover" else new.last_received_at)
            and time.monotonic() < deadline
            and not new.ended.done()
        ):
            new.trade_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    new.trade_seen.wait(), min(0.1, max(0.01, deadline - time.monotonic()))
                )
        await self._close(old)
        metrics.connection_closed(self.source.exchange)
        new.marking = False
        self.link = new
        self.state = "connected"
        if reason == "stall":
            self.stalls += 1
        else:
            self.rollovers += 1
        await self._emit("rollover", {"replaced": old.connection_id, "reason": reason}, new.connection_id)
        return new

    async def _down(self, reason: str, shutdown: bool, lasted: float) -> None:
        self.state = "recovering"
        self.last_error = reason
        self.link = None
        metrics.connection_failed(self.source.exchange)
        if self._down_since is None:
            self._down_since = now_ms()
            self.source.stream_changed(self.group.key, self.trade_symbols(), down=True)
        self._start_fallback()
        self.backoff.connection_lasted(lasted)
        delay = 0.0 if shutdown else self.backoff.next_delay()
        log.warning("%s lost (%s); reconnecting in %.1f s", self.name, reason, delay)
        kind = "server-shutdown" if shutdown else "stale" if reason == "stale" else "disconnected"
        if kind != "disconnected":
            await self._emit(kind, {"silentFor": self.source.silence_timeout} if kind == "stale" else {})
        await self._emit("disconnected", {"reason": reason, "retryIn": round(delay, 3)})
        await asyncio.sleep(delay)

    def _start_fallback(self) -> None:
        if self._fallback is not None or not self.source.adapter.rest_history or self._down_since is None:
            return
        stop = asyncio.Event()
        infos = self.source.stream_infos(self.desired)
        task = asyncio.create_task(poll_while_down(self.group.rest, infos, self._down_since, stop))
        self._fallback = (task, stop)
        asyncio.create_task(self._emit("rest-fallback", {"active": True}))  # noqa: RUF006

    async def _stop_fallback(self) -> None:
        if self._fallback is None:
            return
        task, stop = self._fallback
        self._fallback = None
        stop.set()
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception:  # the poller's I/O boundary
            log.exception("%s: REST fallback failed", self.name)
        await self._emit("rest-fallback", {"active": False})

    def status(self) -> ConnectionStatus:
        link = self.link
        return ConnectionStatus(
            name=self.name,
            state=self.state,
            connection_id=link.connection_id if link else None,
            streams=len(self.desired),
            subscribed=len(link.subscribed) if link else 0,
            connects=self.connects,
            rollovers=self.rollovers,
            rest_fallback=self._fallback is not None,
            last_error=self.last_error,
            stalls=self.stalls,
        )


class Group:
    """A connection group: its slots and the REST writer its history requests go through."""

    def __init__(self, key: str, rest: RestWriter) -> None:
        self.key = key
        self.rest = rest
        self.slots: list[Slot] = []
