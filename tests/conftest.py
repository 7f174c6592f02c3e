"""The test suite's rules and the brokers end-to-end tests share.

Tiers: a test that starts a process which listens (simulator, broker, worker), or opens any socket,
is marked `e2e`; every other test is a unit test: `make test-unit` runs those (`pytest -m "not e2e"`),
`make test` runs all of them on several pytest-xdist workers.

Rules, enforced for every test by tests/guard (an audit hook here and in every Python process a test
starts):
- nothing reads a path outside the repository (a sibling folder of the clone);
- a test not marked `e2e` opens no socket.

Brokers (fixtures):
- `broker`: a fresh embedded broker for this test, stopped after it (~0.1 s to start). Take it when the
  test runs collector workers: a worker's consumer group, its state tables and the `collector.*` and
  `raw.*` topics have fixed names, so two tests' workers on one broker would see each other's state.
  Also when the test pauses, stops or kills the broker.
- `shared_broker`: one embedded broker per xdist process, shared by every test that takes it. For
  tests that produce and consume topics of their own with Kafka clients and run no worker. Such a test
  writes only topics whose names no other test uses (it fails when it writes a topic another test
  wrote first: tests/brokers.py) and leaves the broker running (it fails if it stopped or paused it).

A module that needs one broker (or simulator, or worker) for several tests defines its own
module-scoped fixture: `make test` hands each test file whole to one xdist worker (`--dist loadfile`),
so the fixture is made once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.brokers import SharedBroker
from tests.harness import Worker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "guard"))  # the guard is imported by name, as its children do

from guard_plugin import GuardPlugin  # noqa: E402

pytest_plugins = ["tests.servers"]  # real PostgreSQL and Redis servers (tests/servers.py)


def pytest_configure(config: pytest.Config) -> None:
    plugin = GuardPlugin(REPO)
    plugin.start()
    config.pluginmanager.register(plugin, "collector-guard")
    config.add_cleanup(plugin.stop)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows the notable lines of the logs of the workers it ran with (still running, or
    started during the test): a timeout in CI says what the worker was doing, not only what the test
    waited for."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for worker in Worker.started_here:
        if (worker.process.poll() is None or worker.started_at >= call.start) and worker.log_path.exists():
            lines = worker.notable_log_lines()
            report.sections.append((f"{worker.name} log ({worker.log_path.name})", "\n".join(lines)))


# The longest files (seconds on a 2-core machine, from `--durations`), started first.
LONGEST_FILES = {
    "test_e2e_continuity_binance.py": 110,
    "test_e2e_continuity_bithumb.py": 110,
    "test_e2e_continuity_upbit.py": 110,
    "test_e2e_faults.py": 95,
    "test_writer.py": 90,
    "test_e2e_depth.py": 75,
    "test_e2e_broker_pause.py": 66,
    "test_e2e_embedded_pause.py": 61,
    "test_subscriptions_e2e.py": 55,
    "test_e2e_two_workers.py": 52,
    "test_e2e_stop.py": 45,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest files first, then the other end-to-end ones, then unit tests (a stable sort: each
    # module keeps its order). `make test` hands whole files to xdist workers in this order, so the
    # long files start while the other workers still have short ones to run, instead of one of
    # them trailing at the end.
    items.sort(
        key=lambda item: (
            -LONGEST_FILES.get(item.path.name, 0),
            item.get_closest_marker("e2e") is None,
        )
    )


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded broker for this test alone (see the module docstring)."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="session")
def _shared() -> Iterator[SharedBroker]:
    shared = SharedBroker()
    yield shared
    shared.stop()


@pytest.fixture
def shared_broker(_shared: SharedBroker, request: pytest.FixtureRequest) -> Iterator[EmbeddedBroker]:
    """The embedded broker every test of this xdist process shares (see the module docstring)."""
    broker = _shared.running()
    before = _shared.end_offsets()
    yield broker
    assert _shared.answers(), f"{request.node.nodeid} stopped or paused the shared broker: take `broker`"
    written = {topic for topic, end in _shared.end_offsets().items() if end > before.get(topic, 0)}
    foreign = _shared.claim(written, request.node.nodeid)
    assert not foreign, (
        f"wrote topics of other tests on the shared broker (name yours for your test): {foreign}"
    )
