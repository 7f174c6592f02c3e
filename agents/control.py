"""The control agent: `collector.commands` → subscription table → connection groups.

- `control.commands` validates each command (configured exchange, listed symbol, offered data
  types), applies it to the subscription table, and asks ownership to bring the group's connections
  in line. A bad command becomes a `subscribe-rejected` event with the reason, never a crash; a
  replayed one (same `commandId`) is skipped.
- At start every worker seeds the config's symbols x data types as commands (rule in
  tables/subscription_rules.py).
- Rebalance signals drive ownership (agents/ownership.py): the worker owning partition n runs group n.
- A recovery order from the manager (RecoveryCommand, on the group's partition) makes this worker,
  which runs the group, recycle the connector's connections at once; a `recovered` event follows
  when they are connected again, `recover-failed` when they are not within RECOVERY_WAIT seconds,
  when this worker does not run the group, or when the group has no such connector. An order older
  than RECOVERY_ORDER_MAX_AGE_MS (a replay after a restart) or seen before is skipped.

The composition root (agents/worker.py) builds a `Control` and calls `install_control`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import faust
import msgspec
from mode import BaseSignalT

from agents.ownership import GroupOwnership, exchange_of
from agents.source import ExchangeSource
from streams.commands import (
    RecoveryCommand,
    SubscriptionCommand,
    decode_control_command,
    recovery_order_expired,
)
from streams.config import ExchangeConfig
from streams.events import CollectorEvent
from streams.exchanges.base import ExchangeAdapter
from tables.subscription_rules import (
    RequestError,
    apply_command,
    check_request,
    group_partition,
    moved_row,
    row_key,
    seed_commands,
)
from tables.subscriptions import Subscriptions

log = logging.getLogger(__name__)

ADAPTER_WAIT_SECONDS = 3.0  # how long a subscribe command waits for its exchange's instrument list
RECOVERY_ORDER_MAX_AGE_MS = 30_000
RECOVERY_WAIT = 60.0  # seconds recycled connectors have to connect before the order counts as failed
RECOVERY_POLL = 0.2
RECENT_ORDERS = 1024  # command ids remembered to skip a replayed recovery order

AdapterGetter = Callable[[str], Awaitable[ExchangeAdapter]]
EmitEvent = Callable[[CollectorEvent], Awaitable[None]]


class RecyclingOwnership(GroupOwnership):
    """Group ownership that also carries out recovery orders on the groups this worker runs."""

    def _source(self, group: str) -> ExchangeSource | None:
        source = self._runners.get(exchange_of(group))
        return source if group in self.running and isinstance(source, ExchangeSource) else None

    async def recycle(self, group: str, connector: str, reason: str) -> list[str] | None:
        """The connectors restarted; None when this worker does not run the group."""
        source = self._source(group)
        return None if source is None else await source.recycle(group, connector, reason)

    def connector_states(self, group: str, connectors: Collection[str]) -> dict[str, str]:
        source = self._source(group)
        status = None if source is None else source.groups().get(group)
        if status is None:
            return {}
        return {c.name: c.state for c in status.connections if c.name in connectors}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(command: SubscriptionCommand) -> dict[str, Any]:
    return {
        "commandId": command.command_id,
        "action": command.action,
        "symbol": command.symbol,
        "dataTypes": command.data_types,
    }


def _describe_order(command: RecoveryCommand) -> dict[str, Any]:
    return {
        "connector": command.connector,
        "group": command.group,
        "attempt": command.attempt,
        "reason": command.reason,
        "commandId": command.command_id,
    }


class Control:
    """Applies this worker's share of `collector.commands` and runs the groups it owns."""

    def __init__(
        self,
        exchanges: Mapping[str, ExchangeConfig],
        subscriptions: Subscriptions,
        adapters: AdapterGetter,
        emit_event: EmitEvent,
    ) -> None:
        self.exchanges = exchanges
        self.subscriptions = subscriptions
        self._adapters = adapters
        self._emit = emit_event
        self.ownership = RecyclingOwnership(
            rows=subscriptions.current_rows, owned_partitions=subscriptions.owned_partitions, adapter=adapters
        )
        self._recent_orders: deque[str] = deque(maxlen=RECENT_ORDERS)
        self._recoveries: set[asyncio.Task[None]] = set()

    async def emit(self, kind: str, exchange: str, detail: dict[str, Any], symbol: str | None = None) -> None:
        event = CollectorEvent(type=kind, exchange=exchange, time=_now_ms(), symbol=symbol, detail=detail)
        try:
            await self._emit(event)
        except Exception:  # events are best effort; the command path must not stop for them
            log.exception("control: could not emit %s event", kind)

    async def reject(self, exchange: str, reason: str, detail: dict[str, Any]) -> None:
        log.warning("control: command rejected: %s (%s)", reason, detail)
        # The symbol goes in detail, not in `symbol`: the state tables must not grow a coin for it.
        await self.emit("subscribe-rejected", exchange, {"reason": reason, **detail})

    async def _listed_adapter(self, exchange: str) -> ExchangeAdapter | None:
        """The exchange's adapter, or None while its instrument list cannot be loaded (no internet): the
        agent must not hold its command, and with it the worker's shutdown, until the exchange answers."""
        try:
            return await asyncio.wait_for(self._adapters(exchange), ADAPTER_WAIT_SECONDS)
        except TimeoutError:
            return None

    async def validate(self, command: SubscriptionCommand) -> SubscriptionCommand:
        """The command with its symbol normalized; RequestError when it cannot be applied."""
        request = check_request(command.exchange, command.symbol, command.data_types, self.exchanges)
        if command.action == "subscribe":
            listed = await self._listed_adapter(command.exchange)
            if listed is None:
                # Applied unchecked: ownership subscribes only listed symbols once the list arrives,
                # and the adapter directory reports configured symbols the exchange does not list.
                log.info("control: %s has no instrument list yet; %s applied unchecked",
                         command.exchange, request.symbol)  # fmt: skip
            elif request.symbol not in listed.by_symbol:
                raise RequestError(f"{command.exchange} does not list {request.symbol}")
        return msgspec.structs.replace(command, symbol=request.symbol, data_types=request.data_types)

    async def handle(self, payload: bytes, partition: int) -> None:
        try:
            received = decode_control_command(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.reject(
                "unknown", f"malformed command: {exc}", {"payload": payload[:200].decode(errors="replace")}
            )
            return
        if isinstance(received, RecoveryCommand):
            await self.handle_recovery(received, partition)
            return
        try:
            command = await self.validate(received)
        except RequestError as exc:
            exchange = received.exchange if received.exchange in self.exchanges else "unknown"
            await self.reject(exchange, str(exc), _describe(received))
            return
        subscriptions = self.subscriptions
        group = subscriptions.command_group(command)
        if group_partition(group) != partition:
            # Produced by someone who did not pick the group's partition: its row must live there.
            log.info("control: moving command %s to the partition of %s", command.command_id, group)
            await subscriptions.send_command(command)
            return
        key = row_key(group, command.symbol)
        row = subscriptions.table.get(key)
        if row is None:
            earlier = subscriptions.earlier_row(command.exchange, command.symbol)
            row = None if earlier is None else moved_row(earlier, group)
        if row is None and command.action == "unsubscribe":
            await self.emit(
                "subscription-unchanged", command.exchange, {**_describe(command), "group": group}
            )
            return
        outcome = apply_command(row, command, group)
        if outcome.replayed:
            log.info("control: command %s was applied already; skipped", command.command_id)
            await self.emit(
                "subscription-unchanged",
                command.exchange,
                {
                    **_describe(command),
                    "group": group,
                    "subscribed": outcome.row["dataTypes"],
                    "replayed": True,
                },
            )
            return
        subscriptions.table[key] = outcome.row
        if outcome.changed:
            self.ownership.request_reconcile()
        await self.emit(
            "subscription-changed" if outcome.changed else "subscription-unchanged",
            command.exchange,
            {**_describe(command), "group": group, "subscribed": outcome.row["dataTypes"]},
            symbol=command.symbol if outcome.changed else None,
        )

    async def handle_recovery(self, command: RecoveryCommand, partition: int) -> None:
        """Start carrying out a recovery order; the command path does not wait for the reconnect."""
        if command.command_id in self._recent_orders:
            log.info("control: recovery order %s was carried out already; skipped", command.command_id)
            return
        if recovery_order_expired(command, _now_ms(), RECOVERY_ORDER_MAX_AGE_MS):
            log.info("control: recovery order %s is too old; skipped", command.command_id)
            return
        self._recent_orders.append(command.command_id)
        if command.group.rpartition(":")[2] != str(partition):
            error = f"sent to partition {partition}, not the group's"
            await self.emit("recover-failed", command.exchange, {**_describe_order(command), "error": error})
            return
        task = asyncio.ensure_future(self.carry_out_recovery(command))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def carry_out_recovery(self, command: RecoveryCommand) -> None:
        detail = _describe_order(command)
        ownership = self.ownership
        try:
            recycled = await ownership.recycle(command.group, command.connector, command.reason)
        except Exception as exc:  # the source boundary: the order failed, the manager orders again
            log.exception("control: recycling %s failed", command.connector)
            await self.emit("recover-failed", command.exchange, {**detail, "error": repr(exc)})
            return
        if not recycled:
            error = "not run by this worker" if recycled is None else "the group has no such connector"
            await self.emit("recover-failed", command.exchange, {**detail, "error": error})
            return
        started = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - started < RECOVERY_WAIT:
            states = ownership.connector_states(command.group, recycled)
            if states and all(state == "connected" for state in states.values()):
                took = round(time.monotonic() - started, 3)
                await self.emit(
                    "recovered", command.exchange, {**detail, "connectors": recycled, "seconds": took}
                )
                return
            await asyncio.sleep(RECOVERY_POLL)
        error = f"not connected within {RECOVERY_WAIT:.0f} s"
        await self.emit("recover-failed", command.exchange, {**detail, "error": error, "states": states})

    async def commands(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                await self.handle(event.value, event.message.partition)
            except Exception:  # the broker/source boundary: one failed command must not stop the agent
                log.exception("control: command at offset %s failed", event.message.offset)

    async def seed_subscriptions(self) -> None:
        """Seed the config's subscriptions; idempotent, so every worker does it at every start."""
        commands = seed_commands(
            {name: (settings.symbols, settings.dataTypes) for name, settings in self.exchanges.items()},
            _now_ms(),
        )
        started = time.monotonic()
        try:
            await self.subscriptions.send_commands(commands)
        except Exception:  # the broker boundary: a worker without seeds still serves what the table has
            log.exception("control: seeding the config's subscriptions failed")
            return
        log.info(
            "control: seeded %d subscriptions from the config in %.2f s",
            len(commands),
            time.monotonic() - started,
        )


def install_control(app: faust.App, control: Control) -> None:
    """The control agent, seeding, the ownership loop and its rebalance signals on this worker."""
    app.agent(control.subscriptions.topic, name="control.commands")(control.commands)
    ownership = control.ownership

    async def seed_subscriptions() -> None:
        await control.seed_subscriptions()

    async def run_ownership() -> None:
        await ownership.run()

    app.task(seed_subscriptions)
    app.task(run_ownership)

    async def on_revoked(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        ownership.on_revoked()

    async def on_assigned(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        await ownership.on_assigned()

    async def on_rebalance_complete(
        sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any
    ) -> None:
        ownership.on_recovered()

    app.on_partitions_revoked.connect(on_revoked)
    app.on_partitions_assigned.connect(on_assigned)
    app.on_rebalance_complete.connect(on_rebalance_complete)
