"""`GET /books/{exchange}/{symbol}?levels=N`: a symbol's current order book, served by the worker
that keeps it.

A book is kept by the normalize agent that normalizes its connection group's raw partition, and
partition n of the raw topics goes with partition n of `collector.commands` (streams/app.py). So the
symbol's group (tables/subscription_rules.py) names the partition, the partition names the owner:
this worker answers when it owns the partition, any other forwards the request there (`forwarded=1`
keeps a forwarded request from travelling further while the group rebalances).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import faust
from faust import web

from streams.config import CollectorConfig
from tables.subscription_rules import group_of, group_partition
from tables.subscriptions import Subscriptions
from tables.views import parse_symbol

log = logging.getLogger(__name__)

FORWARD_TIMEOUT = 5.0
MAX_LEVELS = 5000
LocalBook = Callable[[str, str, int], dict[str, Any] | None]  # (exchange, symbol, levels) → the book


def levels_asked(text: str | None, default: int) -> int | None:
    """`?levels=`: 1 to MAX_LEVELS, the exchange's configured levels when absent; None when invalid."""
    if text is None:
        return default
    if not (text.isdigit() and text.isascii()) or not 1 <= int(text) <= MAX_LEVELS:
        return None
    return int(text)


def install_book_views(
    app: faust.App, config: CollectorConfig, subscriptions: Subscriptions, local: LocalBook | None
) -> None:
    """The `/books` view; `local` reads this worker's books (None on a worker that collects nothing)."""

    def me() -> str:
        return str(app.conf.canonical_url)

    async def forward(owner: str, exchange: str, symbol: str, levels: int) -> tuple[int, Any]:
        url = f"{owner.rstrip('/')}/books/{exchange}/{symbol.replace('/', '-')}"
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
        params = {"levels": str(levels), "forwarded": "1"}
        async with app.http_client.get(url, params=params, timeout=timeout) as response:
            return response.status, await response.json(content_type=None)

    @app.page("/books/{exchange}/{symbol:.+}")
    class Book(web.View):
        async def get(self, request: web.Request, exchange: str, symbol: str) -> web.Response:
            if exchange not in config.exchanges:
                return self.json({"error": f"exchange {exchange!r} is not configured"}, status=404)
            normalized = parse_symbol(symbol)
            if normalized is None:
                return self.json(
                    {"error": f"{symbol!r} is not a symbol: write BASE/QUOTE (BTC/USDT) or base-quote"},
                    status=400,
                )
            levels = levels_asked(request.query.get("levels"), config.depth_settings(exchange).levels)
            if levels is None:
                return self.json(
                    {"error": f"levels must be a whole number from 1 to {MAX_LEVELS}"}, status=400
                )
            group = group_of(exchange, normalized, subscriptions.groups_of(exchange))
            partition = group_partition(group)
            if partition in subscriptions.owned_partitions() or request.query.get("forwarded"):
                book = local(exchange, normalized, levels) if local is not None else None
                if book is None:
                    return self.json(
                        {"error": f"no order book of {exchange} {normalized}: depth is not subscribed, or "
                         "no diff has arrived yet", "group": group, "servedBy": me()},
                        status=404,
                    )  # fmt: skip
                return self.json({**book, "group": group, "servedBy": me()})
            owner = subscriptions.partition_owners().get(partition)
            if owner is None or owner == me():
                return self.json(
                    {"error": f"no worker owns {group} right now (the workers are rebalancing); retry"},
                    status=503,
                )
            try:
                status, body = await forward(owner, exchange, normalized, levels)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("books: %s did not answer for %s %s: %r", owner, exchange, normalized, exc)
                return self.json(
                    {"error": f"the worker keeping {group} ({owner}) did not answer; retry"}, status=503
                )
            return self.json(body, status=status)
