"""Group ownership: which groups a worker runs, with which streams, across rebalances and commands."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from typing import Any

import msgspec
import pytest

from agents.ownership import GroupOwnership, group_streams, groups_in_rows, plan_changes
from streams.commands import (
    RecoveryCommand,
    SubscriptionCommand,
    decode_control_command,
    encode_command,
    recovery_order_expired,
)
from streams.exchanges.base import ExchangeAdapter, Instrument
from streams.exchanges.binance import BinanceAdapter
from tables.subscription_rules import Row

INSTRUMENTS = [
    Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT"),
    Instrument("ETH/USDT", "ETHUSDT", "ETH", "USDT"),
    Instrument("BNB/USDT", "BNBUSDT", "BNB", "USDT"),
]
ADAPTER = BinanceAdapter(INSTRUMENTS)


def row(symbol: str, group: str, types: list[str]) -> Row:
    return {"exchange": "binance", "symbol": symbol, "group": group, "dataTypes": types}


class RecordingRunner:
    """Stands in for an ExchangeSource: records what ownership asked of it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []
        self.running: dict[str, tuple[str, ...]] = {}

    async def assign_group(self, group: str, streams: Collection[str]) -> None:
        self.calls.append(("assign", group, tuple(streams)))
        self.running[group] = tuple(streams)

    async def release_group(self, group: str) -> None:
        self.calls.append(("release", group, ()))
        self.running.pop(group, None)

    def groups(self) -> dict[str, Any]:
        return {group: {"state": "subscribed"} for group in self.running}


def test_group_streams_are_every_data_type_of_every_symbol_of_the_group() -> None:
    rows = [
        row("BTC/USDT", "binance:1", ["trade", "kline_1m"]),
        row("ETH/USDT", "binance:1", ["bbo"]),
        row("BNB/USDT", "binance:2", ["trade"]),
        row("XRP/USDT", "binance:1", ["trade"]),  # not listed by the exchange: no stream
    ]
    assert group_streams(ADAPTER, rows, "binance:1") == {
        "btcusdt@trade", "btcusdt@kline_1m", "ethusdt@bookTicker",
    }  # fmt: skip


def test_groups_in_rows_are_the_owned_groups_that_want_data() -> None:
    rows = [row("BTC/USDT", "binance:1", ["trade"]), row("ETH/USDT", "binance:3", ["trade"]),
            row("BNB/USDT", "binance:0", [])]  # fmt: skip
    assert groups_in_rows(rows, {0, 1}) == {"binance:1"}
    assert groups_in_rows(rows, {0, 1, 3}) == {"binance:1", "binance:3"}


def test_plan_changes_assigns_new_and_changed_groups_and_releases_the_rest() -> None:
    running = {"binance:0": frozenset({"a"}), "binance:1": frozenset({"b"}), "binance:2": frozenset({"c"})}
    desired = {
        "binance:0": frozenset({"a"}),
        "binance:1": frozenset({"b", "d"}),
        "binance:3": frozenset({"e"}),
        "binance:4": frozenset(),
    }
    changes = plan_changes(running, desired)
    assert changes.assign == {"binance:1": frozenset({"b", "d"}), "binance:3": frozenset({"e"})}
    assert changes.release == {"binance:2"}


class Harness:
    def __init__(self, rows: list[Row], owned: set[int]) -> None:
        self.rows = rows
        self.owned = owned
        self.runner = RecordingRunner()
        self.ownership = GroupOwnership(rows=self._rows, owned_partitions=lambda: set(self.owned),
                                        adapter=self._adapter)  # fmt: skip

    def _rows(self) -> Iterable[Row]:
        return list(self.rows)

    async def _adapter(self, exchange: str) -> ExchangeAdapter:
        return ADAPTER


def test_nothing_runs_before_the_first_rebalance_completes_then_owned_groups_start() -> None:
    async def scenario() -> None:
        h = Harness([row("BTC/USDT", "binance:1", ["trade"]), row("ETH/USDT", "binance:2", ["trade"])], {1})
        loop = asyncio.create_task(h.ownership.run())
        h.ownership.attach("binance", h.runner)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert h.runner.calls == [], "a worker must not run groups before its partitions are recovered"
        h.ownership.on_recovered()
        await _settle(lambda: bool(h.runner.calls))
        assert h.runner.calls == [("assign", "binance:1", ("btcusdt@trade",))]
        loop.cancel()

    asyncio.run(scenario())


def test_a_command_changes_only_its_group_and_an_emptied_group_is_released() -> None:
    async def scenario() -> None:
        h = Harness(
            [row("BTC/USDT", "binance:1", ["trade"]), row("ETH/USDT", "binance:2", ["trade"])], {1, 2}
        )
        h.ownership.attach("binance", h.runner)
        h.ownership.on_recovered()
        await h.ownership.reconcile()
        h.runner.calls.clear()
        h.rows[0] = row("BTC/USDT", "binance:1", ["trade", "bbo"])
        await h.ownership.reconcile()
        assert h.runner.calls == [("assign", "binance:1", ("btcusdt@bookTicker", "btcusdt@trade"))]
        h.runner.calls.clear()
        h.rows[1] = row("ETH/USDT", "binance:2", [])
        await h.ownership.reconcile()
        assert h.runner.calls == [("release", "binance:2", ())]
        assert set(h.ownership.report()) == {"binance:1"}

    asyncio.run(scenario())


def test_a_rebalance_releases_lost_groups_at_assignment_and_keeps_the_others_running() -> None:
    async def scenario() -> None:
        h = Harness(
            [row("BTC/USDT", "binance:1", ["trade"]), row("ETH/USDT", "binance:2", ["trade"])], {1, 2}
        )
        h.ownership.attach("binance", h.runner)
        h.ownership.on_recovered()
        await h.ownership.reconcile()
        h.runner.calls.clear()
        h.ownership.on_revoked()
        h.owned = {1}
        await h.ownership.on_assigned()
        assert h.runner.calls == [("release", "binance:2", ())], "released before the new owner starts it"
        h.ownership.on_recovered()
        await h.ownership.reconcile()
        assert h.runner.calls == [("release", "binance:2", ())], "binance:1 kept its connections"
        h.owned = {1, 2}  # the other worker died: its group comes here
        await h.ownership.on_assigned()
        await h.ownership.reconcile()
        assert h.runner.calls[-1] == ("assign", "binance:2", ("ethusdt@trade",))

    asyncio.run(scenario())


def test_a_failing_source_does_not_stop_the_reconcile_loop() -> None:
    class Flaky(RecordingRunner):
        fail = True

        async def assign_group(self, group: str, streams: Collection[str]) -> None:
            if self.fail:
                self.fail = False
                raise OSError("simulated source failure")
            await super().assign_group(group, streams)

    async def scenario() -> None:
        h = Harness([row("BTC/USDT", "binance:1", ["trade"])], {1})
        h.runner = Flaky()
        loop = asyncio.create_task(h.ownership.run())
        h.ownership.attach("binance", h.runner)
        h.ownership.on_recovered()
        await _settle(lambda: not h.runner.fail)
        assert h.runner.calls == []
        h.ownership.request_reconcile()
        await _settle(lambda: bool(h.runner.calls))
        assert h.runner.calls == [("assign", "binance:1", ("btcusdt@trade",))]
        loop.cancel()

    asyncio.run(scenario())


async def _settle(condition: Any, rounds: int = 100) -> None:
    """Let the loop run until the condition holds (bounded: fails rather than hangs)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def recovery(requested_at: int = 1_000) -> RecoveryCommand:
    return RecoveryCommand(
        action="recover", exchange="binance", group="binance:3", connector="binance-3", attempt=1,
        reason="silent for 61 s", command_id="recover:binance-3:1:1000", requested_at=requested_at,
    )  # fmt: skip


def test_the_commands_topic_carries_subscriptions_and_recovery_orders_told_apart_by_action() -> None:
    order = recovery()
    assert decode_control_command(encode_command(order)) == order
    subscribe = SubscriptionCommand("subscribe", "binance", "BTC/USDT", ["trade"], "c1", 5)
    assert decode_control_command(encode_command(subscribe)) == subscribe
    # A subscription command as produced before recovery orders existed still decodes the same.
    old = b'{"action":"unsubscribe","exchange":"binance","symbol":"BTC/USDT","dataTypes":["trade"],'
    old += b'"commandId":"c2","requestedAt":7}'
    assert decode_control_command(old) == SubscriptionCommand(
        "unsubscribe", "binance", "BTC/USDT", ["trade"], "c2", 7
    )
    for bad in (b'{"action":"recover","exchange":"binance"}', b'{"action":"reboot"}', b"[1]", b"{"):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            decode_control_command(bad)


def test_a_recovery_order_read_again_long_after_it_was_sent_is_expired() -> None:
    order = recovery(requested_at=1_000)
    assert not recovery_order_expired(order, now=31_000, max_age_ms=30_000)
    assert recovery_order_expired(order, now=31_001, max_age_ms=30_000)
