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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
import faust
from faust import web

from streams.commands import SubscriptionCommand, encode_command
from streams.config import ExchangeConfig
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

GroupReport = Callable[[], dict[str, Any]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Subscriptions:
    """The subscription table and the commands topic it is built from, on one worker."""

    def __init__(
        self, app: faust.App, exchanges: Mapping[str, ExchangeConfig], group_report: GroupReport = dict
    ) -> None:
        self.app = app
        self.exchanges = exchanges
        # The connection groups this worker runs (group → status), for the views.
        self._group_report = group_report
        self.topic = app.topic(
            COMMANDS,
            partitions=COMMANDS_PARTITIONS,
            key_serializer="raw",
            value_serializer="raw",
            internal=True,  # Faust creates it with COMMANDS_PARTITIONS before anyone produces to it
        )
        self.table = app.Table(
            "subscriptions",
            partitions=COMMANDS_PARTITIONS,
            key_type=str,
            help="Desired subscriptions, key group|symbol, partition = connection group",
        )

    def groups_of(self, exchange: str) -> int:
        return groups_per_exchange(self.exchanges[exchange].connections.max)

    def command_group(self, command: SubscriptionCommand) -> str:
        return group_of(command.exchange, command.symbol, self.groups_of(command.exchange))

    async def send_command(self, command: SubscriptionCommand) -> str:
        """Produce a command to its group's partition; returns the group."""
        [group] = await self.send_commands([command])
        return group

    async def send_commands(self, commands: Sequence[SubscriptionCommand]) -> list[str]:
        """Produce commands to their groups' partitions, in order, and wait until the broker has them
        all; returns their groups. Handed over together, they share produce requests: one awaited round
        trip each (at least the producer's linger) made seeding 1,000 symbols take minutes on a busy
        broker."""
        await self.topic.maybe_declare()
        groups, delivered = [], []
        for command in commands:
            group = self.command_group(command)
            groups.append(group)
            delivered.append(
                await self.app.producer.send(
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

    def owned_partitions(self) -> set[int]:
        """Partitions of `collector.commands` (and so of the table) this worker is active for."""
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == COMMANDS}

    def partition_owners(self) -> dict[int, str]:
        """Table partition → URL of the worker that owns it, from the last rebalance."""
        changelog = self.table.changelog_topic.get_topic_name()
        return {
            partition: url
            for url, topics in self.app.assignor.table_metadata(changelog).items()
            for partition in topics.get(changelog, [])
        }

    def is_current(self, row: Row) -> bool:
        """False for a row left in a group its symbol no longer belongs to (connections.max changed)."""
        exchange = row.get("exchange")
        if not isinstance(exchange, str) or exchange not in self.exchanges:
            return False
        return row.get("group") == group_of(exchange, row["symbol"], self.groups_of(exchange))

    def current_rows(self) -> list[Row]:
        return [value for value in self.table.values() if isinstance(value, dict) and self.is_current(value)]

    def earlier_row(self, exchange: str, symbol: str) -> Row | None:
        """The symbol's row in another group, from before connections.max changed, if this worker has it."""
        for index in range(COMMANDS_PARTITIONS):
            row = self.table.get(row_key(group_name(exchange, index), symbol))
            if isinstance(row, dict) and not self.is_current(row):
                return row
        return None

    def local_rows(self) -> list[Row]:
        owned = self.owned_partitions()
        return [row for row in self.current_rows() if group_partition(row["group"]) in owned]

    def local_report(self) -> dict[str, Any]:
        return {
            "worker": str(self.app.conf.canonical_url),
            "partitions": sorted(self.owned_partitions()),
            "subscriptions": self.local_rows(),
            "groups": self._group_report(),
        }

    async def _remote_report(self, url: str) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
        async with self.app.http_client.get(
            f"{url.rstrip('/')}/subscriptions?scope=local", timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            report: dict[str, Any] = await resp.json()
            return report

    async def gather_reports(self) -> tuple[list[dict[str, Any]], list[str]]:
        me = str(self.app.conf.canonical_url)
        reports = [self.local_report()]
        others = sorted(set(self.partition_owners().values()) - {me})
        results = await asyncio.gather(*(self._remote_report(url) for url in others), return_exceptions=True)
        unreachable = []
        for url, result in zip(others, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("subscriptions: worker %s did not answer: %r", url, result)
                unreachable.append(url)
            else:
                reports.append(result)
        return reports, unreachable


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


def install_subscription_views(app: faust.App, subscriptions: Subscriptions) -> None:
    """`GET|POST|DELETE /subscriptions` on this worker's web server."""
    exchanges = subscriptions.exchanges

    @app.page("/subscriptions")
    class SubscriptionsView(web.View):
        async def get(self, request: web.Request) -> web.Response:
            if request.query.get("scope") == "local":
                return self.json(subscriptions.local_report())
            if not subscriptions.partition_owners():
                return self.json(
                    {"error": "this worker has not joined the group yet; retry shortly"}, status=503
                )
            reports, unreachable = await subscriptions.gather_reports()
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
                parsed = parse_request(body, exchanges)
            except RequestError as exc:
                return self.json({"error": str(exc)}, status=422 if isinstance(body, dict) else 400)
            command = new_command("subscribe" if action == "subscribe" else "unsubscribe", parsed, _now_ms())
            try:
                group = await subscriptions.send_command(command)
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
