"""State agents, the flow reporter, the manager, and the /metrics view.

- `state.events` applies `collector.events` to the coin, connector and collector tables.
- `state.flow` applies the normalize agents' per-coin flow summaries (`collector.flow`).
- `state.alerts` keeps the open and recent alerts (`collector.alerts`).
- Every worker reports its normalize agents' flow every FLOW_INTERVAL seconds.
- The manager runs on the leader: it orders recovery of stuck connectors and raises alerts (log,
  metric, topic, webhook). An order is a `recover-requested` event for operators plus a
  RecoveryCommand on the group's partition of `collector.commands`, which the control agent of the
  worker running the group carries out (agents/control.py).

The composition root (agents/worker.py) builds a `StateAgents` and calls `install_state`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import faust
import msgspec
from faust import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from agents import metrics
from streams.commands import RecoveryCommand, encode_command
from streams.config import CollectorConfig
from streams.events import CollectorEvent, decode_event, encode_event
from streams.exchanges.base import ExchangeAdapter
from streams.topics import COMMANDS
from tables.manager import Decisions, ManagerSettings, apply_alert, evaluate, recovery_command
from tables.records import Alert, decode_alert, decode_flow, encode
from tables.state import COIN_STATES, CONNECTOR_STATES, Changes, apply_event, apply_flow, stream_index
from tables.store import RECENT_ALERTS, StateStore, rows
from tables.subscription_rules import group_partition
from tables.subscriptions import Subscriptions

log = logging.getLogger(__name__)

FLOW_INTERVAL = 2.0  # seconds between a worker's flow summaries
MANAGER_INTERVAL = 1.0
WEBHOOK_TIMEOUT = 5.0

AdapterGetter = Callable[[str], Awaitable[ExchangeAdapter]]
StreamIndex = tuple[tuple[int, int], dict[str, str]]  # (adapter version, stream name → symbol)
ADAPTER_WAIT = 1.0  # seconds an event waits for its exchange's adapter before going without coin names
FramesHeard = Mapping[str, Callable[[], dict[str, int]]]  # exchange → its source's `frames_heard`


def _no_stream(stream: str) -> str | None:
    return None


class StateAgents:
    """Applies events, flow and alerts to the state tables; reports this worker's flow."""

    def __init__(
        self,
        config: CollectorConfig,
        store: StateStore,
        adapters: AdapterGetter | None,
        frames_heard: FramesHeard,
    ) -> None:
        self.config = config
        self.store = store
        # The worker's adapters name the coins of events that list streams; a worker that collects
        # nothing has none.
        self._adapters = adapters
        self._frames_heard = frames_heard
        self._stream_symbols: dict[str, StreamIndex] = {}
        self._said_unnamed: set[str] = set()
        self._sampler = metrics.ProcessSampler()

    async def _stream_resolver(self, exchange: str) -> Callable[[str], str | None]:
        if self._adapters is None or exchange not in self.config.exchanges:
            return _no_stream
        try:
            # The adapter exists long before a connection emits events; if its instrument list cannot
            # be loaded, the state agent must not stall behind it.
            adapter = await asyncio.wait_for(self._adapters(exchange), ADAPTER_WAIT)
        except TimeoutError:
            # Said once per exchange: while the exchange is unreachable every event would repeat it.
            if exchange not in self._said_unnamed:
                self._said_unnamed.add(exchange)
                log.info("state: events of %s name no coins until its instrument list is loaded", exchange)
            return _no_stream
        # Rebuilt when the adapter changes or learns instruments (runtime subscriptions).
        version = (id(adapter), len(adapter.instruments))
        cached = self._stream_symbols.get(exchange)
        if cached is None or cached[0] != version:
            cached = self._stream_symbols[exchange] = (version, stream_index(adapter))
        return cached[1].get

    def _write(self, changes: Changes) -> None:
        store = self.store
        for key, row in changes.coins.items():
            store.coins[key] = row
        for key, row in changes.connectors.items():
            store.connectors[key] = row
        for key, row in changes.collectors.items():
            store.collectors[key] = row

    async def track_events(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                decoded = decode_event(event.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("state: ignoring an undecodable collector event at offset %s: %s",
                            event.message.offset, exc)  # fmt: skip
                continue
            resolver = await self._stream_resolver(decoded.exchange)
            self._write(apply_event(decoded, event.message.offset, self.store.current_tables(), resolver))

    async def track_flow(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                summary = decode_flow(event.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("state: ignoring an undecodable flow summary at offset %s: %s",
                            event.message.offset, exc)  # fmt: skip
                continue
            self._write(apply_flow(summary, event.message.offset, self.store.current_tables()))

    async def track_alerts(self, stream: Any) -> None:
        async for value in stream:
            try:
                alert = decode_alert(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("state: ignoring an undecodable alert: %s", exc)
                continue
            recent = self.store.recent_alerts()
            if apply_alert(recent, alert):
                self.store.alerts[RECENT_ALERTS] = recent

    async def report_flow(self) -> None:
        process = self._sampler.sample()
        for exchange in self._frames_heard:
            metrics.flow_meter(exchange)  # a worker that only runs connections reports them too
        for meter in metrics.flow_meters():
            heard = self._frames_heard.get(meter.exchange)
            summary = meter.take_summary(self.store.worker, heard() if heard else None)
            if summary is not None:
                summary.process = process
                await self.store.flow_topic.send(key=summary.exchange.encode(), value=encode(summary))


# ---- the manager ------------------------------------------------------------------------------------


class Manager:
    """Remembers what it ordered and raised until the tables show it, so nothing is sent twice."""

    def __init__(
        self,
        settings: ManagerSettings,
        store: StateStore,
        emit: Callable[[CollectorEvent], Awaitable[None]],
        send_recovery: Callable[[RecoveryCommand], Awaitable[None]],
        webhook_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._emit = emit
        self._send_recovery = send_recovery
        self.webhook_url = webhook_url
        self.ordered: dict[str, int] = {}  # connector → when its recovery was last ordered
        self.raised: dict[str, str] = {}  # alert key → status sent, until the alerts table shows it
        self._webhooks: set[asyncio.Task[None]] = set()

    def open_alert_keys(self) -> set[str]:
        recent = self.store.recent_alerts()
        open_keys = set(recent.get("open") or {})
        for key, status in list(self.raised.items()):
            if (status == "firing") == (key in open_keys):
                del self.raised[key]  # the table has caught up
            elif status == "firing":
                open_keys.add(key)
            else:
                open_keys.discard(key)
        return open_keys

    async def run_once(self, now: int) -> Decisions:
        decisions = evaluate(
            rows(self.store.coins),
            rows(self.store.connectors),
            self.open_alert_keys(),
            self.ordered,
            now,
            self.settings,
        )
        for order in decisions.recoveries:
            self.ordered[order.connector] = now
            metrics.RECOVERIES_REQUESTED.labels(order.exchange).inc()
            log.warning(
                "manager: ordering recovery %d of %s (%s)",
                order.attempt,
                order.connector,
                order.reason,
                extra={"connector": order.connector, "attempt": order.attempt},
            )
            detail = {"connector": order.connector, "attempt": order.attempt, "reason": order.reason}
            await self._emit(
                CollectorEvent(
                    type="recover-requested",
                    exchange=order.exchange,
                    time=now,
                    connection_id=order.connection_id,
                    detail=detail,
                )
            )
            command = recovery_command(order, now)
            if command is None:
                log.error("manager: %s names no connection group; no order sent", order.connector)
            else:
                await self._send_recovery(command)
        for connector in decisions.failed_connectors:
            reason = connector.get("lastError") or f"still {connector['state']}"
            await self._emit(
                CollectorEvent(
                    type="recovery-failed",
                    exchange=connector["exchange"],
                    time=now,
                    connection_id=connector.get("connectionId"),
                    detail={"connector": connector["connector"], "reason": reason},
                )
            )
        for alert in decisions.alerts:
            self.raised[alert.key] = alert.status
            await self.raise_alert(alert)
        return decisions

    async def raise_alert(self, alert: Alert) -> None:
        fields = {
            "alert": alert.kind,
            "alertKey": alert.key,
            "status": alert.status,
            "exchange": alert.exchange,
        }
        if alert.status == "firing":
            metrics.ALERTS.labels(alert.exchange, alert.kind).inc()
            log.warning("ALERT %s: %s", alert.kind, alert.message, extra=fields)
        else:
            log.info("resolved %s: %s", alert.kind, alert.message, extra=fields)
        await self.store.alerts_topic.send(key=alert.exchange.encode(), value=encode(alert))
        if self.webhook_url:
            task = asyncio.ensure_future(post_webhook(self.webhook_url, alert))
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)


async def post_webhook(url: str, alert: Alert) -> None:
    """POST the alert as JSON; a failing webhook is logged and never stops the manager."""
    try:
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=encode(alert), headers={"Content-Type": "application/json"}) as response,
        ):
            if response.status >= 300:
                log.warning("alert webhook %s answered HTTP %d", url, response.status)
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.warning("alert webhook %s failed: %r", url, exc)


def recovery_sender(
    app: faust.App, subscriptions: Subscriptions
) -> Callable[[RecoveryCommand], Awaitable[None]]:
    async def send_recovery(command: RecoveryCommand) -> None:
        """Produce the order to its group's partition, where the worker running the group reads it."""
        try:
            await subscriptions.topic.maybe_declare()
            await app.producer.send_and_wait(
                COMMANDS,
                command.group.encode(),
                encode_command(command),
                partition=group_partition(command.group),
                timestamp=None,
                headers=None,
            )
        except Exception:  # the broker boundary: the next manager round orders again
            log.exception("manager: could not send the recovery order for %s", command.connector)

    return send_recovery


def event_emitter(store: StateStore) -> Callable[[CollectorEvent], Awaitable[None]]:
    async def emit(event: CollectorEvent) -> None:
        metrics.event_emitted(event)
        await store.events_topic.send(key=event.exchange.encode(), value=encode_event(event))

    return emit


# ---- /metrics ---------------------------------------------------------------------------------------


def _coin_ages(store: StateStore) -> Callable[[], Iterator[tuple[list[str], float]]]:
    def samples() -> Iterator[tuple[list[str], float]]:
        if store.owns_state():
            now = metrics.now_ms()
            for row in rows(store.coins):
                if row.get("state") == "subscribed" and row.get("lastReceivedAt"):
                    yield [row["exchange"], row["symbol"]], max(now - row["lastReceivedAt"], 0) / 1000

    return samples


def _counted_states(
    store: StateStore, table: Any, states: tuple[str, ...], exchanges: Mapping[str, Any]
) -> Callable[[], Iterator[tuple[list[str], float]]]:
    def samples() -> Iterator[tuple[list[str], float]]:
        if not store.owns_state():
            return
        counts: dict[tuple[str, str], int] = {}
        seen = set(exchanges)
        for row in rows(table):
            seen.add(row["exchange"])
            counts[row["exchange"], row["state"]] = counts.get((row["exchange"], row["state"]), 0) + 1
        for exchange in sorted(seen):
            for state in states:
                yield [exchange, state], counts.get((exchange, state), 0)

    return samples


def install_state(app: faust.App, agents: StateAgents, manager: Manager) -> None:
    """The state agents, the flow timer, the leader's manager and /metrics on this worker."""
    store = agents.store
    app.agent(store.events_topic, name="state.events")(agents.track_events)
    app.agent(store.flow_topic, name="state.flow")(agents.track_flow)
    app.agent(store.alerts_topic, name="state.alerts")(agents.track_alerts)

    async def report_flow() -> None:
        await agents.report_flow()

    async def manage() -> None:
        await manager.run_once(metrics.now_ms())

    app.timer(FLOW_INTERVAL, name="state.report_flow")(report_flow)
    app.timer(MANAGER_INTERVAL, on_leader=True, name="state.manage")(manage)

    # Table-derived gauges come from the worker that owns the state only, so that summing over
    # workers works.
    exchanges = agents.config.exchanges
    metrics.register_computed(metrics.ComputedGauge(
        "collector_seconds_since_last_message",
        "Seconds since the last market record of a subscribed coin was received.",
        ("exchange", "symbol"), _coin_ages(store),
    ))  # fmt: skip
    metrics.register_computed(metrics.ComputedGauge(
        "collector_coins", "Coins in each state.", ("exchange", "state"),
        _counted_states(store, store.coins, COIN_STATES, exchanges),
    ))  # fmt: skip
    metrics.register_computed(metrics.ComputedGauge(
        "collector_connectors", "Connectors (connection groups) in each state.", ("exchange", "state"),
        _counted_states(store, store.connectors, CONNECTOR_STATES, exchanges),
    ))  # fmt: skip
    metrics.set_memory_limit()  # read once: the limit does not change while the worker runs

    if agents.config.monitoring.prometheus.enabled:

        @app.page("/metrics")
        class Metrics(web.View):
            async def get(self, request: web.Request) -> web.Response:
                return self.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
