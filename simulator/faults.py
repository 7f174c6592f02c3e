"""Faults tests inflict on a dialect, and the limits it enforces like the real exchange.

Triggered over HTTP (all POST, JSON bodies; every one answers the fault state):

    /_sim/faults/drop                         drop every WebSocket without a close frame
    /_sim/faults/stall     {"seconds": 5}     connections open now stay open but get no frames
    /_sim/faults/refuse    {"seconds": 5}     refuse WebSocket handshakes (HTTP 503)
    /_sim/faults/shutdown  {"grace": 2}       send serverShutdown to every connection, close after grace
    /_sim/faults/rest      {"status": 429, "seconds": 5, "retryAfter": 3}
                                              answer REST with 429/418 and Retry-After
    /_sim/faults/limits    {"connectAttempts": 300, "window": 300}
                                              the per-IP handshake limit (default Binance's 300 / 5 min)
    /_sim/faults/clear                        end every fault now
    GET /_sim/faults                          state and violation counts

Violations are what would get a real client disconnected or banned: handshakes beyond the attempt
limit (refused with 429), and REST requests sent while an earlier 429/418's Retry-After still runs
(answered 418, as Binance bans such clients).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Protocol

from aiohttp import web


class _Dialect(Protocol):
    def disconnect_all(self) -> int: ...

    def open_connections(self) -> list[Any]: ...

    def send_server_shutdown(self) -> int: ...


class Faults:
    def __init__(self, connect_attempts: int = 300, window: float = 300.0) -> None:
        self.connect_attempts = connect_attempts
        self.window = window
        self._attempts: dict[str, deque[float]] = {}
        self.refuse_until = 0.0
        self.rest_status = 0
        self.rest_until = 0.0
        self.rest_retry_after = 0
        self._blocked_until: dict[str, float] = {}  # per client: a 429/418's Retry-After
        self.violations = {"connectionAttempts": 0, "restDuringRetryAfter": 0}
        self.counts = {"refusedHandshakes": 0, "restFaultAnswers": 0, "stalls": 0, "shutdowns": 0, "drops": 0}

    # -- checks the dialect calls -----------------------------------------------------------------

    def handshake_refusal(self, client: str, now: float) -> int | None:
        """HTTP status to refuse a handshake with, or None to accept it."""
        attempts = self._attempts.setdefault(client, deque())
        while attempts and attempts[0] <= now - self.window:
            attempts.popleft()
        attempts.append(now)
        if len(attempts) > self.connect_attempts:
            self.violations["connectionAttempts"] += 1
            return 429
        if now < self.refuse_until:
            self.counts["refusedHandshakes"] += 1
            return 503
        return None

    def rest_refusal(self, client: str, now: float) -> tuple[int, int] | None:
        """(status, Retry-After seconds) to answer a REST request with, or None to serve it."""
        blocked = self._blocked_until.get(client, 0.0)
        if now < blocked:
            self.violations["restDuringRetryAfter"] += 1
            retry = max(1, int(blocked - now) + 1)
            return 418, retry
        if now < self.rest_until:
            self.counts["restFaultAnswers"] += 1
            self._blocked_until[client] = now + self.rest_retry_after
            return self.rest_status, self.rest_retry_after
        return None

    def note_throttled(self, client: str, now: float, retry_after: int) -> None:
        """The dialect answered 429 on its own (weight limit): the client must wait too."""
        self._blocked_until[client] = max(self._blocked_until.get(client, 0.0), now + retry_after)

    # -- faults tests trigger ---------------------------------------------------------------------

    def stall(self, connections: list[Any], seconds: float) -> int:
        self.counts["stalls"] += 1
        for connection in connections:
            connection.stalled = True
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, _unstall, connections)
        return len(connections)

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "refusing": now < self.refuse_until,
            "rest": {
                "status": self.rest_status,
                "active": now < self.rest_until,
                "retryAfter": self.rest_retry_after,
            },
            "limits": {"connectAttempts": self.connect_attempts, "window": self.window},
            "violations": dict(self.violations),
            "counts": dict(self.counts),
        }

    def add_routes(self, app: web.Application, dialect: _Dialect) -> None:
        async def body(request: web.Request) -> dict[str, Any]:
            if not request.can_read_body:
                return {}
            data = await request.json()
            if not isinstance(data, dict):
                raise web.HTTPBadRequest(text="expected a JSON object")
            return data

        def number(data: dict[str, Any], key: str, default: float) -> float:
            value = data.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise web.HTTPBadRequest(text=f"{key} must be a non-negative number")
            return float(value)

        async def drop(request: web.Request) -> web.Response:
            self.counts["drops"] += 1
            return web.json_response({"dropped": dialect.disconnect_all(), **self.state()})

        async def stall(request: web.Request) -> web.Response:
            data = await body(request)
            stalled = self.stall(dialect.open_connections(), number(data, "seconds", 5))
            return web.json_response({"stalled": stalled, **self.state()})

        async def refuse(request: web.Request) -> web.Response:
            data = await body(request)
            self.refuse_until = time.monotonic() + number(data, "seconds", 5)
            return web.json_response(self.state())

        async def shutdown(request: web.Request) -> web.Response:
            data = await body(request)
            self.counts["shutdowns"] += 1
            connections = dialect.open_connections()
            sent = dialect.send_server_shutdown()
            asyncio.get_running_loop().call_later(number(data, "grace", 2), _close_all, connections)
            return web.json_response({"notified": sent, **self.state()})

        async def rest(request: web.Request) -> web.Response:
            data = await body(request)
            status = int(number(data, "status", 429))
            if status not in (429, 418):
                raise web.HTTPBadRequest(text="status must be 429 or 418")
            self.rest_status = status
            self.rest_retry_after = max(1, int(number(data, "retryAfter", 3)))
            self.rest_until = time.monotonic() + number(data, "seconds", 5)
            return web.json_response(self.state())

        async def limits(request: web.Request) -> web.Response:
            data = await body(request)
            self.connect_attempts = max(1, int(number(data, "connectAttempts", self.connect_attempts)))
            self.window = number(data, "window", self.window)
            return web.json_response(self.state())

        async def clear(request: web.Request) -> web.Response:
            self.refuse_until = self.rest_until = 0.0
            self._blocked_until.clear()
            for connection in dialect.open_connections():
                connection.stalled = False
            return web.json_response(self.state())

        async def show(request: web.Request) -> web.Response:
            return web.json_response(self.state())

        for name, handler in (
            ("drop", drop),
            ("stall", stall),
            ("refuse", refuse),
            ("shutdown", shutdown),
            ("rest", rest),
            ("limits", limits),
            ("clear", clear),
        ):
            app.router.add_post(f"/_sim/faults/{name}", handler)
        app.router.add_get("/_sim/faults", show)


def _unstall(connections: list[Any]) -> None:
    for connection in connections:
        connection.stalled = False


def _close_all(connections: list[Any]) -> None:
    for connection in connections:
        connection.close(1001)
