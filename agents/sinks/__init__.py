"""Storage sinks: market history into PostgreSQL, latest state into Redis (README "Sinks").

`build_sinks(config, bootstrap_servers, app_id)` makes one `Sinks` service holding a `SinkService`
per configured sink, each reading the market topics in its own consumer group `<app_id>-sinks-<sink>`,
and a `SinkHealth` the web views read. Nothing here reads module globals of the app: the caller
registers the service with the Faust app (`app.service(sinks)`) and hands `sinks.health` to the views
(agents/worker.py does both; `install_sink_views` adds `GET /sinks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mode import Service, ServiceT

from agents.sinks.batch import market_pattern
from agents.sinks.consumer import SinkConsumer
from agents.sinks.health import SinkHealth, SinkStatus, redact
from agents.sinks.service import SinkService
from agents.sinks.views import install_sink_views
from agents.sinks.writers import PostgresWriter, RedisWriter, Writer
from streams.config import CollectorConfig

__all__ = ["SinkHealth", "SinkService", "Sinks", "build_sinks", "install_sink_views", "sink_group"]


def sink_group(app_id: str, sink: str) -> str:
    return f"{app_id}-sinks-{sink}"


class Sinks(Service):
    """The configured sinks of one worker; they start and stop with it."""

    def __init__(self, services: Sequence[SinkService], health: SinkHealth, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.services = list(services)
        self.health = health

    def on_init_dependencies(self) -> Iterable[ServiceT]:
        return self.services


def build_sinks(config: CollectorConfig, bootstrap_servers: Sequence[str], app_id: str) -> Sinks:
    """The sinks `config.sinks` asks for (none: an empty service), reading from `bootstrap_servers`."""
    health = SinkHealth(config.monitoring.alerts.behindAfterSeconds)
    services: list[SinkService] = []

    def add(writer: Writer, target: str, types: Sequence[str], batch_rows: int, batch_ms: int) -> None:
        group = sink_group(app_id, writer.name)
        status = health.add(SinkStatus(writer.name, redact(target), group))
        consumer = SinkConsumer(bootstrap_servers, group, market_pattern(types))
        services.append(SinkService(writer, consumer, status, batch_rows=batch_rows, batch_ms=batch_ms))

    postgres = config.sinks.postgres
    if postgres is not None:
        writer = PostgresWriter(postgres.dsn, postgres.types, application_name=sink_group(app_id, "postgres"))
        add(writer, postgres.dsn, postgres.types, postgres.batchRows, postgres.batchMs)
    redis = config.sinks.redis
    if redis is not None:
        add(RedisWriter(redis.url, redis.ttlSeconds, redis.streamMaxLen), redis.url, redis.types,
            redis.batchRows, redis.batchMs)  # fmt: skip
    return Sinks(services, health)
