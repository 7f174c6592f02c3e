"""The subscription table, the `collector.commands` topic, and the `/subscriptions` views.

The table holds the desired subscriptions, key `group|symbol` → row (see subscription_rules),
materialized from `collector.commands` by the control agent. Commands are produced to the partition
of their connection group, so the table row of a group lives in that partition too: the worker
Kafka assigns partition n owns group n of every exchange, runs its connections, and answers for it.

`GET /subscriptions` gathers the rows from every worker that owns some partitions (each answers
`GET /subscriptions?scope=local` with the rows and groups it owns). `POST` and `DELETE` validate the
body and produce a command to the owning partition; any worker can take them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from faust import web

from streams.app import app, config
from streams.commands import SubscriptionCommand, encode_command
from streams.topics import COMMANDS
from tables.subscription_rules import (
    COMMANDS_PARTITIONS,
    RequestError,
    Row,
    group_name,
    group_of,
    group_partition,
    groups_per_exchange,
    new_command,
    parse_request,
    row_key,
)

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = 5.0

commands_topic = app.topic(
    COMMANDS,
    partitions=COMMANDS_PARTITIONS,
    key_serializer="raw",
    value_serializer="raw",
    internal=True,  # Faust creates it with COMMANDS_PARTITIONS before anyone produces to it
)
subscriptions = app.Table(
    "subscriptions",
    partitions=COMMANDS_PARTITIONS,
    key_type=str,
    help="Desired subscriptions, key group|symbol, partition = connection group",
)

GroupReport = Callable[[], dict[str, Any]]
_group_report: GroupReport = dict


def use_group_report(report: GroupReport) -> None:
    """Let the views show the connection groups this worker runs (group → status)."""
    global _group_report
    _group_report = report


def groups_of(exchange: str) -> int:
    return groups_per_exchange(config.exchanges[exchange].connections.max)


def command_group(command: SubscriptionCommand) -> str:
    return group_of(command.exchange, command.symbol, groups_of(command.exchange))


async def send_command(command: SubscriptionCommand) -> str:
    """Produce a command to its group's partition; returns the group."""
    [group] = await send_commands([command])
    return group


async def send_commands(commands: Sequence[SubscriptionCommand]) -> list[str]:
    """Produce commands to their groups' partitions, in order, and wait until the broker has them all;
    returns their groups. Handed over together, they share produce requests: one awaited round trip
    each (at least the producer's linger) made seeding 1,000 symbols take minutes on a busy broker."""
    await commands_topic.maybe_declare()
    groups, delivered = [], []
    for command in commands:
        group = command_group(command)
        groups.append(group)
        delivered.append(
            await app.producer.send(
                COMMANDS,
                command.symbol.encode(),
                encode_command(command),
                partition=group_partition(group),
                timestamp=None,
                headers=None,
            )
        )
    await asyncio.gather(*delivered)
    return groups


def owned_partitions() -> set[int]:
    """Partitions of `collector.commands` (and so of the table) this worker is active for."""
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == COMMANDS}


def partition_owners() -> dict[int, str]:
    """Table partition → URL of the worker that owns it, from the last rebalance."""
    changelog = subscriptions.changelog_topic.get_topic_name()
    return {
        partition: url
        for url, topics in app.assignor.table_metadata(changelog).items()
        for partition in topics.get(changelog, [])
    }


def is_current(row: Row) -> bool:
    """False for a row left in a group its symbol no longer belongs to (connections.max changed)."""
    exchange = row.get("exchange")
    return exchange in config.exchanges and row.get("group") == group_of(
        exchange, row["symbol"], groups_of(exchange)
    )


def current_rows() -> list[Row]:
    return [value for value in subscriptions.values() if isinstance(value, dict) and is_current(value)]


def earlier_row(exchange: str, symbol: str) -> Row | None:
    """The symbol's row in another group, from before connections.max changed, if this worker has it."""
    for index in range(COMMANDS_PARTITIONS):
        row = subscriptions.get(row_key(group_name(exchange, index), symbol))
        if isinstance(row, dict) and not is_current(row):
            return row
    return None


def local_rows() -> list[Row]:
    owned = owned_partitions()
    return [row for row in current_rows() if group_partition(row["group"]) in owned]


def local_report() -> dict[str, Any]:
    return {
        "worker": str(app.conf.canonical_url),
        "partitions": sorted(owned_partitions()),
        "subscriptions": local_rows(),
        "groups": _group_report(),
    }


def public_row(row: Row, worker: str | None, running: dict[str, Any]) -> Row:
    return {
        "exchange": row["exchange"],
        "symbol": row["symbol"],
        "dataTypes": row["dataTypes"],
        "group": row["group"],
        "worker": worker,
        "running": row["group"] in running,
        "updatedAt": row["updatedAt"],
    }


async def _remote_report(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
    async with app.http_client.get(f"{url.rstrip('/')}/subscriptions?scope=local", timeout=timeout) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
        report: dict[str, Any] = await resp.json()
        return report


async def gather_reports() -> tuple[list[dict[str, Any]], list[str]]:
    me = str(app.conf.canonical_url)
    reports = [local_report()]
    others = sorted(set(partition_owners().values()) - {me})
    results = await asyncio.gather(*(_remote_report(url) for url in others), return_exceptions=True)
    unreachable = []
    for url, result in zip(others, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("subscriptions: worker %s did not answer: %r", url, result)
            unreachable.append(url)
        else:
            reports.append(result)
    return reports, unreachable


def merge_reports(reports: list[dict[str, Any]]) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    groups: dict[str, Any] = {}
    for report in reports:
        running = report.get("groups") or {}
        for group, status in running.items():
            groups[group] = {"worker": report["worker"], **status}
        # A row whose data types were all unsubscribed stays in the table (see the seeding rule) but
        # is no subscription.
        rows += [public_row(r, report["worker"], running) for r in report["subscriptions"] if r["dataTypes"]]
    rows.sort(key=lambda row: (row["exchange"], row["symbol"]))
    return rows, dict(sorted(groups.items()))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@app.page("/subscriptions")
class Subscriptions(web.View):
    async def get(self, request: web.Request) -> web.Response:
        if request.query.get("scope") == "local":
            return self.json(local_report())
        if not partition_owners():
            return self.json({"error": "this worker has not joined the group yet; retry shortly"}, status=503)
        reports, unreachable = await gather_reports()
        rows, groups = merge_reports(reports)
        exchange = request.query.get("exchange")
        if exchange is not None:
            rows = [row for row in rows if row["exchange"] == exchange]
        body = {
            "subscriptions": rows,
            "groups": groups,
            "time": _now_ms(),
            "servedBy": str(app.conf.canonical_url),
        }
        if unreachable:
            body["unreachableWorkers"] = unreachable
        return self.json(body)

    async def post(self, request: web.Request) -> web.Response:
        return await self._command("subscribe", request)

    async def delete(self, request: web.Request) -> web.Response:
        return await self._command("unsubscribe", request)

    async def _command(self, action: str, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return self.json({"error": f"the body is not valid JSON: {exc}"}, status=400)
        except RecursionError:
            return self.json({"error": "the body is not valid JSON: nested too deeply"}, status=400)
        try:
            parsed = parse_request(body, config.exchanges)
        except RequestError as exc:
            return self.json({"error": str(exc)}, status=422 if isinstance(body, dict) else 400)
        command = new_command("subscribe" if action == "subscribe" else "unsubscribe", parsed, _now_ms())
        try:
            group = await send_command(command)
        except Exception as exc:  # the broker boundary: the client must hear that nothing was queued
            log.exception("subscriptions: could not produce a %s command", action)
            return self.json({"error": f"could not queue the command: {exc}"}, status=503)
        return self.json(
            {
                "commandId": command.command_id,
                "action": command.action,
                "exchange": command.exchange,
                "symbol": command.symbol,
                "dataTypes": command.data_types,
                "group": group,
            },
            status=202,
        )
