"""Two rules of the test suite, enforced with an audit hook (`sys.addaudithook`):

- **Self-contained.** Nothing reads a path outside the repository. A read is flagged when its path
  lies under the repository's parent folder (where a user's clone has no sibling folders), or, in a
  git worktree, under the main checkout's parent, but outside the repository. The interpreter, its
  site-packages, the temporary folder and hidden entries (`~/.cache` when the clone sits in the home
  folder) are not the project's and are left alone.
- **Unit tests open no socket.** While a test not marked `e2e` runs, creating a network socket,
  binding, connecting or resolving a host name raises `SocketInUnitTest`.

Both hold in the test session (tests/conftest.py installs `GuardPlugin`) and in every Python process
a test starts: tests/guard is put on PYTHONPATH, its sitecustomize.py calls `install_from_environment`,
and a child writes what it broke to the session's log, which the session reads after each test phase.
Sockets created by C code that does not go through Python's `socket` module (librdkafka) are not seen.

This module only imports the standard library: child processes import it at startup.
"""

from __future__ import annotations

import json
import os
import site
import socket
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_CONFIG = "COLLECTOR_TEST_GUARD"  # JSON {"repo": ..., "log": ...}: a child process guards itself
ENV_NO_SOCKETS = "COLLECTOR_TEST_NO_SOCKETS"  # the unit test's id while it runs: its children open none

READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})
SOCKET_EVENTS = frozenset(
    {"socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
     "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}
)  # fmt: skip
_WATCHED_EVENTS = READ_EVENTS | SOCKET_EVENTS


class SocketInUnitTest(RuntimeError):
    """A test not marked e2e tried to use the network."""


@dataclass(frozen=True)
class Violation:
    kind: str  # "read" or "socket"
    detail: str  # the path read, or the socket operation
    process: str = ""  # empty in the test session; a child's pid and command line

    def describe(self) -> str:
        where = f"  (in {self.process})" if self.process else ""
        if self.kind == "read":
            return f"read outside the repository: {self.detail}{where}"
        return f"socket in a test not marked e2e: {self.detail}{where}"


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _git_main_checkout(repo: Path) -> Path | None:
    """The main checkout when `repo` is a git worktree (its .git is a file naming the git dir)."""
    dot_git = repo / ".git"
    try:
        text = dot_git.read_text() if dot_git.is_file() else ""
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    git_dir = Path(text.removeprefix("gitdir:").strip())
    if not git_dir.is_absolute():
        git_dir = repo / git_dir
    # <main>/.git/worktrees/<name>
    main_git = git_dir.resolve().parent.parent
    return main_git.parent if main_git.name == ".git" else None


@dataclass(frozen=True)
class Layout:
    """Where a repository is, which folders around it are watched, and which are not the project's."""

    repo: str
    watched: tuple[str, ...]
    exempt: tuple[str, ...]

    @classmethod
    def of(cls, repo: str | Path) -> Layout:
        root = Path(_real(repo))
        watched = {str(root.parent)}
        main = _git_main_checkout(root)
        if main is not None and main != root:
            watched.add(str(main.parent))
        candidates = [
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, tempfile.gettempdir(),
            *site.getsitepackages(), site.getusersitepackages(),
            *(sysconfig.get_paths().values()),
        ]  # fmt: skip
        # A folder holding a watched one (the temporary folder, for a fake clone in a test's tmp_path)
        # would exempt all of it: it exempts nothing then.
        exempt = {
            real
            for real in (_real(c) for c in candidates if c)
            if not any(_under(w, real) and w != real for w in watched)
        }
        return cls(str(root), tuple(sorted(watched)), tuple(sorted(exempt)))

    def outside(self, path: Any) -> str | None:
        """The path, resolved, when reading it breaks the rule; else None."""
        if isinstance(path, int) or path is None:
            return None  # a file descriptor
        try:
            text = os.fsdecode(path)
        except TypeError:
            return None
        absolute = os.path.abspath(text)
        if not any(_under(absolute, root) for root in self.watched):
            return None  # /usr, /proc, /etc, the interpreter outside the clone's folder
        if _under(absolute, self.repo):
            absolute = _real(absolute)  # a symlink inside the repository may lead out of it
            if _under(absolute, self.repo) or not any(_under(absolute, r) for r in self.watched):
                return None
        if any(_under(absolute, root) for root in self.exempt):
            return None
        for root in self.watched:
            if _under(absolute, root) and absolute != root:
                first = os.path.relpath(absolute, root).split(os.sep, 1)[0]
                if first.startswith(".") and first != "..":
                    return None  # ~/.cache, ~/.pyenv: tools' own folders, not a sibling project
        return absolute


def socket_violation(event: str, args: tuple[Any, ...]) -> str | None:
    """What a socket event does, when a unit test may not do it; None when it is harmless."""
    if event not in SOCKET_EVENTS:
        return None
    if event == "socket.__new__":
        family = args[1]
        if family == socket.AF_UNIX:
            return None  # an event loop's self-pipe (socketpair): no network
        try:
            name = socket.AddressFamily(family).name
        except ValueError:
            name = str(family)
        return f"socket.socket(family={name})"
    if event in ("socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"):
        return f"{event}({args[1]!r})" if len(args) > 1 else event
    return f"{event}({args[0]!r})"


@dataclass
class Guard:
    """The checks one process runs; `found` holds what broke them, in order."""

    layout: Layout = field(repr=False)
    no_sockets: str | None = None  # the id of the unit test running now
    log: str | None = field(default=None, repr=False)  # a child appends its violations here (JSON lines)
    found: list[Violation] = field(default_factory=list, repr=False)

    def record(self, violation: Violation) -> None:
        if self.log is None:
            self.found.append(violation)
            return
        line = {"kind": violation.kind, "detail": violation.detail, "process": _this_process()}
        with open(self.log, "a") as log:  # one short line: an atomic append
            log.write(json.dumps(line) + "\n")

    def check(self, event: str, args: tuple[Any, ...]) -> None:
        if event in READ_EVENTS:
            path = self.layout.outside(args[0] if args else None)
            if path is not None:
                self.record(Violation("read", path))
            return
        if self.no_sockets is not None:
            detail = socket_violation(event, args)
            if detail is not None:
                self.record(Violation("socket", detail))
                raise SocketInUnitTest(
                    f"{detail}: {self.no_sockets} is not marked e2e, and unit tests open no socket"
                    " (mark it @pytest.mark.e2e, or make it pure)"
                )


def _this_process() -> str:
    return f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}"


# -- the audit hook: one per process, dispatching to the guards active now ------------------------------

_guards: list[Guard] = []
_busy = threading.local()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in _WATCHED_EVENTS or getattr(_busy, "on", False):
        return
    _busy.on = True  # the guard's own reads (realpath, the log) are not checked again
    try:
        for guard in tuple(_guards):
            guard.check(event, args)
    finally:
        _busy.on = False


_installed = False


def activate(guard: Guard) -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # cannot be removed: guards come and go instead
        _installed = True
    _guards.append(guard)


def deactivate(guard: Guard) -> None:
    if guard in _guards:
        _guards.remove(guard)


_from_environment: list[Guard] = []


def install_from_environment() -> Guard | None:
    """In a process a test started: guard it when the session asked for it (ENV_CONFIG)."""
    settings = os.environ.get(ENV_CONFIG)
    if not settings:
        return None
    config = json.loads(settings)
    guard = Guard(Layout.of(config["repo"]), os.environ.get(ENV_NO_SOCKETS) or None, log=config["log"])
    activate(guard)
    _from_environment.append(guard)
    return guard


def replace_guard_from_environment() -> None:
    """A pytest process (an xdist worker) reports for itself: the guard its parent set up goes."""
    while _from_environment:
        deactivate(_from_environment.pop())


def read_log(path: str, offset: int) -> tuple[list[Violation], int]:
    """Violations children appended to the log since `offset`, and the new offset."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            data = log.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
    found = [Violation(**json.loads(line)) for line in complete.splitlines() if line.strip()]
    return found, offset + len(complete)
