"""The state machines of DESIGN.md "State", as pure functions over table rows (plain JSON dicts).

- Coin (key `exchange:symbol`): ready → requested → subscribed → stopped.
- Connector (key: the connection group, e.g. `binance-0`): ready, connecting, connected,
  subscription-requesting, failed, recovering.
- Collector (key: the exchange): ready, running, stopped.

Rows are changed by `collector.events` records and by `collector.flow` summaries. Kafka delivers at
least once and every rebalance replays events (reference/platform.md), so each row remembers the
offset of the last record of each topic applied to it and ignores anything at or before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from streams.events import CollectorEvent
from streams.exchanges import adapter_class
from streams.exchanges.base import DataType, ExchangeAdapter
from tables.records import BookFlow, FlowSummary

Row = dict[str, Any]
Lookup = Callable[[str], Row | None]

EVENTS_SOURCE = "events"
FLOW_SOURCE = "flow"

COIN_STATES = ("ready", "requested", "subscribed", "stopped")
CONNECTOR_STATES = ("ready", "connecting", "connected", "subscription-requesting", "failed", "recovering")
COLLECTOR_STATES = ("ready", "running", "stopped")
CONNECTOR_UP = frozenset({"connected", "subscription-requesting"})

_AVERAGE_WEIGHT = 0.2  # weight of the newest interval in a coin's average receive interval
_CONNECTION_ID = re.compile(r"^(?P<group>.+?)-\d{10,}-\d+$")  # <exchange>-<group>-<epoch ms>-<n>


def coin_key(exchange: str, symbol: str) -> str:
    return f"{exchange}:{symbol}"


def connector_name(event: CollectorEvent) -> str | None:
    """The connection group an event is about: `detail.connector`, else derived from its connection id."""
    named = event.detail.get("connector")
    if isinstance(named, str) and named:
        return named
    if not event.connection_id:
        return None
    match = _CONNECTION_ID.match(event.connection_id)
    return match.group("group") if match else event.connection_id


def _coins_of(event: CollectorEvent, resolve_stream: Callable[[str], str | None]) -> dict[str, list[str]]:
    """The coins an event is about, each with the streams of it the event names (none: the whole coin).

    Coins come from `symbol`, `detail.symbols`, and `detail.streams` mapped to coins by the adapter."""
    found: dict[str, list[str]] = {}
    if event.symbol:
        found.setdefault(event.symbol, [])
    symbols = event.detail.get("symbols")
    if isinstance(symbols, list):
        for symbol in symbols:
            if isinstance(symbol, str):
                found.setdefault(symbol, [])
    streams = event.detail.get("streams")
    if isinstance(streams, list):
        for stream in streams:
            symbol = resolve_stream(stream) if isinstance(stream, str) else None
            if symbol:
                found.setdefault(symbol, []).append(stream)
    return found


def stream_index(adapter: ExchangeAdapter) -> dict[str, str]:
    """Every stream name the adapter can build for its instruments → the instrument's symbol."""
    data_types = [
        data_type
        for kind in sorted(adapter.data_kinds)
        for data_type in (
            [DataType("kline", interval) for interval in sorted(adapter.kline_intervals)]
            if kind == "kline"
            else [DataType(kind)]
        )
        if adapter.supports(data_type)
    ]
    index = {}
    for instrument in adapter.instruments.values():
        for data_type in data_types:
            try:
                index[adapter.stream_name(instrument, data_type)] = instrument.symbol
            except ValueError:  # a data type this instrument's market does not carry
                continue
    return index


def new_coin(exchange: str, symbol: str, now: int = 0) -> Row:
    return {
        "exchange": exchange,
        "symbol": symbol,
        "state": "ready",
        "since": now,
        "connector": None,
        "lastReceivedAt": None,
        "lastEventAt": None,
        "records": {},
        "recordsTotal": 0,
        "rate": 0.0,
        "avgReceiveIntervalMs": None,
        "subscribeRequests": 0,
        "subscribeFailures": 0,
        "streams": [],  # the coin's subscribed streams, when events name them
        "lastError": None,
        "book": None,  # the order book's state where depth is collected: syncing, synced
        "applied": {},
    }


def new_connector(exchange: str, name: str, now: int = 0) -> Row:
    return {
        "exchange": exchange,
        "connector": name,
        "state": "ready",
        "since": now,
        "connectionId": None,
        "open": False,  # a connection of this group is open
        "connects": 0,
        "connectFailures": 0,  # attempts that never opened
        "drops": 0,  # open connections lost
        "subscribeRequests": 0,
        "subscribeOk": 0,
        "subscribeFailed": 0,
        "streamsSubscribed": 0,
        "recoveryRequests": 0,
        "recoveries": 0,
        "recoveryPending": False,
        "recoveryAttempts": 0,  # recoveries ordered since the connector was last healthy
        "lastRecoveryRequestAt": None,
        "lastFrameAt": None,  # newest frame its live connection received (source side), epoch ms
        "normalizedThrough": None,  # receipt time of the newest frame of its connection normalized
        "coins": [],
        "lastError": None,
        "lastEventAt": None,
        "applied": {},
    }


def new_collector(exchange: str, now: int = 0) -> Row:
    return {
        "exchange": exchange,
        "state": "ready",
        "since": now,
        "events": {},
        "recordsTotal": 0,
        "deadLetters": {},
        "deadLettersTotal": 0,
        "workers": {},
        "lastEventAt": None,
        "applied": {},
    }


def _fresh(row: Row, source: str, offset: int) -> bool:
    """Whether the record at `offset` of `source` has not been applied to this row yet; marks it applied."""
    applied = row.setdefault("applied", {})
    if offset <= applied.get(source, -1):
        return False
    applied[source] = offset
    return True


def _enter(row: Row, state: str, now: int) -> None:
    if row["state"] != state:
        row["state"] = state
        row["since"] = now


def success_rate(successes: int, attempts: int) -> float | None:
    return round(successes / attempts, 4) if attempts else None


@dataclass
class Changes:
    """Rows to write back, per table."""

    coins: dict[str, Row] = field(default_factory=dict)
    connectors: dict[str, Row] = field(default_factory=dict)
    collectors: dict[str, Row] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.coins or self.connectors or self.collectors)


@dataclass
class Tables:
    """Read access to the current rows (the Faust tables, or dicts in tests)."""

    coin: Lookup
    connector: Lookup
    collector: Lookup
    connectors_of: Callable[[str], Iterable[Row]]  # every connector row of an exchange


def apply_event(
    event: CollectorEvent,
    offset: int,
    tables: Tables,
    resolve_stream: Callable[[str], str | None] = lambda stream: None,
) -> Changes:
    """The rows an event changes. Pure: the caller writes the returned rows."""
    changes = Changes()
    now = event.time
    exchange = event.exchange

    name = connector_name(event)
    connector: Row | None = None
    if name is not None:
        connector = tables.connector(name) or new_connector(exchange, name, now)
        if _fresh(connector, EVENTS_SOURCE, offset):
            _apply_to_connector(connector, event)
            changes.connectors[name] = connector
        else:
            connector = None

    coins = _coins_of(event, resolve_stream)
    for symbol, streams in coins.items():
        key = coin_key(exchange, symbol)
        coin = tables.coin(key) or new_coin(exchange, symbol, now)
        if _fresh(coin, EVENTS_SOURCE, offset):
            _apply_to_coin(coin, event, name, streams)
            changes.coins[key] = coin
    if connector is not None and coins:
        on_connector = set(connector["coins"])
        if event.type in {"subscribed", "subscribe-requested"}:
            on_connector |= set(coins)
        elif event.type == "unsubscribed":
            stopped = {key for key, coin in changes.coins.items() if coin["state"] == "stopped"}
            on_connector -= {symbol for symbol in coins if coin_key(exchange, symbol) in stopped}
        connector["coins"] = sorted(on_connector)

    collector = tables.collector(exchange) or new_collector(exchange, now)
    if _fresh(collector, EVENTS_SOURCE, offset):
        events = collector["events"]
        events[event.type] = events.get(event.type, 0) + 1
        collector["lastEventAt"] = max(collector["lastEventAt"] or 0, now)
        others = [row for row in tables.connectors_of(exchange) if row["connector"] != name]
        _settle_collector(collector, [*others, *changes.connectors.values()], now)
        changes.collectors[exchange] = collector
    return changes


def _apply_to_connector(row: Row, event: CollectorEvent) -> None:
    now, kind, detail = event.time, event.type, event.detail
    row["lastEventAt"] = max(row["lastEventAt"] or 0, now)
    if kind == "connecting":
        _enter(row, "connecting", now)
    elif kind == "connected":
        row["connects"] += 1
        row["open"] = True
        row["connectionId"] = event.connection_id
        row["lastError"] = None
        if row["recoveryPending"]:
            row["recoveries"] += 1
            row["recoveryPending"] = False
        row["recoveryAttempts"] = 0
        _enter(row, "connected", now)
    elif kind == "subscribe-requested":
        row["subscribeRequests"] += 1
        _enter(row, "subscription-requesting", now)
    elif kind == "subscribed":
        row["subscribeOk"] += 1
        streams = detail.get("streams")
        row["streamsSubscribed"] += streams if isinstance(streams, int) else len(streams or [])
        if row["state"] in {"subscription-requesting", "connecting", "ready"}:
            _enter(row, "connected", now)
    elif kind == "subscribe-failed":
        row["subscribeFailed"] += 1
        row["lastError"] = f"subscribe failed: {detail.get('code', '')} {detail.get('message', '')}".strip()
    elif kind == "disconnected":
        row["drops" if row["open"] else "connectFailures"] += 1
        row["open"] = False
        row["lastError"] = str(detail.get("reason", "disconnected"))
        _enter(row, "recovering", now)
    elif kind == "stale":
        row["lastError"] = f"no frame for {detail.get('silentFor', '?')} s"
        _enter(row, "failed", now)
    elif kind == "server-shutdown":
        row["lastError"] = "the exchange announced a shutdown"
        _enter(row, "recovering", now)
    elif kind == "recover-requested":
        row["recoveryRequests"] += 1
        row["recoveryAttempts"] += 1
        row["recoveryPending"] = True
        row["lastRecoveryRequestAt"] = now
        _enter(row, "recovering", now)
    elif kind == "recovery-failed":
        row["lastError"] = str(detail.get("reason", "recovery failed"))
        _enter(row, "failed", now)


def _apply_to_coin(row: Row, event: CollectorEvent, connector: str | None, streams: list[str]) -> None:
    now, kind = event.time, event.type
    if connector is not None and kind in {"subscribe-requested", "subscribed"}:
        row["connector"] = connector
    subscribed = set(row.setdefault("streams", []))
    if kind == "subscribe-requested":
        row["subscribeRequests"] += 1
        if row["state"] != "subscribed":  # adding a data type to a flowing coin does not stop it
            _enter(row, "requested", now)
    elif kind == "subscribed":
        row["streams"] = sorted(subscribed | set(streams))
        row["lastError"] = None
        _enter(row, "subscribed", now)
    elif kind == "subscribe-failed":
        row["subscribeFailures"] += 1
        row["lastError"] = str(event.detail.get("message") or "subscribe failed")
        if not subscribed - set(streams):
            _enter(row, "stopped", now)
    elif kind == "unsubscribed":
        remaining = subscribed - set(streams) if streams else set()
        row["streams"] = sorted(remaining)
        if not remaining:
            _enter(row, "stopped", now)
    elif kind == "unknown-symbols":
        row["lastError"] = "the exchange does not list this symbol"
        _enter(row, "stopped", now)


def _settle_collector(row: Row, connectors: Iterable[Row], now: int) -> None:
    states = [c["state"] for c in connectors]
    if any(state in CONNECTOR_UP for state in states):
        _enter(row, "running", now)
    elif states:
        _enter(row, "stopped", now)


def apply_flow(summary: FlowSummary, offset: int, tables: Tables) -> Changes:
    """The rows a flow summary changes: the coins' flow and the collector's rates and workers."""
    changes = Changes()
    exchange = summary.exchange
    seconds = max((summary.ended_at - summary.started_at) / 1000.0, 0.001)
    total = 0
    flowing: dict[str, int] = {}  # connector → newest receipt of a record of a coin it carries
    for symbol, flow in summary.coins.items():
        key = coin_key(exchange, symbol)
        coin = tables.coin(key) or new_coin(exchange, symbol, summary.started_at)
        count = sum(flow.records.values())
        total += count
        if not _fresh(coin, FLOW_SOURCE, offset):
            continue
        records = coin["records"]
        for kind, n in flow.records.items():
            records[kind] = records.get(kind, 0) + n
        coin["recordsTotal"] += count
        coin["rate"] = round(count / seconds, 3)
        if count:
            interval = seconds * 1000.0 / count
            previous = coin["avgReceiveIntervalMs"]
            average = interval if previous is None else previous + _AVERAGE_WEIGHT * (interval - previous)
            coin["avgReceiveIntervalMs"] = round(average, 3)
        if flow.last_received_at > (coin["lastReceivedAt"] or 0):
            coin["lastReceivedAt"] = flow.last_received_at
        if flow.last_event_at > (coin["lastEventAt"] or 0):
            coin["lastEventAt"] = flow.last_event_at
        # Data flowing proves the subscription, except the tail of records already in flight when it stopped.
        stopped_before = coin["state"] == "stopped" and flow.last_received_at > coin["since"]
        if coin["state"] in {"ready", "requested"} or stopped_before:
            coin["lastError"] = None
            _enter(coin, "subscribed", flow.last_received_at)
        changes.coins[key] = coin
        if count and coin.get("connector"):
            flowing[coin["connector"]] = max(flowing.get(coin["connector"], 0), flow.last_received_at)

    if not _acknowledges_subscriptions(exchange):
        _subscribed_by_data(flowing, tables, changes)
    _apply_book_flow(summary, tables, changes)
    _apply_connection_flow(summary, tables, changes)
    collector = tables.collector(exchange) or new_collector(exchange, summary.started_at)
    if _fresh(collector, FLOW_SOURCE, offset):
        collector["recordsTotal"] += total
        dead = collector["deadLetters"]
        for reason, n in summary.dead_letters.items():
            dead[reason] = dead.get(reason, 0) + n
            collector["deadLettersTotal"] += n
        collector["workers"][summary.worker] = {
            "at": summary.ended_at,
            "rate": round(total / seconds, 3),
            "bytesPerSecond": round(summary.raw_bytes / seconds, 1),
            "deadLettersPerSecond": round(sum(summary.dead_letters.values()) / seconds, 3),
            "latency": summary.latency,
            **({"books": _book_counts(summary.books)} if summary.books else {}),
            **summary.process,
        }
        if summary.queue_usage is not None:
            collector["workers"][summary.worker]["queueUsage"] = msgspec.to_builtins(summary.queue_usage)
        if total and collector["state"] == "ready":
            _enter(collector, "running", summary.ended_at)
        changes.collectors[exchange] = collector
    return changes


def _acknowledges_subscriptions(exchange: str) -> bool:
    try:
        return adapter_class(exchange).acknowledges_subscriptions
    except KeyError:
        return True


def _subscribed_by_data(flowing: dict[str, int], tables: Tables, changes: Changes) -> None:
    """Exchanges that never acknowledge a subscription (Upbit, Bithumb) prove it by sending data: a
    connector requesting subscriptions whose coins' records were received after the request is
    subscribed, as a `subscribed` event would have made it. Replays change nothing (the state moved on)."""
    for name, received_at in flowing.items():
        connector = changes.connectors.get(name) or tables.connector(name)
        if connector is None or connector["state"] != "subscription-requesting":
            continue
        if received_at > connector["since"]:
            connector["subscribeOk"] += 1
            _enter(connector, "connected", received_at)
            changes.connectors[name] = connector


def _apply_book_flow(summary: FlowSummary, tables: Tables, changes: Changes) -> None:
    """Each order book's state, as the worker keeping it reports it, and its newest item: a book
    syncing receives diffs but publishes nothing until its snapshot, and its coin is not silent. A
    row changes only when one of them does (a flow summary lists every book, every interval)."""
    for symbol, book in summary.books.items():
        key = coin_key(summary.exchange, symbol)
        coin = (
            changes.coins.get(key)
            or tables.coin(key)
            or new_coin(summary.exchange, symbol, summary.started_at)
        )
        changed = coin.get("book") != book.state
        coin["book"] = book.state
        if book.heard_at > (coin["lastReceivedAt"] or 0):
            coin["lastReceivedAt"] = book.heard_at
            changed = True
        if changed:
            changes.coins[key] = coin


def _book_counts(books: dict[str, BookFlow]) -> dict[str, int]:
    counts = {"synced": 0, "syncing": 0}
    for book in books.values():
        counts[book.state] = counts.get(book.state, 0) + 1
    return counts


def _apply_connection_flow(summary: FlowSummary, tables: Tables, changes: Changes) -> None:
    """How far the source has received and the normalize agent has got, per connector. Both only
    move forward, so a summary applied twice (a replay) changes nothing."""
    for name, heard in summary.connections.items():
        connector = changes.connectors.get(name) or tables.connector(name)
        if connector is not None and heard > (connector.get("lastFrameAt") or 0):
            connector["lastFrameAt"] = heard
            changes.connectors[name] = connector
    if not summary.normalized:
        return
    for connector in tables.connectors_of(summary.exchange):
        connector = changes.connectors.get(connector["connector"], connector)
        through = summary.normalized.get(connector.get("connectionId") or "")
        if through is not None and through > (connector.get("normalizedThrough") or 0):
            connector["normalizedThrough"] = through
            changes.connectors[connector["connector"]] = connector
