"""A connection slot of a group: a succession of WebSocket links, plus REST while none is live.

The slot owns its recovery: backoff, REST fallback while down, backfill on every new link before its
frames are let through, rollover before the exchange's connection lifetime. agents/source.py explains
the whole; `ExchangeSource` provides what slots of one exchange share (limits, REST client, sink).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import websockets

from agents import metrics
from agents.backfill import FallbackCounts, RestFiller, TradeFetch, poll_while_down
from agents.connection import Link, LinkEnded, now_ms
from streams.limits import Backoff
from streams.rest import trade_gap

if TYPE_CHECKING:
    from agents.source import ExchangeSource

log = logging.getLogger(__name__)

ROLLOVER_WAIT_FOR_TRADES = 5.0  # how long the new link may take to see a trade on every symbol
ROLLOVER_RETRY = 60.0
BACKFILL_DEADLINE = 120.0  # a recovery releases its held frames after this even if REST is refused
STABLE_AFTER = 60.0


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
        self.last_error: str | None = None
        self.backoff = Backoff(stable_after=STABLE_AFTER)
        self._lock = asyncio.Lock()  # one subscription change at a time per slot
        self._task: asyncio.Task[None] | None = None
        self._fallback: tuple[asyncio.Task[None], asyncio.Event, FallbackCounts] | None = None
        self._down_since: int | None = None
        self._down_last: dict[str, int] = {}
        self._open_links: set[Link] = set()  # every link not yet closed, live or still being set up
        self.filler = RestFiller(
            source.adapter, source.rest, group.key, f"{name}-rest", source.send_raw, group.last_seen
        )

    # -- control from the group -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"slot-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
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
            on_trade=self.group.saw_trade,
            held=True,
        )

    async def _connect(self) -> Link:
        """A new link, connected and subscribed to the desired streams, its frames held."""
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
            except (OSError, TimeoutError, websockets.WebSocketException, LinkEnded) as exc:
                await self._down(f"connect failed: {type(exc).__name__}: {exc}", shutdown=False, lasted=0.0)
                continue
            await self._recover(link)
            ended = await self._live(link)
            metrics.connection_closed(self.source.exchange)
            await self._down(ended.reason, ended.shutdown, time.monotonic() - started)

    async def _recover(self, link: Link) -> None:
        """Stop REST polling, backfill what the new link missed, then let its frames through."""
        counts = await self._stop_fallback()
        down_last = self._down_last if self._down_since is not None else dict(self.group.last_seen)
        await self._backfill(link, down_last, counts)
        await link.release()
        self.link = link
        self.state = "connected"
        self.last_error = None
        self._down_since = None
        if link.ended.done():
            return
        # Streams may have changed while it connected.
        await self._reconcile(link)

    async def _backfill(
        self, link: Link, down_last: Mapping[str, int], counts: FallbackCounts | None
    ) -> None:
        deadline = time.monotonic() + BACKFILL_DEADLINE
        infos = self.source.stream_infos(self.desired)
        for info in infos:
            if info.data_type.kind != "trade":
                continue
            symbol = info.instrument.symbol
            first_live = link.first_live.get(symbol)
            before = self.group.last_seen.get(symbol)
            if trade_gap(before, first_live) is None:
                fetched = TradeFetch(complete=True)
            else:
                fetched = await self.filler.trades(info.instrument, first_live, deadline)
            last_before_down = down_last.get(symbol)
            gap = trade_gap(last_before_down, first_live)
            if gap is None:
                continue
            missing_through = (
                gap.last_missing if gap.last_missing >= 0 else self.group.last_seen.get(symbol, -1)
            )
            size = missing_through - gap.first_missing + 1
            if size <= 0:
                continue
            by_fallback = counts.trades.get(symbol, 0) if counts else 0
            await self._emit(
                "gap",
                {
                    "symbol": symbol,
                    "firstMissing": gap.first_missing,
                    "lastMissing": missing_through,
                    "size": size,
                    "filledByRestFallback": by_fallback,
                    "filledByBackfill": fetched.fetched,
                    "backfillRequests": fetched.requests,
                    "complete": fetched.complete,
                    "lastSeenBeforeBackfill": before,
                    "firstLive": first_live,
                },
                link.connection_id,
            )
        if self._down_since is not None:
            for info in infos:
                if info.data_type.kind == "kline" and info.data_type.interval:
                    await self.filler.klines(info.instrument, info.data_type.interval, self._down_since)
            await self._emit(
                "backfill", {"downSince": self._down_since, "streams": len(infos)}, link.connection_id
            )

    async def _live(self, link: Link) -> LinkEnded:
        """Wait for the link to end, rolling it over before the exchange's lifetime limit."""
        lifetime = self.source.lifetime
        while True:
            remaining = None if lifetime is None else max(0.0, lifetime - (time.monotonic() - link.opened_at))
            done, _ = await asyncio.wait({link.ended}, timeout=remaining)
            if done:
                ended = link.ended.result()
                await self._close(link)
                self.link = None
                return ended
            replacement = await self._rollover(link)
            if replacement is None:
                link.opened_at += ROLLOVER_RETRY  # try again later; the old link still works
            else:
                link = replacement

    async def _rollover(self, old: Link) -> Link | None:
        """Make-before-break: subscribe a new link, wait until it sees trades, then close the old one."""
        try:
            new = await self._connect()
        except (OSError, TimeoutError, websockets.WebSocketException, LinkEnded) as exc:
            log.warning("%s: rollover connection failed: %r", self.name, exc)
            self.state = "connected"
            return None
        trade_symbols = {
            i.instrument.symbol for i in self.source.stream_infos(self.desired) if i.data_type.kind == "trade"
        }
        deadline = time.monotonic() + ROLLOVER_WAIT_FOR_TRADES
        while not trade_symbols <= new.first_live.keys() and time.monotonic() < deadline:
            new.trade_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(new.trade_seen.wait(), max(0.01, deadline - time.monotonic()))
        await self._close(old)
        metrics.connection_closed(self.source.exchange)
        await self._backfill(new, dict(self.group.last_seen), None)
        await new.release()
        self.link = new
        self.state = "connected"
        self.rollovers += 1
        await self._emit("rollover", {"replaced": old.connection_id}, new.connection_id)
        return new

    async def _down(self, reason: str, shutdown: bool, lasted: float) -> None:
        self.state = "recovering"
        self.last_error = reason
        self.link = None
        metrics.connection_failed(self.source.exchange)
        if self._down_since is None:
            self._down_since = now_ms()
            self._down_last = dict(self.group.last_seen)
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
        counts = FallbackCounts()
        infos = self.source.stream_infos(self.desired)
        task = asyncio.create_task(poll_while_down(self.filler, infos, self._down_since, stop, counts))
        self._fallback = (task, stop, counts)
        asyncio.create_task(self._emit("rest-fallback", {"active": True}))  # noqa: RUF006

    async def _stop_fallback(self) -> FallbackCounts | None:
        if self._fallback is None:
            return None
        task, stop, counts = self._fallback
        self._fallback = None
        stop.set()
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception:  # the poller's I/O boundary: its results so far still count
            log.exception("%s: REST fallback failed", self.name)
        await self._emit(
            "rest-fallback",
            {"active": False, "requests": counts.requests, "trades": sum(counts.trades.values())},
        )
        return counts

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
        )


class Group:
    """A connection group: its slots and the last trade id seen per symbol."""

    def __init__(self, key: str, last_seen: dict[str, int]) -> None:
        self.key = key
        self.last_seen = last_seen
        self.slots: list[Slot] = []

    def saw_trade(self, symbol: str, trade_id: int) -> None:
        if trade_id > self.last_seen.get(symbol, -1):
            self.last_seen[symbol] = trade_id
