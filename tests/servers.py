"""Real PostgreSQL and Redis servers as pytest fixtures (a plugin: tests/conftest.py loads it).

One server of each per test session, started on first use from Debian's binaries in a temporary
folder (agents/sinks/localservers.py); each test gets its own database or Redis database number.
A test that restarts a server takes a private one (`private_postgres`, `private_redis`), so the
shared ones never go down under another test. A missing package fails the test with the command
that installs it (`make system-deps`): it is never skipped.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest

from agents.sinks.localservers import LocalPostgres, LocalRedis, ServerMissing

_databases = itertools.count(1)


def _started(server_type: type[LocalPostgres] | type[LocalRedis]) -> LocalPostgres | LocalRedis:
    try:
        return server_type().start()
    except ServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    server = _started(LocalPostgres)
    assert isinstance(server, LocalPostgres)
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = _started(LocalRedis)
    assert isinstance(server, LocalRedis)
    yield server
    server.close()


@pytest.fixture
def postgres_dsn(postgres_server: LocalPostgres, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server, named after the test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return postgres_server.create_database(f"t{next(_databases)}_{name}")


_redis_databases = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """A flushed database number of the session's server."""
    import redis

    url = f"redis://127.0.0.1:{redis_server.port}/{next(_redis_databases)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def private_postgres() -> Iterator[LocalPostgres]:
    server = _started(LocalPostgres)
    assert isinstance(server, LocalPostgres)
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[LocalRedis]:
    server = _started(LocalRedis)
    assert isinstance(server, LocalRedis)
    yield server
    server.close()
