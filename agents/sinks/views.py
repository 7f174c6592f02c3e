"""`GET /sinks`: this worker's sinks, answered by the worker itself (never forwarded: each worker
runs its own sinks, while /health is answered by the worker owning the state tables)."""

from __future__ import annotations

import time
from typing import Any

import faust
from faust import web

from agents.sinks.health import SinkHealth


def sinks_answer(health: SinkHealth, now: int) -> tuple[int, dict[str, Any]]:
    """200 while every sink writes and keeps up, else 503 with the reasons; 200 with none configured."""
    reasons = health.reasons(now)
    body: dict[str, Any] = {
        "status": "ok" if not reasons else "unhealthy",
        "reasons": reasons,
        "sinks": health.report(now),
        "time": now,
    }
    return (200 if not reasons else 503), body


def install_sink_views(app: faust.App, health: SinkHealth) -> None:
    @app.page("/sinks")
    class Sinks(web.View):
        async def get(self, request: web.Request) -> web.Response:
            status, body = sinks_answer(health, time.time_ns() // 1_000_000)
            return self.json(body, status=status)
