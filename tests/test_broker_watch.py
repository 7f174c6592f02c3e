"""The embedded broker's watch (agents/broker_watch.py): shares of memory, the log lines and /health
reasons they give, and a broker that died. Driven by hand: no socket, no timer."""

from __future__ import annotations

import logging
import os

import pytest

from agents import metrics
from agents.broker_watch import UNHEALTHY_SHARE, BrokerMemory, BrokerWatch


@pytest.mark.parametrize(
    ("resident", "limit", "crossed"),
    [
        (10, None, None),  # no limit known: no share
        (10, 0, None),
        (24, 100, None),
        (25, 100, 0.25),
        (74, 100, 0.5),
        (75, 100, 0.75),
        (95, 100, 0.9),
        (300, 100, 0.9),
    ],
)
def test_the_highest_share_crossed(resident: int, limit: int | None, crossed: float | None) -> None:
    assert BrokerMemory(resident, limit).crossed() == crossed


def test_the_description_names_the_size_and_the_share() -> None:
    assert BrokerMemory(3 * 1024**3, 4 * 1024**3).describe() == (
        "the embedded broker holds 3072.0 MiB, 75% of the memory this worker may use"
    )
    assert BrokerMemory(5 * 1024**2, None).describe() == "the embedded broker holds 5.0 MiB"


class Machine:
    """What the watch reads, set by the test: a process's memory (this one's) and its limit."""

    def __init__(self) -> None:
        self.resident = metrics.resident_bytes_of(os.getpid())
        assert self.resident
        self.limit: int | None = None
        self.code: int | None = None

    def watch(self) -> BrokerWatch:
        return BrokerWatch(lambda: self.code, os.getpid, lambda: self.limit)


def test_each_share_is_logged_once_on_the_way_up_and_health_fails_from_three_quarters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    machine = Machine()
    watch = machine.watch()
    caplog.set_level(logging.WARNING, logger="agents.broker_watch")
    machine.limit = machine.resident * 10  # ~10 %
    watch.check()
    assert caplog.records == [] and watch.reasons() == []
    assert metrics.EMBEDDED_BROKER_MEMORY._value.get() == watch.memory.resident  # type: ignore[union-attr]
    machine.limit = machine.resident * 3  # ~33 %: past a quarter
    watch.check()
    watch.check()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "a Kafka cluster" in caplog.records[0].getMessage() and watch.reasons() == []
    machine.limit = machine.resident * 4  # back under: nothing new
    watch.check()
    assert len(caplog.records) == 1
    machine.limit = int(machine.resident / (UNHEALTHY_SHARE + 0.05))
    watch.check()
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR]
    [reason] = watch.reasons()
    assert reason.startswith("the embedded broker holds ") and "restart the worker" in reason


def test_a_broker_that_died_is_said_once_and_fails_health(caplog: pytest.LogCaptureFixture) -> None:
    machine = Machine()
    watch = machine.watch()
    caplog.set_level(logging.WARNING, logger="agents.broker_watch")
    watch.check()
    assert watch.reasons() == []
    machine.code = -9
    watch.check()
    watch.check()
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "exited (code -9" in caplog.records[0].getMessage()
    assert watch.reasons() == ["the embedded broker exited (code -9); restart the worker"]
