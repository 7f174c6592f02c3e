"""The manager's decisions (tables/manager.py): recovery orders, alerts, and the recent-alerts row."""

from __future__ import annotations

from streams.commands import decode_control_command, encode_command
from tables.manager import (
    ManagerSettings,
    RecoveryOrder,
    apply_alert,
    connector_group,
    evaluate,
    is_stale,
    pipeline_lag_ms,
    recovery_command,
)
from tables.state import new_coin, new_connector

SETTINGS = ManagerSettings(stale_after_ms=10_000, stuck_after_ms=30_000, recovery_attempts=2)


def connector(state: str, since: int, **fields: object) -> dict:
    row = new_connector("binance", "binance-0", since)
    row.update(state=state, connectionId="binance-0-1-1", **fields)
    return row


def coin(state: str, last_received: int | None, since: int = 0) -> dict:
    row = new_coin("binance", "BTC/USDT", since)
    row.update(state=state, lastReceivedAt=last_received)
    return row


def test_a_connector_stuck_longer_than_the_limit_gets_a_recovery_order() -> None:
    stuck = connector("recovering", since=0, lastError="refused")
    assert not evaluate([], [stuck], set(), {}, now=30_000, settings=SETTINGS).recoveries
    decisions = evaluate([], [stuck], set(), {}, now=30_001, settings=SETTINGS)
    [order] = decisions.recoveries
    assert (order.exchange, order.connector, order.connection_id, order.attempt) == (
        "binance", "binance-0", "binance-0-1-1", 1,
    )  # fmt: skip
    assert order.reason == "recovering for 30 s"
    assert order.group == "binance:0"
    assert not decisions.alerts


def test_recovery_is_ordered_again_only_after_the_limit_since_the_last_order() -> None:
    stuck = connector("recovering", since=0, recoveryAttempts=1, lastRecoveryRequestAt=40_000)
    assert not evaluate([], [stuck], set(), {}, now=60_000, settings=SETTINGS).recoveries
    # The manager's own memory of an order counts even before the table shows it.
    assert not evaluate([], [stuck], set(), {"binance-0": 65_000}, now=80_000, settings=SETTINGS).recoveries
    [order] = evaluate([], [stuck], set(), {}, now=70_001, settings=SETTINGS).recoveries
    assert order.attempt == 2


def test_healthy_and_idle_connectors_get_no_orders() -> None:
    for state in ("connected", "subscription-requesting", "ready"):
        row = connector(state, since=0)
        if state == "subscription-requesting":
            # Requesting subscriptions for too long is stuck too.
            assert evaluate([], [row], set(), {}, now=100_000, settings=SETTINGS).recoveries
        else:
            assert not evaluate([], [row], set(), {}, now=100_000, settings=SETTINGS).recoveries


def test_recovery_failing_repeatedly_raises_one_alert_and_resolves_when_connected() -> None:
    failed = connector(
        "recovering", since=0, recoveryAttempts=2, lastRecoveryRequestAt=10_000, lastError="refused"
    )
    decisions = evaluate([], [failed], set(), {}, now=50_000, settings=SETTINGS)
    assert not decisions.recoveries
    [alert] = decisions.alerts
    assert (alert.kind, alert.status, alert.key) == ("recovery-failed", "firing", "recovery-failed:binance-0")
    assert "after 2 recovery attempts" in alert.message and "refused" in alert.message
    assert decisions.failed_connectors == [failed]
    # Already firing: nothing new.
    assert not evaluate([], [failed], {alert.key}, {}, now=90_000, settings=SETTINGS).alerts
    healthy = connector("connected", since=95_000)
    [resolved] = evaluate([], [healthy], {alert.key}, {}, now=96_000, settings=SETTINGS).alerts
    assert (resolved.status, resolved.key) == ("resolved", alert.key)


def test_a_silent_subscribed_coin_is_stale_and_resolves_when_records_flow() -> None:
    assert not is_stale(coin("subscribed", 5_000), now=15_000, stale_after_ms=10_000)
    assert is_stale(coin("subscribed", 5_000), now=15_001, stale_after_ms=10_000)
    assert not is_stale(coin("stopped", 5_000), now=99_000, stale_after_ms=10_000)
    assert is_stale(coin("subscribed", None, since=1_000), now=12_000, stale_after_ms=10_000)

    [alert] = evaluate([coin("subscribed", 5_000)], [], set(), {}, now=20_000, settings=SETTINGS).alerts
    assert (alert.kind, alert.status, alert.key) == ("coin-stale", "firing", "coin-stale:binance:BTC/USDT")
    assert alert.message == "binance BTC/USDT: last record 15 s ago"
    assert not evaluate(
        [coin("subscribed", 5_000)], [], {alert.key}, {}, now=25_000, settings=SETTINGS
    ).alerts
    [resolved] = evaluate(
        [coin("subscribed", 24_000)], [], {alert.key}, {}, now=25_000, settings=SETTINGS
    ).alerts
    assert resolved.status == "resolved"


def test_the_recent_alerts_row_keeps_open_alerts_by_key_and_ignores_replays() -> None:
    coins = [coin("subscribed", 0)]
    [firing] = evaluate(coins, [], set(), {}, now=20_000, settings=SETTINGS).alerts
    recent: dict = {}
    assert apply_alert(recent, firing)
    assert not apply_alert(recent, firing)  # replayed
    assert list(recent["open"]) == [firing.key]
    assert [a["id"] for a in recent["latest"]] == [firing.id]
    [resolved] = evaluate(
        [coin("subscribed", 29_000)], [], {firing.key}, {}, now=30_000, settings=SETTINGS
    ).alerts
    assert apply_alert(recent, resolved)
    assert recent["open"] == {}
    assert [a["status"] for a in recent["latest"]] == ["resolved", "firing"]


def test_the_recent_alerts_row_is_bounded() -> None:
    recent: dict = {}
    for second in range(200):
        [alert] = evaluate(
            [coin("subscribed", 0)], [], set(), {}, now=20_000 + second, settings=SETTINGS
        ).alerts
        apply_alert(recent, alert, keep=50)
    assert len(recent["latest"]) == 50
    assert len(recent["ids"]) <= 200
    assert recent["latest"][0]["time"] == 20_199


def test_a_connector_name_tells_its_connection_group() -> None:
    assert connector_group("binance", "binance-3") == "binance:3"
    assert connector_group("binance", "binance-3.1") == "binance:3"  # a second connection of the group
    assert connector_group("binance_futures", "binance_futures-12") == "binance_futures:12"
    assert connector_group("binance", "upbit-3") is None
    assert connector_group("binance", "binance-rest") is None


def test_a_recovery_order_becomes_a_command_for_the_groups_partition() -> None:
    order = RecoveryOrder("binance", "binance-3.1", "binance-3.1-9-2", 2, "recovering for 61 s", "binance:3")
    command = recovery_command(order, now=123_000)
    assert command is not None
    assert (command.action, command.exchange, command.group, command.connector) == (
        "recover", "binance", "binance:3", "binance-3.1",
    )  # fmt: skip
    assert (command.attempt, command.reason, command.requested_at) == (2, "recovering for 61 s", 123_000)
    assert command.command_id == "recover:binance-3.1:2:123000"
    assert decode_control_command(encode_command(command)) == command
    nameless = RecoveryOrder("binance", "odd", None, 1, "failed for 70 s")
    assert recovery_command(nameless, now=1) is None


def silent_case(last_received: int, connected_since: int = 0, **fields: object) -> tuple[list, list]:
    carried = coin("subscribed", last_received)
    row = connector("connected", since=connected_since, coins=["BTC/USDT"], **fields)
    return [carried], [row]


def test_a_connected_connector_whose_coins_all_went_silent_gets_one_recovery_order() -> None:
    # Silent for longer than both limits (stuck 30 s, stale 10 s): a stalled connection.
    coins, connectors = silent_case(last_received=40_000)
    assert not evaluate(coins, connectors, set(), {}, now=70_000, settings=SETTINGS).recoveries
    [order] = evaluate(coins, connectors, set(), {}, now=70_001, settings=SETTINGS).recoveries
    assert (order.connector, order.group, order.attempt) == ("binance-0", "binance:0", 1)
    assert order.reason == "connected but silent for 30 s"
    # Once ordered during this silence (by the table or by the manager's memory), never again...
    coins, connectors = silent_case(last_received=40_000, lastRecoveryRequestAt=70_001)
    assert not evaluate(coins, connectors, set(), {}, now=500_000, settings=SETTINGS).recoveries
    coins, connectors = silent_case(last_received=40_000)
    assert not evaluate(
        coins, connectors, set(), {"binance-0": 70_001}, now=500_000, settings=SETTINGS
    ).recoveries
    # ...until records flowed after the order and then stopped again.
    coins, connectors = silent_case(last_received=80_000, lastRecoveryRequestAt=70_001)
    assert evaluate(coins, connectors, set(), {}, now=110_001, settings=SETTINGS).recoveries


def test_a_fresh_connection_or_a_flowing_coin_is_not_a_stall() -> None:
    # Connected only just now: the new connection gets its chance first.
    coins, connectors = silent_case(last_received=0, connected_since=90_000)
    assert not evaluate(coins, connectors, set(), {}, now=100_000, settings=SETTINGS).recoveries
    # One of its coins still flows.
    flowing = coin("subscribed", 99_000)
    flowing["symbol"] = "ETH/USDT"
    coins, connectors = silent_case(last_received=0)
    connectors[0]["coins"] = ["BTC/USDT", "ETH/USDT"]
    assert not evaluate([*coins, flowing], connectors, set(), {}, now=100_000, settings=SETTINGS).recoveries
    # A stopped coin does not count as silent.
    stopped = coin("stopped", 0)
    assert not evaluate([stopped], connectors[:1], set(), {}, now=100_000, settings=SETTINGS).recoveries


def test_frames_arriving_while_their_records_fall_behind_raise_pipeline_behind_instead_of_a_recycle() -> None:
    # Silent coins (as in the stall case) but the connection keeps receiving: its frames are 60 s
    # ahead of what was normalized. The connection is fine; recycling it would not help.
    coins, connectors = silent_case(last_received=40_000, lastFrameAt=100_000, normalizedThrough=40_000)
    decisions = evaluate(coins, connectors, set(), {}, now=100_000, settings=SETTINGS)
    assert not decisions.recoveries
    [alert] = [a for a in decisions.alerts if a.kind == "pipeline-behind"]
    assert (alert.key, alert.status, alert.detail["lagMs"]) == ("pipeline-behind:binance-0", "firing", 60_000)
    assert "60 s behind" in alert.message
    # Raised once: not again while it is open.
    open_alerts = {"pipeline-behind:binance-0"}
    decisions = evaluate(coins, connectors, open_alerts, {}, now=101_000, settings=SETTINGS)
    assert not decisions.recoveries and not [a for a in decisions.alerts if a.kind == "pipeline-behind"]
    # Caught up: resolved, and coins flowing again end the silence too.
    coins, connectors = silent_case(last_received=110_000, lastFrameAt=110_000, normalizedThrough=109_000)
    decisions = evaluate(coins, connectors, open_alerts, {}, now=110_500, settings=SETTINGS)
    [alert] = decisions.alerts
    assert (alert.kind, alert.status) == ("pipeline-behind", "resolved")
    # Disconnected while behind: resolved as well (the connector's own alerts take over).
    down = connector("recovering", since=120_000, lastFrameAt=119_000, normalizedThrough=50_000)
    [alert] = evaluate([], [down], open_alerts, {}, now=120_500, settings=SETTINGS).alerts
    assert (alert.kind, alert.status, alert.message) == (
        "pipeline-behind",
        "resolved",
        "binance-0 is no longer connected",
    )


def test_a_connection_caught_up_with_its_frames_but_carrying_no_records_is_still_a_stall() -> None:
    # Frames (heartbeats, acknowledgements) arrive and are normalized at once, yet no coin gets a
    # record: the subscription is dead, and the connection is recycled as before.
    coins, connectors = silent_case(last_received=40_000, lastFrameAt=99_000, normalizedThrough=98_990)
    decisions = evaluate(coins, connectors, set(), {}, now=100_000, settings=SETTINGS)
    [order] = decisions.recoveries
    assert order.reason == "connected but silent for 60 s"
    assert not decisions.alerts or all(a.kind == "coin-stale" for a in decisions.alerts)
    # Before anything was normalized, the lag counts from when the connector connected.
    assert pipeline_lag_ms(connector("connected", since=5_000, lastFrameAt=20_000)) == 15_000
    assert pipeline_lag_ms(connector("connected", since=5_000)) is None
