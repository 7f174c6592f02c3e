"""Subscription rules, pure: connection groups, request validation, applying commands, config seeding.

Everything here is free of I/O and of the Faust app, so the control agent, the `/subscriptions`
view and the `collector subscribe` command line share one set of rules.

Groups. Each (exchange, symbol) belongs to the connection group `<exchange>:<n>` with
n = crc32(symbol) % groups, where groups = min(connections.max, COMMANDS_PARTITIONS). A group's
commands (and so its subscription rows) live in partition n of `collector.commands` and of the
subscription table: whichever worker Kafka assigns partition n runs group n of every exchange.

Rows are keyed `group|symbol`. When `connections.max` changes, a symbol's group changes too: its
next command (every start sends seeds) copies the old row into the new group, and rows whose group
is no longer the symbol's group are ignored.

Seeding rule. The config's `symbols x dataTypes` is the starting point, not the truth: at every
start each worker sends one seed command per configured symbol, and a seed only adds the data types
that earlier seeds of that key have not added yet (the row remembers them in `seeded`). So a runtime
unsubscribe survives restarts (the data type is in `seeded`, the seed skips it), a data type or
symbol added to the config later is subscribed at the next start, and removing something from the
config unsubscribes nothing (use `collector unsubscribe`). Seeds are idempotent, so several workers
seeding at once is harmless.
"""

from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from streams.commands import SubscriptionCommand
from streams.exchanges import adapter_class
from streams.exchanges.base import DataType

COMMANDS_PARTITIONS = 8  # fixed once the topic exists: it bounds the connection groups per exchange
SEED_PREFIX = "config:"  # command ids of config seeds start with this
RECENT_COMMANDS = 32  # command ids a row remembers, to skip a replayed command
_SYMBOL = re.compile(r"^(?P<base>[A-Za-z0-9]{1,20})[/-](?P<quote>[A-Za-z0-9]{1,20})$")

Action = Literal["subscribe", "unsubscribe"]
Row = dict[str, Any]


class RequestError(ValueError):
    """A subscription request that cannot be accepted; the message says why and what to write."""


def groups_per_exchange(max_connections: int) -> int:
    return max(1, min(max_connections, COMMANDS_PARTITIONS))


def group_index(symbol: str, groups: int) -> int:
    return zlib.crc32(symbol.encode()) % groups


def group_name(exchange: str, index: int) -> str:
    return f"{exchange}:{index}"


def group_of(exchange: str, symbol: str, groups: int) -> str:
    return group_name(exchange, group_index(symbol, groups))


def group_partition(group: str) -> int:
    """The partition of `collector.commands` and of the subscription table holding this group."""
    return int(group.rsplit(":", 1)[1])


def row_key(group: str, symbol: str) -> str:
    """The table key: the group is part of it, so a row never has copies in two partitions."""
    return f"{group}|{symbol}"


def moved_row(row: Row, group: str) -> Row:
    """A row re-homed to another group (after connections.max changed): same wishes, new group."""
    return {**row, "group": group, "recentCommands": []}


def normalize_symbol(text: str) -> str:
    """`BTC/USDT`, `btc/usdt`, `btc-usdt` → `BTC/USDT`; RequestError for anything else."""
    match = _SYMBOL.match(text)
    if match is None:
        raise RequestError(f"symbol {text!r} is not BASE/QUOTE, e.g. BTC/USDT (or btc-usdt)")
    return f"{match['base']}/{match['quote']}".upper()


def check_data_types(exchange: str, data_types: Iterable[str]) -> list[str]:
    """The data types, deduplicated in order; RequestError naming the first one that is wrong."""
    supported = adapter_class(exchange)
    checked: list[str] = []
    for text in data_types:
        try:
            data_type = DataType.parse(text)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if not supported.supports(data_type):
            raise RequestError(f"{exchange} does not offer data type {text}")
        if text not in checked:
            checked.append(text)
    if not checked:
        raise RequestError("list at least one data type, e.g. trade or kline_1m")
    return checked


def check_exchange(exchange: str, configured: Collection[str]) -> str:
    if exchange not in configured:
        known = ", ".join(sorted(configured)) or "none"
        raise RequestError(f"exchange {exchange!r} is not configured on this collector (configured: {known})")
    return exchange


@dataclass(frozen=True)
class Request:
    exchange: str
    symbol: str
    data_types: list[str]


def parse_request(body: Any, configured: Collection[str]) -> Request:
    """A `/subscriptions` body `{"exchange", "symbol", "dataTypes"}` checked field by field."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object: {"exchange", "symbol", "dataTypes"}')
    missing = [name for name in ("exchange", "symbol", "dataTypes") if name not in body]
    if missing:
        raise RequestError(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - {"exchange", "symbol", "dataTypes"})
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}")
    exchange, symbol, data_types = body["exchange"], body["symbol"], body["dataTypes"]
    if not isinstance(exchange, str):
        raise RequestError("exchange must be a string, e.g. binance")
    if not isinstance(symbol, str):
        raise RequestError("symbol must be a string, e.g. BTC/USDT")
    if not isinstance(data_types, list) or not all(isinstance(t, str) for t in data_types):
        raise RequestError('dataTypes must be a list of strings, e.g. ["trade", "kline_1m"]')
    return check_request(exchange, symbol, data_types, configured)


def check_request(
    exchange: str, symbol: str, data_types: Iterable[str], configured: Collection[str]
) -> Request:
    check_exchange(exchange, configured)
    return Request(exchange, normalize_symbol(symbol), check_data_types(exchange, data_types))


def new_command(action: Action, request: Request, now_ms: int) -> SubscriptionCommand:
    return SubscriptionCommand(
        action=action,
        exchange=request.exchange,
        symbol=request.symbol,
        data_types=list(request.data_types),
        command_id=uuid.uuid4().hex,
        requested_at=now_ms,
    )


def is_seed(command: SubscriptionCommand) -> bool:
    return command.command_id.startswith(SEED_PREFIX)


def seed_commands(
    exchanges: Mapping[str, tuple[Iterable[str], Iterable[str]]], now_ms: int
) -> list[SubscriptionCommand]:
    """One seed per configured (exchange, symbol), from exchange → (symbols, data types)."""
    commands = []
    for exchange, (symbols, data_types) in exchanges.items():
        types = sorted(set(data_types))
        for symbol in symbols:
            # Deterministic: a seed replayed or repeated by another worker is recognised as such.
            digest = zlib.crc32(",".join(types).encode())
            commands.append(
                SubscriptionCommand(
                    action="subscribe",
                    exchange=exchange,
                    symbol=symbol,
                    data_types=types,
                    command_id=f"{SEED_PREFIX}{exchange}:{symbol}:{digest:08x}",
                    requested_at=now_ms,
                )
            )
    return commands


def new_row(exchange: str, symbol: str, group: str) -> Row:
    return {
        "exchange": exchange,
        "symbol": symbol,
        "group": group,
        "dataTypes": [],
        "seeded": [],
        "updatedAt": 0,
        "recentCommands": [],
    }


@dataclass(frozen=True)
class Outcome:
    row: Row
    changed: bool  # the data types changed: the group's connections must follow
    replayed: bool  # the command had been applied already and was skipped


def apply_command(row: Row | None, command: SubscriptionCommand, group: str) -> Outcome:
    """The subscription row after a validated command. Pure: returns a new row."""
    current = new_row(command.exchange, command.symbol, group) if row is None else row
    if command.command_id in current["recentCommands"]:
        return Outcome(current, changed=False, replayed=True)
    before = list(current["dataTypes"])
    types = set(before)
    seeded = list(current["seeded"])
    if command.action == "unsubscribe":
        types -= set(command.data_types)
    elif is_seed(command):
        fresh = [t for t in command.data_types if t not in seeded]
        types |= set(fresh)
        seeded = sorted(set(seeded) | set(fresh))
    else:
        types |= set(command.data_types)
    recent = [*current["recentCommands"], command.command_id][-RECENT_COMMANDS:]
    updated = {
        **current,
        "group": group,
        "dataTypes": sorted(types),
        "seeded": seeded,
        "updatedAt": max(current["updatedAt"], command.requested_at),
        "recentCommands": recent,
    }
    return Outcome(updated, changed=sorted(types) != sorted(before), replayed=False)


def group_symbols(rows: Iterable[Row], group: str) -> dict[str, list[str]]:
    """symbol → data types of the rows in a group that want any data."""
    return {
        row["symbol"]: list(row["dataTypes"])
        for row in rows
        if row.get("group") == group and row["dataTypes"]
    }
