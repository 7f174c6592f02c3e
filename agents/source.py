"""Source agents: exchange WebSocket (and REST) I/O → `raw.<exchange>`.

`ExchangeSource` runs one exchange's connection groups on this worker. A group (key `binance:3`)
carries a set of streams over one or more connection slots of at most `streamsPerConnection` streams
each; `assign_group` changes the set on the live connections with paced SUBSCRIBE/UNSUBSCRIBE and
reconnects nothing. Each slot:

- connects through a per-exchange attempt limiter shared by all its connections (no storms) with
  backoff 1 s doubling to 30 s, jittered, reset after a stable minute; `serverShutdown` reconnects
  at once;
- replaces a connection that stalled (silent far longer than its own recent pace) make-before-break,
  and recycles one silent for `connections.silenceTimeoutSeconds` whatever its pace;
- rolls over before the exchange's connection lifetime, make-before-break;
- while down, polls tickers and klines over REST within the exchange's limits, and tells the
  continuity engine its trade streams are down (the engine polls their history meanwhile).

Trades are not tracked here: the continuity engine downstream of the raw topic sees every gap, and its
history requests come back to the source running the group (`fetch_history`), whose answers go into
the group's raw partition like its frames. Order book snapshots the engine asks for (`FetchSnapshot`)
take the same way: the engine paces them (a few out at once), the REST client spends the weight budget
one request at a time, and the answer lands in the raw partition in order with the diffs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from mode import Service

from agents import metrics
from agents.backfill import RestWriter, StreamInfo
from agents.connection import FlushClock, FrameBatcher, SendRaw, now_ms, wait_until_allowed
from agents.rest import RestClient
from agents.slot import ConnectionStatus, Group, Slot
from streams.config import ExchangeConfig
from streams.continuity import FetchRequest, FetchSnapshot, FetchTrades
from streams.events import CollectorEvent
from streams.exchanges.base import DataType, ExchangeAdapter, Instrument
from streams.limits import Backoff, SlidingWindow, connect_window

__all__ = [
    "Backoff",
    "ConnectionStatus",
    "ExchangeSource",
    "FrameBatcher",
    "GroupStatus",
    "now_ms",
]

log = logging.getLogger(__name__)

EmitEvent = Callable[[CollectorEvent], Awaitable[None]]
AdapterGetter = Callable[[], Awaitable[ExchangeAdapter]]
# (group, trade symbols, down) → the continuity engine; (symbol, request id, retry after ms) → the same
StreamChanged = Callable[[str, list[str], bool], None]
HistoryRefused = Callable[[str, str, int], None]

ROLLOVER_MARGIN = 15 * 60.0  # roll over this long before the exchange's connection lifetime ends


@dataclass
class GroupStatus:
    group: str
    streams: int
    connections: list[ConnectionStatus] = field(default_factory=list)


class ExchangeSource(Service):
    """Runs this worker's connection groups of one exchange."""

    def __init__(
        self,
        exchange: str,
        settings: ExchangeConfig,
        get_adapter: AdapterGetter,
        send_raw: SendRaw,
        emit_event: EmitEvent,
        on_stream: StreamChanged | None = None,
        on_refused: HistoryRefused | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.exchange = exchange
        self.settings = settings
        self._get_adapter = get_adapter
        self.send_raw = send_raw
        # One flush for the frames of all the source's links.
        self.flush_clock = FlushClock(quiet_interval=settings.connections.quietFlushMs / 1000)
        self._emit_event = emit_event
        self._on_stream = on_stream
        self._on_refused = on_refused
        self._history_tasks: set[asyncio.Task[None]] = set()
        # Symbol → the latest snapshot request for it, while one is being fetched (asked once at a time).
        self._snapshots: dict[str, str] = {}
        self._depth_symbols: frozenset[str] | None = None  # symbols with a depth stream in a running group
        self._groups: dict[str, Group] = {}
        self._changes = asyncio.Lock()
        self._attempt_lock = asyncio.Lock()
        self._attempts: SlidingWindow | None = None
        self._adapter: ExchangeAdapter | None = None
        self._rest: RestClient | None = None
        self._stream_index: dict[str, tuple[Instrument, DataType]] = {}
        self._stream_index_size = -1
        connections = settings.connections
        self.silence_timeout = connections.silenceTimeoutSeconds
        self._lifetime_setting = connections.lifetimeSeconds

    # -- shared per exchange ----------------------------------------------------------------------

    @property
    def adapter(self) -> ExchangeAdapter:
        assert self._adapter is not None, "ExchangeSource used before its adapter was loaded"
        return self._adapter

    @property
    def rest(self) -> RestClient:
        assert self._rest is not None
        return self._rest

    @property
    def lifetime(self) -> float | None:
        if self._lifetime_setting is not None:
            return self._lifetime_setting
        limit = self.adapter.limits.max_connection_lifetime_seconds
        return None if limit is None else max(60.0, limit - ROLLOVER_MARGIN)

    async def ready(self) -> ExchangeAdapter:
        if self._adapter is None:
            adapter = await self._get_adapter()
            if self._adapter is None:
                limits = adapter.limits
                self._attempts = connect_window(
                    limits.max_connection_attempts, limits.connection_attempt_window_seconds
                )
                self._rest = RestClient(adapter, self.settings.restEndpoint, self._throttled)
                self._adapter = adapter
        return self.adapter

    async def connect_attempt(self) -> None:
        """Wait until one more connection attempt fits the exchange's per-IP limit, and count it."""
        assert self._attempts is not None
        attempts = self._attempts
        async with self._attempt_lock:
            await wait_until_allowed(lambda: attempts.delay(time.monotonic()))
            attempts.record(time.monotonic())

    async def emit(self, kind: str, detail: dict[str, Any], connection_id: str | None = None) -> None:
        event = CollectorEvent(
            type=kind, exchange=self.exchange, time=now_ms(), connection_id=connection_id, detail=detail
        )
        try:
            await self._emit_event(event)
        except Exception:  # events are best effort; the data path must not stop for them
            log.exception("could not emit %s event", kind)

    async def _throttled(self, status: int, retry_after: float) -> None:
        await self.emit("rest-throttled", {"status": status, "retryAfter": retry_after})

    def stream_infos(self, streams: Collection[str]) -> list[StreamInfo]:
        """What each stream is (symbol and data type); streams this worker cannot name are left out."""
        adapter = self.adapter
        if self._stream_index_size != len(adapter.instruments):  # built once per instrument list
            self._stream_index = {
                adapter.stream_name(instrument, data_type): (instrument, data_type)
                for data_type in self._data_types()
                for instrument in adapter.instruments.values()
            }
            self._stream_index_size = len(adapter.instruments)
        index = self._stream_index
        return [StreamInfo(name, *index[name]) for name in sorted(streams) if name in index]

    def _data_types(self) -> list[DataType]:
        kinds = {str(dt): dt for dt in self.settings.data_types}
        # Data types a runtime subscription may add without them being configured (klines aside).
        for kind in ("trade", "ticker", "bbo", "depth"):
            data_type = DataType.parse(kind)
            if self.adapter.supports(data_type):
                kinds.setdefault(kind, data_type)
        return list(kinds.values())

    # -- the interface ownership uses -------------------------------------------------------------

    async def assign_group(self, group: str, streams: Collection[str]) -> None:
        """Run `group` carrying exactly `streams`, changing live connections in place."""
        await self.ready()
        async with self._changes:
            running = self._groups.get(group)
            if running is None:
                number = group.rsplit(":", 1)[-1]
                rest = RestWriter(
                    self.adapter, self.rest, group, f"{self.exchange}-{number}-rest", self.send_raw
                )
                running = self._groups[group] = Group(group, rest)
            await self._place(running, set(streams))
            self._depth_symbols = None

    async def _place(self, group: Group, streams: set[str]) -> None:
        per_connection = min(
            self.settings.connections.streamsPerConnection, self.adapter.limits.max_streams_per_connection
        )
        wanted: dict[Slot, set[str]] = {slot: slot.desired & streams for slot in group.slots}
        placed = set().union(*wanted.values()) if wanted else set()
        routes = self._routes(streams - placed)
        for stream, route in routes.items():
            slot = next(
                (s for s, chosen in wanted.items() if s.route == route and len(chosen) < per_connection), None
            )
            if slot is None:
                if self._connection_count() >= self.settings.connections.max:
                    log.error(
                        "%s: connections.max (%d) reached; %s not carried",
                        group.key,
                        self.settings.connections.max,
                        stream,
                    )
                    await self.emit(
                        "subscribe-failed",
                        {"group": group.key, "streams": [stream], "message": "connections.max reached"},
                    )
                    continue
                slot = self._new_slot(group, route)
                wanted[slot] = set()
            wanted[slot].add(stream)
        for slot, chosen in wanted.items():
            if not chosen:
                group.slots.remove(slot)
                await slot.stop()
                continue
            await slot.set_streams(chosen)
            if not slot.started:
                slot.start()

    def _new_slot(self, group: Group, route: str) -> Slot:
        number = group.key.rsplit(":", 1)[-1]
        index = len(group.slots)
        name = f"{self.exchange}-{number}" + (f".{index}" if index else "")
        while any(s.name == name for s in group.slots):
            index += 1
            name = f"{self.exchange}-{number}.{index}"
        slot = Slot(self, group, name, route)
        group.slots.append(slot)
        return slot

    def _routes(self, streams: Collection[str]) -> dict[str, str]:
        infos = {info.name: info for info in self.stream_infos(streams)}
        default = self.adapter.route(DataType.parse("trade"))
        return {s: self.adapter.route(infos[s].data_type) if s in infos else default for s in sorted(streams)}

    def _connection_count(self) -> int:
        return sum(len(group.slots) for group in self._groups.values())

    async def release_group(self, group: str) -> None:
        """Stop the group's connections, writing what they had received."""
        async with self._changes:
            running = self._groups.pop(group, None)
            self._depth_symbols = None
            if running is not None:
                for slot in running.slots:
                    await slot.stop()

    async def recycle(self, group: str, connector: str | None, reason: str) -> list[str]:
        """Close and reopen the group's connections now (only `connector`'s when named): a recovery order.

        Each slot restarts through its normal connect path, so it waits for the exchange's attempt
        limiter and backfills what it missed before the new connection's frames go through; a slot
        sleeping out a backoff or stuck in a handshake starts over at once. Returns the connectors
        restarted: none when this worker does not run the group or the group has no such connector.
        """
        async with self._changes:
            running = self._groups.get(group)
            if running is None:
                return []
            slots = [slot for slot in running.slots if connector in (None, slot.name)]
            for slot in slots:
                link = slot.link
                if link is not None:
                    # The slot counts a link closed only when the link ends by itself.
                    metrics.connection_closed(self.exchange)
                    detail = {"connector": slot.name, "group": group, "reason": f"recovery ordered: {reason}"}
                    await self.emit("disconnected", {**detail, "retryIn": 0}, link.connection_id)
                log.warning("%s: recycling on a recovery order (%s)", slot.name, reason)
                await slot.stop()
                slot.start()
            return [slot.name for slot in slots]

    def frames_heard(self) -> dict[str, int]:
        """Connector → epoch ms of the newest frame its live link passed on (links still held for a
        backfill are not live yet). Tells a silent connection from records stuck behind it."""
        heard = {}
        for group in self._groups.values():
            for slot in group.slots:
                at = slot.link.last_received_at if slot.link is not None else None
                if at is not None:
                    heard[slot.name] = at
        return heard

    def groups(self) -> dict[str, GroupStatus]:
        return {
            key: GroupStatus(key, sum(len(s.desired) for s in group.slots), [s.status() for s in group.slots])
            for key, group in self._groups.items()
        }

    # -- the continuity engine's side -------------------------------------------------------------

    def stream_changed(self, group: str, symbols: list[str], down: bool) -> None:
        if self._on_stream is not None and symbols:
            self._on_stream(group, symbols, down)

    def carries_depth(self, symbol: str) -> bool:
        """Whether a group running here carries the symbol's order book stream (its books are kept)."""
        if self._adapter is None:
            return False  # no group runs before the instrument list is loaded
        if self._depth_symbols is None:
            desired = [
                stream for group in self._groups.values() for slot in group.slots for stream in slot.desired
            ]
            self._depth_symbols = frozenset(
                info.instrument.symbol
                for info in self.stream_infos(desired)
                if info.data_type.kind == "depth"
            )
        return symbol in self._depth_symbols

    def fetch_history(self, command: FetchRequest) -> None:
        """Carry out a history (or order book snapshot) request of the continuity engine, if this
        worker runs its group (when it does not, the engine asks again later, of whoever runs it then)."""
        if isinstance(command, FetchSnapshot):
            self.fetch_snapshot(command)
            return
        running = self._groups.get(command.group)
        instrument = self._adapter.by_symbol.get(command.symbol) if self._adapter is not None else None
        if running is None or instrument is None:
            log.debug("history for %s not fetched: %s is not run here", command.symbol, command.group)
            return
        request = self.adapter.history_request(instrument, command.from_id, command.cursor)
        task = asyncio.ensure_future(self._history(running, command, request))
        self._history_tasks.add(task)
        task.add_done_callback(self._history_tasks.discard)

    def fetch_snapshot(self, command: FetchSnapshot) -> None:
        """Fetch the order book the engine asks for; its answer goes into the group's raw partition,
        tagged with the request id. One fetch per symbol at a time: a repeated request (the engine's
        timeout while the budget held the first one back) is answered by the fetch already running."""
        symbol = command.symbol
        running = self._groups.get(command.group)
        instrument = self._adapter.by_symbol.get(symbol) if self._adapter is not None else None
        if running is None or instrument is None or self.adapter.depth is None:
            log.debug("snapshot of %s not fetched: %s is not run here", symbol, command.group)
            if self._on_refused is not None:  # soon, not from inside the engine's own step
                asyncio.get_running_loop().call_soon(self._on_refused, symbol, command.request_id, 0)
            return
        fetching = symbol in self._snapshots
        self._snapshots[symbol] = command.request_id
        if fetching:
            return
        request = self.adapter.depth_snapshot_request(instrument)
        task = asyncio.ensure_future(self._snapshot(running, symbol, request))
        self._history_tasks.add(task)
        task.add_done_callback(self._history_tasks.discard)

    async def _snapshot(self, group: Group, symbol: str, request: Any) -> None:
        try:
            answer = await group.rest.fetch(request, self._snapshots[symbol])
        except Exception:  # the REST/broker boundary: the engine asks again
            log.exception("order book snapshot of %s failed", symbol)
            answer = None
        request_id = self._snapshots.pop(symbol)
        if (answer is None or answer.body is None) and self._on_refused is not None:
            retry_after_ms = int(answer.retry_after * 1000) if answer is not None else 0
            self._on_refused(symbol, request_id, retry_after_ms)

    async def _history(self, group: Group, command: FetchTrades, request: Any) -> None:
        try:
            answer = await group.rest.fetch(request, command.request_id)
        except Exception:  # the REST/broker boundary: the engine asks again
            log.exception("history request %s for %s failed", command.request_id, command.symbol)
            answer = None
        if (answer is None or answer.body is None) and self._on_refused is not None:
            retry_after_ms = int(answer.retry_after * 1000) if answer is not None else 0
            self._on_refused(command.symbol, command.request_id, retry_after_ms)

    async def on_stop(self) -> None:
        for task in list(self._history_tasks):
            task.cancel()
        for key in list(self._groups):
            await self.release_group(key)
        if self._rest is not None:
            await self._rest.close()
