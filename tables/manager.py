"""What the manager decides, as a pure function of the tables and the clock.

- A connector that has been connecting, recovering or failed for longer than `stuck_after` gets a
  recovery order, again every `stuck_after`, and after `recovery_attempts` orders without becoming
  healthy an alert (`recovery-failed`) that resolves once it is healthy again.
- A connector that says it is connected while every subscribed coin it carries has been silent for
  longer than `stuck_after` and `stale_after` (a stalled connection) gets one recovery order per
  silence: if recycling it brought nothing, the exchange is quiet and the coin-stale alerts tell.
- A recovery order is carried out by the worker running the connector's group: it goes to the
  group's partition of `collector.commands` as a RecoveryCommand (agents/control.py acts on it).
- A subscribed coin with no record for longer than `stale_after` raises `coin-stale`, resolved when
  its records flow again.
- A connected connector whose frames keep arriving while their records fall more than `behind_after`
  behind (the normalize agent or the broker cannot keep up) raises `pipeline-behind` instead of
  getting a recovery order: recycling a working connection would only add a backfill to the backlog.
- An exchange whose raw spools hold more than `spool_alert_bytes` (batches the broker has not taken)
  raises `spool-growing`, resolved once they are back under it.
- While the broker does not answer, and for `BROKER_GRACE_MS` after it answers again, the coin and
  connector rows are not judged: the reports that keep them current travel through the broker, so
  every coin looks silent, and recovering healthy connections would only add REST backfills.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from streams.commands import RecoveryCommand
from streams.config import AlertsConfig
from tables.records import Alert
from tables.state import Row

STUCK_STATES = frozenset({"connecting", "recovering", "subscription-requesting", "failed"})
# How long after the broker answers again its backlog of events and flow reports takes to reach the
# tables (the spool drains, the state agents apply what waited).
BROKER_GRACE_MS = 20_000


@dataclass(frozen=True)
class ManagerSettings:
    stale_after_ms: int = 60_000
    stuck_after_ms: int = 60_000
    recovery_attempts: int = 3
    behind_after_ms: int = 10_000  # frames received but not normalized for longer: the pipeline is behind
    spool_alert_bytes: int = 16 * 1024 * 1024  # raw batches the broker has not taken, per exchange

    @classmethod
    def from_alerts(cls, alerts: AlertsConfig) -> ManagerSettings:
        """The settings `monitoring.alerts` asks for."""
        return cls(
            stale_after_ms=int(alerts.staleAfterSeconds * 1000),
            stuck_after_ms=int(alerts.stuckAfterSeconds * 1000),
            recovery_attempts=alerts.recoveryAttempts,
            behind_after_ms=int(alerts.behindAfterSeconds * 1000),
            spool_alert_bytes=alerts.spoolAlertBytes,
        )


@dataclass(frozen=True)
class RecoveryOrder:
    exchange: str
    connector: str
    connection_id: str | None
    attempt: int
    reason: str
    group: str | None = None  # the connection group (`binance:3`), None when the name tells none


@dataclass
class Decisions:
    recoveries: list[RecoveryOrder] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    failed_connectors: list[Row] = field(default_factory=list)  # recovery failed: alert raised now


def coin_age_ms(coin: Row, now: int) -> int | None:
    received = coin.get("lastReceivedAt")
    return None if received is None else max(now - received, 0)


def is_stale(coin: Row, now: int, stale_after_ms: int) -> bool:
    if coin.get("state") != "subscribed":
        return False
    age = coin_age_ms(coin, now)
    # A coin subscribed but never heard from counts from when it was subscribed.
    if age is None:
        since = coin.get("since")
        age = 0 if since is None else max(now - since, 0)
    return age > stale_after_ms


def connector_group(exchange: str, connector: str) -> str | None:
    """The group a connector belongs to: `binance-3` and `binance-3.1` are connections of `binance:3`."""
    prefix = f"{exchange}-"
    if not connector.startswith(prefix):
        return None
    number = connector[len(prefix) :].split(".", 1)[0]
    return f"{exchange}:{number}" if number.isdigit() else None


def recovery_command(order: RecoveryOrder, now: int) -> RecoveryCommand | None:
    """The command that makes the group's worker carry out the order; None when it has no group."""
    if order.group is None:
        return None
    return RecoveryCommand(
        action="recover",
        exchange=order.exchange,
        group=order.group,
        connector=order.connector,
        attempt=order.attempt,
        reason=order.reason,
        command_id=f"recover:{order.connector}:{order.attempt}:{now}",
        requested_at=now,
    )


def last_heard_ms(connector: Row, coins: Mapping[str, Row]) -> int | None:
    """When the connector's subscribed coins last got a record (or were subscribed); None without any."""
    heard = [
        coin.get("lastReceivedAt") or coin.get("since") or 0
        for symbol in connector.get("coins") or []
        if (coin := coins.get(f"{connector['exchange']}:{symbol}")) is not None
        and coin.get("state") == "subscribed"
    ]
    return max(heard) if heard else None


def pipeline_lag_ms(connector: Row) -> int | None:
    """How far the normalized records trail the frames the connector's connection received: the
    receipt time of its newest frame minus that of the newest one normalized. None before a frame."""
    heard = connector.get("lastFrameAt")
    if heard is None:
        return None
    through = connector.get("normalizedThrough") or connector.get("since") or heard
    return max(heard - through, 0)


def describe_lag(lag_ms: int) -> str:
    return f"{lag_ms} ms" if lag_ms < 1000 else f"{lag_ms / 1000:.0f} s"


def pipeline_behind_ms(connector: Row, behind_after_ms: int) -> int | None:
    """The lag of a connected connector whose records trail its frames by more than `behind_after_ms`;
    None otherwise. What the manager alerts on and `/health` reports."""
    if connector.get("state") != "connected":
        return None
    lag = pipeline_lag_ms(connector)
    return lag if lag is not None and lag > behind_after_ms else None


def evaluate(
    coins: Iterable[Row],
    connectors: Iterable[Row],
    open_alerts: Container[str],
    recently_ordered: Mapping[str, int],
    now: int,
    settings: ManagerSettings,
    spool_bytes: Mapping[str, int] | None = None,
    broker_answered_at: int | None = None,
) -> Decisions:
    """Decide recoveries and alerts.

    `open_alerts` holds the keys of firing alerts; `recently_ordered` maps connector → when this
    manager last ordered its recovery (the table may not show that order yet); `spool_bytes` maps
    exchange → bytes its raw spools hold (tables/summary.py `spool_bytes`); `broker_answered_at` is
    when the broker last answered while it was being waited for (None: it is not known to have
    been silent), and `now` while it still is silent.
    """
    decisions = Decisions()
    for exchange, held in (spool_bytes or {}).items():
        _judge_spool(exchange, held, open_alerts, now, settings, decisions)
    if broker_answered_at is not None and now - broker_answered_at < BROKER_GRACE_MS:
        return decisions
    coin_rows = list(coins)
    by_key = {f"{coin['exchange']}:{coin['symbol']}": coin for coin in coin_rows}
    for connector in connectors:
        _judge_connector(connector, by_key, open_alerts, recently_ordered, now, settings, decisions)
    for coin in coin_rows:
        key = f"coin-stale:{coin['exchange']}:{coin['symbol']}"
        stale = is_stale(coin, now, settings.stale_after_ms)
        if stale and key not in open_alerts:
            age = coin_age_ms(coin, now)
            seconds = "never" if age is None else f"{age / 1000:.0f} s ago"
            decisions.alerts.append(
                _alert(key, "coin-stale", "firing", coin["exchange"], now,
                       f"{coin['exchange']} {coin['symbol']}: last record {seconds}",
                       {"symbol": coin["symbol"], "lastReceivedAt": coin.get("lastReceivedAt")})
            )  # fmt: skip
        elif not stale and key in open_alerts:
            decisions.alerts.append(
                _alert(key, "coin-stale", "resolved", coin["exchange"], now,
                       f"{coin['exchange']} {coin['symbol']}: records flow again", {"symbol": coin["symbol"]})
            )  # fmt: skip
    return decisions


def describe_bytes(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KiB"


def _judge_spool(
    exchange: str, held: int, open_alerts: Container[str], now: int, settings: ManagerSettings,
    decisions: Decisions,
) -> None:  # fmt: skip
    """Raise `spool-growing` while an exchange's raw spools hold more than the threshold."""
    key = f"spool-growing:{exchange}"
    threshold = settings.spool_alert_bytes
    detail: dict[str, object] = {"bytes": held, "thresholdBytes": threshold}
    if held > threshold and key not in open_alerts:
        decisions.alerts.append(
            _alert(key, "spool-growing", "firing", exchange, now,
                   f"{exchange}: the raw spool holds {describe_bytes(held)} the broker has not taken"
                   f" (alert above {describe_bytes(threshold)}): the broker is unreachable or too slow",
                   detail)
        )  # fmt: skip
    elif held <= threshold and key in open_alerts:
        decisions.alerts.append(
            _alert(key, "spool-growing", "resolved", exchange, now,
                   f"{exchange}: the raw spool is down to {describe_bytes(held)}", detail)
        )  # fmt: skip


def _judge_connector(
    connector: Row,
    coins: Mapping[str, Row],
    open_alerts: Container[str],
    recently_ordered: Mapping[str, int],
    now: int,
    settings: ManagerSettings,
    decisions: Decisions,
) -> None:
    name, exchange = connector["connector"], connector["exchange"]
    key = f"recovery-failed:{name}"
    last_order = max(connector.get("lastRecoveryRequestAt") or 0, recently_ordered.get(name, 0))
    behind = _judge_pipeline(connector, open_alerts, now, settings, decisions)
    if connector["state"] == "connected":
        if key in open_alerts:
            decisions.alerts.append(
                _alert(key, "recovery-failed", "resolved", exchange, now, f"{name} is connected again",
                       {"connector": name})
            )  # fmt: skip
        if not behind:
            _judge_silence(connector, coins, last_order, now, settings, decisions)
        return
    if connector["state"] not in STUCK_STATES or now - connector["since"] <= settings.stuck_after_ms:
        return
    if now - last_order <= settings.stuck_after_ms:
        return
    attempts = connector.get("recoveryAttempts", 0)
    if attempts >= settings.recovery_attempts:
        if key not in open_alerts:
            decisions.failed_connectors.append(connector)
            decisions.alerts.append(
                _alert(key, "recovery-failed", "firing", exchange, now,
                       f"{name}: still {connector['state']} after {attempts} recovery attempts"
                       f" ({connector.get('lastError') or 'no error reported'})",
                       {"connector": name, "attempts": attempts, "lastError": connector.get("lastError")})
            )  # fmt: skip
        return
    decisions.recoveries.append(
        RecoveryOrder(exchange, name, connector.get("connectionId"), attempts + 1,
                      f"{connector['state']} for {(now - connector['since']) / 1000:.0f} s",
                      connector_group(exchange, name))
    )  # fmt: skip


def _judge_pipeline(
    connector: Row, open_alerts: Container[str], now: int, settings: ManagerSettings, decisions: Decisions
) -> bool:
    """Raise or resolve `pipeline-behind` for a connector; True while it is connected and behind."""
    name, exchange = connector["connector"], connector["exchange"]
    key = f"pipeline-behind:{name}"
    lag = pipeline_behind_ms(connector, settings.behind_after_ms)
    if lag is not None and key not in open_alerts:
        decisions.alerts.append(
            _alert(key, "pipeline-behind", "firing", exchange, now,
                   f"{name}: frames arrive but their records are {describe_lag(lag)} behind"
                   " (the normalize agent or the broker cannot keep up)",
                   {"connector": name, "lagMs": lag, "lastFrameAt": connector.get("lastFrameAt"),
                    "normalizedThrough": connector.get("normalizedThrough")})
        )  # fmt: skip
    elif lag is None and key in open_alerts:
        connected = connector["state"] == "connected"
        message = f"{name}: records caught up" if connected else f"{name} is no longer connected"
        decisions.alerts.append(
            _alert(key, "pipeline-behind", "resolved", exchange, now, message,
                   {"connector": name, "lagMs": pipeline_lag_ms(connector)})
        )  # fmt: skip
    return lag is not None


def _judge_silence(
    connector: Row,
    coins: Mapping[str, Row],
    last_order: int,
    now: int,
    settings: ManagerSettings,
    decisions: Decisions,
) -> None:
    """A connected connector whose coins all went silent is stalled: order one recycle per silence."""
    heard = last_heard_ms(connector, coins)
    if heard is None or now - connector["since"] <= settings.stuck_after_ms:
        return
    silent_for = now - heard
    if silent_for <= max(settings.stuck_after_ms, settings.stale_after_ms) or last_order >= heard:
        return
    name, exchange = connector["connector"], connector["exchange"]
    decisions.recoveries.append(
        RecoveryOrder(exchange, name, connector.get("connectionId"), connector.get("recoveryAttempts", 0) + 1,
                      f"connected but silent for {silent_for / 1000:.0f} s", connector_group(exchange, name))
    )  # fmt: skip


def _alert(
    key: str, kind: str, status: str, exchange: str, now: int, message: str, detail: dict[str, object]
) -> Alert:
    return Alert(
        id=f"{key}:{status}:{now}",
        key=key,
        kind=kind,
        status=status,  # type: ignore[arg-type]
        exchange=exchange,
        time=now,
        message=message,
        detail=detail,
    )


def apply_alert(recent: Row, alert: Alert, keep: int = 50) -> bool:
    """Add an alert to the `recent` row (open alerts by key + the latest alerts); False if seen before."""
    seen = recent.setdefault("ids", [])
    if alert.id in seen:
        return False
    seen.append(alert.id)
    del seen[: -keep * 4]
    record = {
        "id": alert.id, "key": alert.key, "kind": alert.kind, "status": alert.status,
        "exchange": alert.exchange, "time": alert.time, "message": alert.message, "detail": alert.detail,
    }  # fmt: skip
    latest = recent.setdefault("latest", [])
    latest.insert(0, record)
    del latest[keep:]
    open_alerts = recent.setdefault("open", {})
    if alert.status == "firing":
        open_alerts[alert.key] = record
    else:
        open_alerts.pop(alert.key, None)
    return True
