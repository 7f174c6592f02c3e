"""The pytest side of tests/guard/collector_guard.py: a test phase (setup, call, teardown) or the
collection of a module that broke a rule fails, with each offending path or socket call listed.

tests/conftest.py registers `GuardPlugin(repo)`; a test of the guard can register one for another
folder (tests/test_guards.py runs a session on a fake clone).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from collector_guard import (
    ENV_CONFIG,
    ENV_NO_SOCKETS,
    Guard,
    Layout,
    Violation,
    activate,
    deactivate,
    read_log,
    replace_guard_from_environment,
)

GUARD_DIR = Path(__file__).resolve().parent


class GuardPlugin:
    def __init__(self, repo: Path) -> None:
        self.guard = Guard(Layout.of(repo))
        descriptor, self.log = tempfile.mkstemp(prefix="collector-guard-", suffix=".jsonl")
        os.close(descriptor)
        self._log_offset = 0
        self._reported = 0
        self._saved_env: dict[str, str | None] = {}

    # -- lifetime -----------------------------------------------------------------------------------

    def start(self) -> None:
        replace_guard_from_environment()
        activate(self.guard)
        pythonpath = os.environ.get("PYTHONPATH")
        self._set_env("PYTHONPATH", os.pathsep.join(p for p in (str(GUARD_DIR), pythonpath) if p))
        self._set_env(ENV_CONFIG, json.dumps({"repo": self.guard.layout.repo, "log": self.log}))
        self._set_env(ENV_NO_SOCKETS, None)

    def stop(self) -> None:
        deactivate(self.guard)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        Path(self.log).unlink(missing_ok=True)

    def _set_env(self, name: str, value: str | None) -> None:
        self._saved_env.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def _forbid_sockets(self, test_id: str | None) -> None:
        """While `test_id` runs (a unit test, or a module being collected) nothing opens a socket."""
        self.guard.no_sockets = test_id
        if test_id is None:
            os.environ.pop(ENV_NO_SOCKETS, None)
        else:
            os.environ[ENV_NO_SOCKETS] = test_id

    def _new_violations(self) -> list[Violation]:
        found = self.guard.found[self._reported :]
        self._reported += len(found)
        from_children, self._log_offset = read_log(self.log, self._log_offset)
        return [*found, *from_children]

    # -- hooks --------------------------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Iterator[None]:
        self._forbid_sockets(f"collecting {collector.nodeid or 'the session'}")
        outcome: Any = yield
        self._forbid_sockets(None)
        _fail(outcome.get_result(), self._new_violations())

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        self._forbid_sockets(None if item.get_closest_marker("e2e") else item.nodeid)
        try:
            yield
        finally:
            self._forbid_sockets(None)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Iterator[None]:
        outcome: Any = yield
        _fail(outcome.get_result(), self._new_violations())

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        late = self._new_violations()  # after the last test: atexit work, a straggling child
        if late:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            text = _describe(late)
            if reporter is not None:
                reporter.write_line(text, red=True)
            else:
                print(text)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _describe(violations: list[Violation]) -> str:
    return "\n".join(["The test suite's rules were broken (tests/guard/collector_guard.py):"] +
                     [f"  {v.describe()}" for v in violations])  # fmt: skip


def _fail(report: pytest.TestReport | pytest.CollectReport, violations: list[Violation]) -> None:
    if not violations:
        return
    text = _describe(violations)
    if report.passed or report.skipped:
        report.outcome = "failed"
        report.longrepr = text
    else:
        report.sections.append(("collector guard", text))
