"""What a sink tells /health, /api/ws/infra-health and the metrics: reachable or not, the last error,
how far behind it is. Pure state, written by the sink service, read by the views."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@|(password\s*=\s*)\S+", re.IGNORECASE)


def redact(address: str) -> str:
    """A DSN or URL without its password, fit for logs and web views."""
    return _PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", address)


@dataclass
class SinkStatus:
    sink: str  # postgres, redis
    target: str  # the address, without its password
    group: str  # the Kafka consumer group
    state: str = "starting"  # starting, running, paused (waiting for the database), stopped
    reachable: bool | None = None  # None until the first attempt
    last_error: str | None = None
    last_error_at: int | None = None
    last_commit_at: int | None = None
    rows: dict[str, int] = field(default_factory=dict)  # records stored, per type
    rejected: dict[str, int] = field(default_factory=dict)  # records refused, per reason
    # Kafka timestamp of the oldest record read but not yet stored; None when nothing waits.
    waiting_since: int | None = None
    lag_ms_at_commit: int = 0  # at the last commit: commit time - that batch's oldest record

    def lag_seconds(self, now: int) -> float:
        """How far the database trails Kafka: the age of the oldest record read and not yet stored,
        else how long the last batch's oldest record took; 0 once a read finds nothing new."""
        if self.waiting_since is not None:
            return max(now - self.waiting_since, 0) / 1000
        return self.lag_ms_at_commit / 1000

    def read(self, oldest: int | None) -> None:
        if self.waiting_since is None:
            self.waiting_since = oldest

    def caught_up(self) -> None:
        if self.waiting_since is None:
            self.lag_ms_at_commit = 0

    def failed(self, error: str, now: int) -> None:
        self.state, self.reachable = "paused", False
        self.last_error, self.last_error_at = error, now

    def connected(self) -> None:
        self.state, self.reachable = "running", True

    def stored(self, per_type: dict[str, int], now: int) -> None:
        self.state, self.reachable = "running", True
        for kind, count in per_type.items():
            self.rows[kind] = self.rows.get(kind, 0) + count
        if self.waiting_since is not None:
            self.lag_ms_at_commit = max(now - self.waiting_since, 0)
        self.waiting_since = None
        self.last_commit_at = now

    def rejected_one(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def report(self, now: int) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "target": self.target,
            "group": self.group,
            "state": self.state,
            "reachable": self.reachable,
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
            "lastCommitAt": self.last_commit_at,
            "lagSeconds": round(self.lag_seconds(now), 3),
            "rows": dict(self.rows),
            "rejected": dict(self.rejected),
        }


class SinkHealth:
    """The sinks of one worker, for the health views: `report` for a JSON body, `reasons` for /health."""

    def __init__(self, behind_after_seconds: float = 10.0) -> None:
        self.behind_after_seconds = behind_after_seconds
        self.sinks: dict[str, SinkStatus] = {}

    def add(self, status: SinkStatus) -> SinkStatus:
        self.sinks[status.sink] = status
        return status

    def report(self, now: int) -> dict[str, dict[str, Any]]:
        return {name: status.report(now) for name, status in self.sinks.items()}

    def reasons(self, now: int) -> list[str]:
        """Why /health should answer 503 because of a sink (empty: the sinks are fine)."""
        found = []
        for name, status in self.sinks.items():
            if status.reachable is False:
                found.append(f"sink {name} cannot write to {status.target}: {status.last_error}")
            lag = status.lag_seconds(now)
            if lag > self.behind_after_seconds:
                found.append(f"sink {name} is {lag:.0f} s behind the market topics")
        return found


class RedisReachability:
    """What the live distribution's infra-health view asks of the Redis sink's server: a PING."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self._url = url
        self._timeout = timeout

    @property
    def public_url(self) -> str:
        return redact(self._url)

    async def reachable(self) -> tuple[bool, str]:
        import redis.asyncio as redis_asyncio  # imported here: only workers with a Redis sink need it
        from redis.exceptions import RedisError

        client = redis_asyncio.from_url(
            self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
        )
        try:
            await client.ping()
            return True, "PONG"
        except (RedisError, OSError, TimeoutError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            await client.aclose()
