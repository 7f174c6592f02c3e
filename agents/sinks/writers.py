"""The two databases' I/O: each writer stores a batch in one round of writes, or raises SinkUnavailable.

A writer never decides to retry: the sink service does (agents/sinks/service.py). What a writer does
decide is which failures are outages (retry the whole batch later) and which are one bad record
(store the rest, reject that one): PostgreSQL data errors are narrowed down by halving the batch, so
one value the checks missed cannot stall the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import redis.asyncio as redis_asyncio
from psycopg import errors as pg_errors
from redis import exceptions as redis_errors

from agents.sinks.pg_tables import (
    MIGRATION_LOCK,
    TABLES,
    VERSION_TABLE,
    Row,
    copy_text,
    hypertable_statements,
    pending_migrations,
    rows_by_table,
    split_lanes,
)
from agents.sinks.redis_latest import APPLY_SCRIPT, plan_writes
from streams.records import MarketRecord

log = logging.getLogger(__name__)

Item = tuple[MarketRecord, bytes]  # a record and its JSON as read from Kafka


class SinkUnavailable(Exception):
    """The database cannot take the batch now (down, restarting, unreachable): retry it later."""


@dataclass
class WriteResult:
    stored: Counter[str] = field(default_factory=Counter)  # records per type
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) per record


class Writer(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write(self, items: Sequence[Item]) -> WriteResult: ...

    async def close(self) -> None: ...


def _count(items: Sequence[Item]) -> Counter[str]:
    return Counter(record.type for record, _ in items)


# ---- PostgreSQL -----------------------------------------------------------------------------------

# A failure of the connection or the server: the same batch will go through once it is back.
_PG_OUTAGE = (psycopg.OperationalError, psycopg.InterfaceError, OSError, TimeoutError)
# A value the server refuses: only the rows that carry it are refused.
_PG_BAD_DATA = (pg_errors.DataError, pg_errors.IntegrityError)
CONNECT_TIMEOUT_SECONDS = 5
LANES = 2  # connections writing one batch together (one per core of the machine we measure on)


class PostgresWriter:
    """Writes each batch over `lanes` connections at once, one transaction each: the server works on
    them in parallel (a single connection left it idle between round trips, and the sink short of
    30,000 trades/s). Lanes split the batch by symbol, so no two transactions touch the same rows."""

    name = "postgres"

    def __init__(
        self, dsn: str, types: Sequence[str], application_name: str = "exchange-collector", lanes: int = LANES
    ) -> None:
        self._dsn = dsn
        self._specs = [TABLES[kind] for kind in types if kind in TABLES]
        self._application_name = application_name
        self._lanes = lanes
        self._connections: list[psycopg.AsyncConnection[Any]] = []

    async def open(self) -> None:
        await self.close()
        opened: list[psycopg.AsyncConnection[Any]] = []
        try:
            for _ in range(self._lanes):
                connection = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    application_name=self._application_name,
                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                )  # fmt: skip
                opened.append(connection)
                if len(opened) == 1:
                    await migrate(connection)
                for spec in self._specs:
                    await connection.execute(spec.create_stage())
        except (*_PG_OUTAGE, psycopg.DatabaseError) as exc:
            await _close_all(opened)
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}".strip()) from exc
        except BaseException:
            await _close_all(opened)
            raise
        self._connections = opened

    async def close(self) -> None:
        connections, self._connections = self._connections, []
        await _close_all(connections)

    async def write(self, items: Sequence[Item]) -> WriteResult:
        if not self._connections or any(c.closed for c in self._connections):
            await self.open()
        result = WriteResult(stored=_count(items))
        lanes = split_lanes((record for record, _ in items), len(self._connections))
        outcomes = await asyncio.gather(*(
            self._write_lane(connection, rows_by_table(records), result)
            for connection, records in zip(self._connections, lanes, strict=True) if records
        ), return_exceptions=True)  # fmt: skip
        # Every lane has finished (committed or not) before any connection is closed.
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            await self.close()  # the next attempt opens every lane again and rewrites the whole batch
            raise failures[0]
        return result

    async def _write_lane(
        self, connection: psycopg.AsyncConnection[Any], rows: dict[str, list[Row]], result: WriteResult
    ) -> None:
        try:
            await _write_rows(connection, rows)
        except _PG_BAD_DATA as exc:
            log.warning("postgres sink: the server refused a value (%s); narrowing it down", exc)
            for kind, table_rows in rows.items():
                await _write_isolating(connection, kind, table_rows, result)


async def _close_all(connections: Sequence[psycopg.AsyncConnection[Any]]) -> None:
    for connection in connections:
        if not connection.closed:
            with contextlib.suppress(*_PG_OUTAGE):
                await connection.close()


async def _write_rows(connection: psycopg.AsyncConnection[Any], rows: dict[str, list[Row]]) -> None:
    """One transaction: COPY into each staging table, then INSERT … ON CONFLICT from it."""
    try:
        async with connection.transaction(), connection.cursor() as cursor:
            for kind, table_rows in rows.items():
                if not table_rows:
                    continue
                spec = TABLES[kind]
                async with cursor.copy(spec.copy_statement()) as copy:
                    await copy.write(copy_text(table_rows))
                await cursor.execute(spec.insert_statement())
    except _PG_BAD_DATA:
        raise
    except (*_PG_OUTAGE, psycopg.DatabaseError) as exc:
        # Any other server error (a table dropped under us, privileges) is retried on new
        # connections, which migrate again: the health view shows the error meanwhile.
        raise SinkUnavailable(f"{type(exc).__name__}: {exc}".strip()) from exc


async def _write_isolating(
    connection: psycopg.AsyncConnection[Any], kind: str, rows: list[Row], result: WriteResult
) -> None:
    """Halve the rows until the one the server refuses is alone; store everything else."""
    try:
        await _write_rows(connection, {kind: rows})
    except _PG_BAD_DATA as exc:
        if len(rows) == 1:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("postgres sink: rejected a %s row %r: %s", kind, rows[0][:4], detail)
            result.rejected.append(("refused-by-database", detail))
            result.stored[kind] -= 1
            return
        middle = len(rows) // 2
        await _write_isolating(connection, kind, rows[:middle], result)
        await _write_isolating(connection, kind, rows[middle:], result)


async def migrate(connection: psycopg.AsyncConnection[Any]) -> int:
    """Bring the schema to the latest version; returns it. Idempotent, and safe with workers starting
    together (a transaction-scoped advisory lock)."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version integer PRIMARY KEY, "
            "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await connection.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for migration in pending_migrations(current):
            for statement in migration.statements:
                await connection.execute(statement)
            await connection.execute(
                f"INSERT INTO {VERSION_TABLE} (version, description) VALUES (%s, %s)",
                [migration.version, migration.description],
            )
            log.info("postgres sink: schema migrated to version %d (%s)", migration.version,
                     migration.description)  # fmt: skip
            current = migration.version
        cursor = await connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
        for statement in hypertable_statements(await cursor.fetchone() is not None):
            await connection.execute(statement)
    return current


# ---- Redis ----------------------------------------------------------------------------------------

# Replies that mean "not now" rather than "never": the whole batch is retried.
_REDIS_BUSY = ("LOADING", "BUSY", "OOM", "READONLY", "MASTERDOWN", "NOSCRIPT", "TRYAGAIN", "CLUSTERDOWN")
_REDIS_OUTAGE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


class RedisWriter:
    name = "redis"

    def __init__(self, url: str, ttl_seconds: int | None, stream_max_len: int | None) -> None:
        self._url = url
        self._ttl = ttl_seconds
        self._max_len = stream_max_len
        self._client: redis_asyncio.Redis | None = None

    async def open(self) -> None:
        await self.close()
        client = redis_asyncio.Redis.from_url(self._url, socket_connect_timeout=5, socket_timeout=30)
        try:
            await client.ping()
        except (*_REDIS_OUTAGE, redis_errors.RedisError) as exc:
            await client.aclose()
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._client = client
        self._script = client.register_script(APPLY_SCRIPT)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_REDIS_OUTAGE):
                await client.aclose()

    async def write(self, items: Sequence[Item]) -> WriteResult:
        if self._client is None:
            await self.open()
        assert self._client is not None
        writes = plan_writes(items, self._ttl, self._max_len)
        result = WriteResult(stored=_count(items))
        try:
            pipeline = self._client.pipeline(transaction=False)
            for write in writes:
                await self._script(keys=write.keys, args=write.args, client=pipeline)
            replies = await pipeline.execute(raise_on_error=False)
        except (*_REDIS_OUTAGE, redis_errors.RedisError) as exc:
            await self.close()
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for write, reply in zip(writes, replies, strict=True):
            if not isinstance(reply, Exception):
                continue
            text = str(reply)
            if isinstance(reply, _REDIS_OUTAGE) or text.startswith(_REDIS_BUSY):
                raise SinkUnavailable(f"{type(reply).__name__}: {text}")
            # e.g. WRONGTYPE: someone else's value at our key. Retrying would never end.
            log.warning("redis sink: %s refused %d records: %s", write.keys[0], write.records, text)
            result.rejected += [("refused-by-database", text[:200])] * write.records
            result.stored -= write.types()
        return result
