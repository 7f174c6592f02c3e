"""JSON web views over the state tables, and the dashboard page.

Table-backed views go through `app.table_route`: a worker that does not own the state partition
forwards the request to the one that does, so every worker gives the same answer. The composition
root (agents/worker.py) installs them with `install_views`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import aiohttp
import faust
from aiokafka.errors import KafkaError
from faust import web

from streams.config import CollectorConfig
from tables.manager import (
    ManagerSettings,
    coin_age_ms,
    describe_bytes,
    describe_lag,
    is_stale,
    pipeline_behind_ms,
    pipeline_lag_ms,
)
from tables.records import QueueUsage
from tables.state import CONNECTOR_UP, Row, coin_key, success_rate
from tables.store import StateStore, rows
from tables.summary import collector_overview, spool_bytes

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
_SYMBOL = re.compile(r"^(?P<base>[A-Za-z0-9]{1,20})[/-](?P<quote>[A-Za-z0-9]{1,20})$")
BROKER_CHECK_TIMEOUT = 3.0
FORWARD_TIMEOUT = 10.0

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[web.Response]])


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _no_spool() -> Mapping[str, QueueUsage]:
    return {}


def public(row: Row) -> Row:
    return {key: value for key, value in row.items() if key != "applied"}


def coin_view(row: Row, now: int, settings: ManagerSettings) -> Row:
    age = coin_age_ms(row, now)
    return {
        **public(row),
        "ageSeconds": None if age is None else round(age / 1000, 3),
        "stale": is_stale(row, now, settings.stale_after_ms),
    }


def connector_view(row: Row, now: int) -> Row:
    return {
        **public(row),
        "stateSeconds": round(max(now - row["since"], 0) / 1000, 3),
        "connectionSuccessRate": success_rate(row["connects"], row["connects"] + row["connectFailures"]),
        "subscriptionSuccessRate": success_rate(
            row["subscribeOk"], row["subscribeOk"] + row["subscribeFailed"]
        ),
        "recoverySuccessRate": success_rate(row["recoveries"], row["recoveryRequests"]),
        "activeCoins": len(row.get("coins") or []),
        "pipelineLagMs": pipeline_lag_ms(row),
    }


def parse_symbol(text: str) -> str | None:
    """`BTC/USDT`, `btc-usdt` → `BTC/USDT`."""
    match = _SYMBOL.match(text)
    return f"{match['base']}/{match['quote']}".upper() if match else None


async def broker_reachable(app: faust.App) -> tuple[bool, str]:
    client = getattr(getattr(app.producer, "_producer", None), "client", None)
    if client is None:
        return False, "the producer has not started"
    try:
        await asyncio.wait_for(client.fetch_all_metadata(), BROKER_CHECK_TIMEOUT)
    except TimeoutError:
        # A paused or overloaded broker keeps the connection open and answers nothing.
        log.warning("health: no answer to a metadata request within %.0f s", BROKER_CHECK_TIMEOUT)
        return False, f"no answer to a metadata request within {BROKER_CHECK_TIMEOUT:.0f} s"
    except (KafkaError, OSError) as exc:
        log.warning("health: broker metadata request failed: %r", exc)
        return False, f"{type(exc).__name__}: {exc}"
    return True, "metadata received"


class SinksHealth(Protocol):
    """What /health reads of the worker's sinks (agents/sinks/health.py: SinkHealth)."""

    def reasons(self, now: int) -> list[str]: ...

    def report(self, now: int) -> dict[str, dict[str, Any]]: ...


class StateViews:
    """What the JSON views answer, from this worker's state tables."""

    def __init__(
        self,
        app: faust.App,
        config: CollectorConfig,
        store: StateStore,
        sinks: SinksHealth | None = None,
        local_spool: Callable[[], Mapping[str, QueueUsage]] | None = None,
        local_reasons: Callable[[], list[str]] | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.store = store
        self.sinks = sinks  # the answering worker's sinks, when it runs any
        # This worker's raw spools, read live (agents/metrics.py spool_usage): while the broker is
        # away, its flow reports cannot reach the collectors table.
        self.local_spool = local_spool or _no_spool
        # This worker's own reasons to fail /health (its embedded broker's: agents/broker_watch.py).
        self.local_reasons = local_reasons or list
        # The config does not change after start; views read the thresholds per coin.
        self.settings = ManagerSettings.from_alerts(config.monitoring.alerts)
        # Any exchange routes to partition 0 of the one-partition state tables.
        self.routing_key = next(iter(config.exchanges))

    def answered_by_owner(self, **key: str) -> Callable[[_Handler], _Handler]:
        """`app.table_route` over the state tables: a worker that does not own the key forwards the
        request to the one that does (`exact_key=`, or `match_info=` naming the URL part that holds the
        exchange). While the owner is gone (until the rebalance hands its partition over) the answer is a
        503."""

        def decorate(handler: _Handler) -> _Handler:
            routed = self.app.table_route(table=self.store.coins, **key)(handler)

            @wraps(handler)
            async def answer(view: web.View, request: web.Request, *args: Any, **kwargs: Any) -> web.Response:
                try:
                    return await asyncio.wait_for(routed(view, request, *args, **kwargs), FORWARD_TIMEOUT)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("could not forward %s to the state owner: %r", request.url, exc)
                    return view.json(
                        {"error": f"the worker owning the state did not answer ({exc}); retry"}, status=503
                    )

            return cast(_Handler, answer)

        return decorate

    async def health_report(self) -> tuple[int, dict[str, Any]]:
        store, settings = self.store, self.settings
        now = _wall_ms()
        reasons: list[str] = []
        reachable, broker_detail = await broker_reachable(self.app)
        if not reachable:
            reasons.append(f"broker unreachable: {broker_detail}")
        collector_states = {}
        for exchange in self.config.exchanges:
            row = store.collectors.get(exchange)
            state = row["state"] if row else "ready"
            collector_states[exchange] = state
            if state != "running":
                reasons.append(f"collector {exchange} is {state}")
        stale = sorted(
            coin_key(row["exchange"], row["symbol"])
            for row in rows(store.coins)
            if is_stale(row, now, settings.stale_after_ms)
        )
        if stale:
            listed = ", ".join(stale[:10]) + (f" and {len(stale) - 10} more" if len(stale) > 10 else "")
            reasons.append(f"{len(stale)} stale coins: {listed}")
        behind = {
            row["connector"]: lag
            for row in rows(store.connectors)
            if (lag := pipeline_behind_ms(row, settings.behind_after_ms)) is not None
        }
        for name, lag in sorted(behind.items()):
            reasons.append(f"records of {name} are {describe_lag(lag)} behind its frames")
        spools = self.spools(now)
        for exchange, held in spools.items():
            if held > settings.spool_alert_bytes:
                held_text = describe_bytes(held)
                reasons.append(f"the raw spool of {exchange} holds {held_text} the broker has not taken")
        if self.sinks is not None:
            reasons += self.sinks.reasons(now)
        reasons += self.local_reasons()
        body: dict[str, Any] = {
            "status": "ok" if not reasons else "unhealthy",
            "reasons": reasons,
            "broker": {"reachable": reachable, "detail": broker_detail},
            "collectors": collector_states,
            "staleCoins": stale,
            "pipelineBehindMs": behind,
            "spoolBytes": spools,
            "time": now,
            "servedBy": store.worker,
        }
        if self.sinks is not None:
            body["sinks"] = self.sinks.report(now)
        return (200 if not reasons else 503), body

    def spools(self, now: int) -> dict[str, int]:
        """Exchange → bytes its raw spools hold, this worker's read live."""
        collectors = {row["exchange"]: row for row in rows(self.store.collectors)}
        return spool_bytes(collectors, now, self.local_spool(), self.store.worker)

    def coins(self, exchange: str | None) -> dict[str, Any]:
        now = _wall_ms()
        found = [
            coin_view(row, now, self.settings)
            for row in rows(self.store.coins)
            if exchange is None or row["exchange"] == exchange
        ]
        found.sort(key=lambda row: (row["exchange"], row["symbol"]))
        return {"coins": found, "time": now, "servedBy": self.store.worker}

    def connectors(self) -> dict[str, Any]:
        now = _wall_ms()
        found = sorted(
            (connector_view(row, now) for row in rows(self.store.connectors)),
            key=lambda row: (row["exchange"], row["connector"]),
        )
        return {"connectors": found, "time": now, "servedBy": self.store.worker}

    def collectors(self) -> dict[str, Any]:
        store = self.store
        now = _wall_ms()
        by_exchange = {row["exchange"]: row for row in rows(store.collectors)}
        connectors = list(rows(store.connectors))
        coins = list(rows(store.coins))
        local = self.local_spool()
        found = []
        for exchange in sorted(set(self.config.exchanges) | set(by_exchange)):
            mine = [c for c in connectors if c["exchange"] == exchange]
            overview = collector_overview(
                by_exchange.get(exchange), exchange, now, local.get(exchange), store.worker
            )
            overview["connectors"] = len(mine)
            overview["connectorsUp"] = sum(1 for c in mine if c["state"] in CONNECTOR_UP)
            overview["coins"] = sum(1 for c in coins if c["exchange"] == exchange)
            overview["coinsSubscribed"] = sum(
                1 for c in coins if c["exchange"] == exchange and c["state"] == "subscribed"
            )
            found.append(overview)
        return {"collectors": found, "time": now, "servedBy": store.worker}

    def alerts(self) -> dict[str, Any]:
        recent = self.store.recent_alerts()
        return {
            "open": sorted((recent.get("open") or {}).values(), key=lambda a: -a["time"]),
            "latest": recent.get("latest") or [],
            "time": _wall_ms(),
            "servedBy": self.store.worker,
        }


def install_views(app: faust.App, views: StateViews) -> None:
    """The JSON views, the dashboard page and its static files on this worker's web server."""
    store = views.store
    by_owner = views.answered_by_owner
    routing_key = views.routing_key

    @app.page("/health")
    class Health(web.View):
        @by_owner(exact_key=routing_key)
        async def get(self, request: web.Request) -> web.Response:
            status, body = await views.health_report()
            return self.json(body, status=status)

    @app.page("/coins")
    class Coins(web.View):
        @by_owner(exact_key=routing_key)
        async def get(self, request: web.Request) -> web.Response:
            return self.json(views.coins(request.query.get("exchange")))

    @app.page("/coins/{exchange}/{symbol:.+}")
    class CoinDetail(web.View):
        @by_owner(match_info="exchange")
        async def get(self, request: web.Request, exchange: str, symbol: str) -> web.Response:
            normalized = parse_symbol(symbol)
            if normalized is None:
                return self.json(
                    {"error": f"{symbol!r} is not a symbol: write BASE/QUOTE (BTC/USDT) or base-quote"},
                    status=400,
                )
            row = store.coins.get(coin_key(exchange, normalized))
            if row is None:
                return self.json({"error": f"no state for {exchange} {normalized}"}, status=404)
            return self.json({**coin_view(row, _wall_ms(), views.settings), "servedBy": store.worker})

    @app.page("/connectors")
    class Connectors(web.View):
        @by_owner(exact_key=routing_key)
        async def get(self, request: web.Request) -> web.Response:
            return self.json(views.connectors())

    @app.page("/collectors")
    class Collectors(web.View):
        @by_owner(exact_key=routing_key)
        async def get(self, request: web.Request) -> web.Response:
            return self.json(views.collectors())

    @app.page("/alerts")
    class Alerts(web.View):
        @by_owner(exact_key=routing_key)
        async def get(self, request: web.Request) -> web.Response:
            return self.json(views.alerts())

    @app.page("/")
    class Dashboard(web.View):
        async def get(self, request: web.Request) -> web.Response:
            return self.html((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.page("/static/{name}")
    class StaticFile(web.View):
        async def get(self, request: web.Request, name: str) -> web.Response:
            path = STATIC / name
            content_type = _STATIC_TYPES.get(path.suffix)
            if content_type is None or "/" in name or name.startswith(".") or not path.is_file():
                return self.json({"error": f"no static file {name!r}"}, status=404)
            return self.text(path.read_text(encoding="utf-8"), content_type=content_type)
