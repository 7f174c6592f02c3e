"""The control agent: `collector.commands` → subscription table → connection groups.

- `control.commands` validates each command (configured exchange, listed symbol, offered data
  types), applies it to the subscription table, and asks ownership to bring the group's connections
  in line. A bad command becomes a `subscribe-rejected` event with the reason, never a crash; a
  replayed one (same `commandId`) is skipped.
- At start every worker seeds the config's symbols x data types as commands (rule in
  tables/subscription_rules.py).
- Rebalance signals drive ownership (agents/ownership.py): the worker owning partition n runs group n.

agents/pipeline.py calls `use()` with the worker's adapters and event emitter, and attaches each
exchange source to `ownership`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from mode import BaseSignalT

from agents.ownership import GroupOwnership
from streams.app import app, config
from streams.commands import SubscriptionCommand, decode_command
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
from tables.subscriptions import (
    command_group,
    commands_topic,
    current_rows,
    earlier_row,
    owned_partitions,
    send_command,
    subscriptions,
    use_group_report,
)

log = logging.getLogger(__name__)

ADAPTER_RETRY_SECONDS = 5.0

AdapterGetter = Callable[[str], Awaitable[ExchangeAdapter]]
EmitEvent = Callable[[CollectorEvent], Awaitable[None]]
_adapters: AdapterGetter | None = None
_emit: EmitEvent | None = None


def use(adapters: AdapterGetter, emit: EmitEvent) -> None:
    global _adapters, _emit
    _adapters, _emit = adapters, emit


async def adapter(exchange: str) -> ExchangeAdapter:
    if _adapters is None:
        raise RuntimeError("agents.control.use() was not called: no adapters")
    return await _adapters(exchange)


ownership = GroupOwnership(rows=current_rows, owned_partitions=owned_partitions, adapter=adapter)
use_group_report(ownership.report)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def emit(kind: str, exchange: str, detail: dict[str, Any], symbol: str | None = None) -> None:
    event = CollectorEvent(type=kind, exchange=exchange, time=_now_ms(), symbol=symbol, detail=detail)
    try:
        if _emit is not None:
            await _emit(event)
    except Exception:  # events are best effort; the command path must not stop for them
        log.exception("control: could not emit %s event", kind)


async def reject(exchange: str, reason: str, detail: dict[str, Any]) -> None:
    log.warning("control: command rejected: %s (%s)", reason, detail)
    # The symbol goes in detail, not in `symbol`: the state tables must not grow a coin for it.
    await emit("subscribe-rejected", exchange, {"reason": reason, **detail})


def _describe(command: SubscriptionCommand) -> dict[str, Any]:
    return {
        "commandId": command.command_id,
        "action": command.action,
        "symbol": command.symbol,
        "dataTypes": command.data_types,
    }


async def _listed_adapter(exchange: str) -> ExchangeAdapter:
    """The exchange's adapter; waits out an unreachable instrument list instead of dropping commands."""
    while True:
        try:
            return await adapter(exchange)
        except RuntimeError as exc:
            log.error("control: no instrument list for %s yet (%s); retrying", exchange, exc)
            await asyncio.sleep(ADAPTER_RETRY_SECONDS)


async def validate(command: SubscriptionCommand) -> SubscriptionCommand:
    """The command with its symbol normalized; RequestError when it cannot be applied."""
    request = check_request(command.exchange, command.symbol, command.data_types, config.exchanges)
    if command.action == "subscribe":
        listed = await _listed_adapter(command.exchange)
        if request.symbol not in listed.by_symbol:
            raise RequestError(f"{command.exchange} does not list {request.symbol}")
    return msgspec.structs.replace(command, symbol=request.symbol, data_types=request.data_types)


async def handle(payload: bytes, partition: int) -> None:
    try:
        received = decode_command(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        await reject(
            "unknown", f"malformed command: {exc}", {"payload": payload[:200].decode(errors="replace")}
        )
        return
    try:
        command = await validate(received)
    except RequestError as exc:
        exchange = received.exchange if received.exchange in config.exchanges else "unknown"
        await reject(exchange, str(exc), _describe(received))
        return
    group = command_group(command)
    if group_partition(group) != partition:
        # Produced by someone who did not pick the group's partition: its row must live there.
        log.info("control: moving command %s to the partition of %s", command.command_id, group)
        await send_command(command)
        return
    key = row_key(group, command.symbol)
    row = subscriptions.get(key)
    if row is None:
        earlier = earlier_row(command.exchange, command.symbol)
        row = None if earlier is None else moved_row(earlier, group)
    if row is None and command.action == "unsubscribe":
        await emit("subscription-unchanged", command.exchange, {**_describe(command), "group": group})
        return
    outcome = apply_command(row, command, group)
    if outcome.replayed:
        log.info("control: command %s was applied already; skipped", command.command_id)
        await emit(
            "subscription-unchanged",
            command.exchange,
            {**_describe(command), "group": group, "subscribed": outcome.row["dataTypes"], "replayed": True},
        )
        return
    subscriptions[key] = outcome.row
    if outcome.changed:
        ownership.request_reconcile()
    await emit(
        "subscription-changed" if outcome.changed else "subscription-unchanged",
        command.exchange,
        {**_describe(command), "group": group, "subscribed": outcome.row["dataTypes"]},
        symbol=command.symbol if outcome.changed else None,
    )


@app.agent(commands_topic, name="control.commands")
async def control_commands(stream: Any) -> None:
    async for event in stream.events():
        try:
            await handle(event.value, event.message.partition)
        except Exception:  # the broker/source boundary: one failed command must not stop the agent
            log.exception("control: command at offset %s failed", event.message.offset)


@app.task
async def seed_subscriptions() -> None:
    """Seed the config's subscriptions; idempotent, so every worker does it at every start."""
    commands = seed_commands(
        {name: (settings.symbols, settings.dataTypes) for name, settings in config.exchanges.items()},
        _now_ms(),
    )
    try:
        for command in commands:
            await send_command(command)
    except Exception:  # the broker boundary: a worker without seeds still serves what the table has
        log.exception("control: seeding the config's subscriptions failed")
        return
    log.info("control: seeded %d subscriptions from the config", len(commands))


@app.task
async def run_ownership() -> None:
    await ownership.run()


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
    ownership.on_revoked()


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
    await ownership.on_assigned()


@app.on_rebalance_complete.connect
async def _on_rebalance_complete(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
    ownership.on_recovered()
