"""Which worker runs which connection group: the one Kafka assigns the group's table partition.

Group n of every exchange lives in partition n of `collector.commands` and of the subscription table
(tables/subscription_rules.py). After each rebalance, and after each applied command, the worker
compares the groups it runs with the groups it owns and the streams their rows ask for, and tells the
exchange sources to assign or release groups. One reconcile loop does all of it, so rebalance
callbacks and commands never race each other.

Rebalances: on assignment, a group whose partition went elsewhere is released at once, before the
new owner (which first restores the table partition) starts it; a group that stays is left running,
so a worker joining does not reconnect the groups that keep their owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from streams.exchanges.base import DataType, ExchangeAdapter
from tables.subscription_rules import Row, group_partition, group_symbols

log = logging.getLogger(__name__)


class GroupRunner(Protocol):
    """What ownership needs from an exchange source (agents/source.py ExchangeSource)."""

    async def assign_group(self, group: str, streams: Collection[str]) -> None: ...

    async def release_group(self, group: str) -> None: ...

    def groups(self) -> Mapping[str, Any]: ...


def group_streams(adapter: ExchangeAdapter, rows: Iterable[Row], group: str) -> frozenset[str]:
    """The stream names a group must carry: every data type of every symbol of the group."""
    streams = set()
    for symbol, data_types in group_symbols(rows, group).items():
        instrument = adapter.by_symbol.get(symbol)
        if instrument is None:
            continue  # the control agent rejects unlisted symbols; a delisted one just stops
        for text in data_types:
            data_type = DataType.parse(text)
            if adapter.supports(data_type):
                streams.add(adapter.stream_name(instrument, data_type))
    return frozenset(streams)


def groups_in_rows(rows: Iterable[Row], owned: Collection[int]) -> set[str]:
    return {row["group"] for row in rows if row.get("dataTypes") and group_partition(row["group"]) in owned}


@dataclass(frozen=True)
class Changes:
    assign: dict[str, frozenset[str]]
    release: set[str]


def plan_changes(running: Mapping[str, frozenset[str]], desired: Mapping[str, frozenset[str]]) -> Changes:
    """Groups to (re)assign with their streams, and groups to release. Empty groups are released."""
    wanted = {group: streams for group, streams in desired.items() if streams}
    assign = {group: streams for group, streams in wanted.items() if running.get(group) != streams}
    release = {group for group in running if group not in wanted}
    return Changes(assign, release)


def exchange_of(group: str) -> str:
    return group.rsplit(":", 1)[0]


class GroupOwnership:
    """Keeps this worker's running groups equal to the groups it owns, with their rows' streams."""

    def __init__(
        self,
        rows: Callable[[], Iterable[Row]],
        owned_partitions: Callable[[], set[int]],
        adapter: Callable[[str], Awaitable[ExchangeAdapter]],
    ) -> None:
        self._rows = rows
        self._owned_partitions = owned_partitions
        self._adapter = adapter
        self._runners: dict[str, GroupRunner] = {}
        self.running: dict[str, frozenset[str]] = {}
        self._dirty = asyncio.Event()
        self._settled = False  # False between a revocation and the end of the table's recovery

    def attach(self, exchange: str, runner: GroupRunner) -> None:
        self._runners[exchange] = runner
        self.request_reconcile()

    def request_reconcile(self) -> None:
        self._dirty.set()

    def on_revoked(self) -> None:
        self._settled = False

    async def on_assigned(self) -> None:
        """Release at once the groups whose partitions this worker no longer owns."""
        owned = self._owned_partitions()
        for group in [g for g in self.running if group_partition(g) not in owned]:
            await self._release(group)

    def on_recovered(self) -> None:
        self._settled = True
        self.request_reconcile()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not self._settled:
                continue
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the source boundary: log, and try again on the next change
                log.exception("ownership: reconciling connection groups failed")

    async def reconcile(self) -> None:
        owned = self._owned_partitions()
        rows = list(self._rows())
        desired: dict[str, frozenset[str]] = {}
        for group in groups_in_rows(rows, owned):
            exchange = exchange_of(group)
            if exchange not in self._runners:
                continue  # its source has not started yet; attach() asks again
            desired[group] = group_streams(await self._adapter(exchange), rows, group)
        changes = plan_changes(
            {g: s for g, s in self.running.items() if exchange_of(g) in self._runners}, desired
        )
        for group in sorted(changes.release):
            await self._release(group)
        for group, streams in sorted(changes.assign.items()):
            log.info("ownership: running %s with %d streams", group, len(streams))
            await self._runners[exchange_of(group)].assign_group(group, sorted(streams))
            self.running[group] = streams

    async def _release(self, group: str) -> None:
        log.info("ownership: releasing %s", group)
        self.running.pop(group, None)
        runner = self._runners.get(exchange_of(group))
        if runner is not None:
            await runner.release_group(group)

    def report(self) -> dict[str, Any]:
        """group → status for the views: the streams asked for and what the source reports."""
        found: dict[str, Any] = {}
        for exchange, runner in self._runners.items():
            statuses = runner.groups()
            for group, streams in self.running.items():
                if exchange_of(group) == exchange:
                    status = statuses.get(group)
                    found[group] = {"streams": len(streams), "status": _plain(status)}
        return found


def _plain(status: Any) -> Any:
    """A GroupStatus (dataclass, struct or mapping) as JSON-friendly data."""
    if status is None or isinstance(status, str | int | float | bool | dict | list):
        return status
    for attribute in ("_asdict", "to_dict", "as_dict"):
        method = getattr(status, attribute, None)
        if callable(method):
            return method()
    if hasattr(status, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(status)
    if hasattr(status, "__struct_fields__"):
        return {name: getattr(status, name) for name in status.__struct_fields__}
    return str(status)
