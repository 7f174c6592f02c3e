"""The worker's own embedded broker, watched: how much memory it holds, and whether it still runs.

Tansu's memory storage keeps every record and returns memory only when a topic is deleted, so on a
worker left running the broker grows until the machine runs out (about 4 GB an hour at 1,000
records/s; README, "The embedded broker"). The kernel would then kill it, and with it everything the
worker published. The watch says so before that happens (a log line when the broker passes each
share of the memory the worker may use, a `/health` reason past `UNHEALTHY_SHARE`, the
`collector_embedded_broker_memory_bytes` gauge), and says within seconds when the broker has died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mode import Service

from agents import metrics
from tables.manager import describe_bytes

log = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0  # seconds: a read of /proc, and a dead broker is reported this soon
WARN_SHARES = (0.25, 0.5, 0.75, 0.9)  # each crossing upwards is logged once
UNHEALTHY_SHARE = 0.75  # from here /health fails: the next hours may exhaust the machine
ADVICE = "restart the worker to start afresh (what the broker holds is dropped), or move to a Kafka cluster"


@dataclass(frozen=True)
class BrokerMemory:
    """One reading: the broker's resident bytes against the memory the worker may use."""

    resident: int
    limit: int | None

    @property
    def share(self) -> float | None:
        return self.resident / self.limit if self.limit else None

    def crossed(self) -> float | None:
        """The highest of `WARN_SHARES` this reading is at or past."""
        share = self.share
        if share is None:
            return None
        return max((mark for mark in WARN_SHARES if share >= mark), default=None)

    def describe(self) -> str:
        held = describe_bytes(self.resident)
        if self.share is None:
            return f"the embedded broker holds {held}"
        return f"the embedded broker holds {held}, {self.share:.0%} of the memory this worker may use"


class BrokerWatch(Service):
    """Reads the embedded broker's memory every `WATCH_INTERVAL`; `reasons()` feeds /health."""

    def __init__(
        self,
        exit_code: Callable[[], int | None],
        pid: Callable[[], int | None],
        limit: Callable[[], int | None] = metrics.memory_limit,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._exit_code = exit_code  # None while the broker runs
        self._pid = pid
        self._limit = limit
        self.memory: BrokerMemory | None = None
        self.exited: int | None = None
        self._said: float | None = None  # the highest share logged so far

    async def on_started(self) -> None:
        self.check()

    @Service.timer(WATCH_INTERVAL)
    async def _watch(self) -> None:
        self.check()

    def check(self) -> None:
        if self.exited is None and (code := self._exit_code()) is not None:
            self.exited = code
            log.error(
                "the embedded broker exited (code %s; -9 is SIGKILL, which the kernel sends when memory"
                " runs out): everything it held is gone and nothing can be published; %s",
                code, "restart the worker",
            )  # fmt: skip
        pid = self._pid()
        resident = metrics.resident_bytes_of(pid) if pid is not None and self.exited is None else None
        if resident is None:
            return
        self.memory = memory = BrokerMemory(resident, self._limit())
        metrics.EMBEDDED_BROKER_MEMORY.set(resident)
        crossed = memory.crossed()
        if crossed is not None and (self._said is None or crossed > self._said):
            self._said = crossed
            level = logging.ERROR if crossed >= UNHEALTHY_SHARE else logging.WARNING
            log.log(level, "%s: it keeps every record; %s", memory.describe(), ADVICE)

    def reasons(self) -> list[str]:
        if self.exited is not None:
            return [f"the embedded broker exited (code {self.exited}); restart the worker"]
        memory = self.memory
        if memory is not None and memory.share is not None and memory.share >= UNHEALTHY_SHARE:
            return [f"{memory.describe()}; {ADVICE}"]
        return []
