"""Throwaway PostgreSQL and Redis servers from Debian's packages, for tests, the demo and the bench.

Each runs Debian's own binary (`postgresql`, `redis-server`) in a temporary folder on a free
127.0.0.1 port, as a child process that dies with its parent; nothing is installed as a service and
nothing outside the folder is touched. PostgreSQL refuses to run as root, so under root it runs as
the `postgres` user the package creates. `make system-deps` installs the packages.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from agents.embedded_broker import die_with_parent, free_port

START_TIMEOUT = 30.0


class ServerMissing(RuntimeError):
    """The Debian package is not installed: `make system-deps` installs it."""


def postgres_bin_dir() -> Path:
    """Debian keeps the server binaries (initdb, postgres) per major version, off the PATH."""
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True):
        return Path(found).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise ServerMissing("PostgreSQL is not installed: run `make system-deps` (Debian package postgresql)")


def _wait_for(log_path: Path, text: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start within {START_TIMEOUT:.0f} s: {log_path.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes] | None, signum: int, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class LocalPostgres:
    """initdb + postgres in a temporary folder; `restart()` keeps the data (a real server restart)."""

    USER = "collector"  # the superuser initdb creates; local connections need no password

    def __init__(self, fsync: bool = False) -> None:
        self.bin = postgres_bin_dir()
        self.port = free_port()
        self.fsync = fsync
        self.folder = Path(tempfile.mkdtemp(prefix="collector-postgres-"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        # Run from the folder: the server's user may not be allowed into the caller's directory.
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")  # created by Debian's postgresql package
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER, "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                check=True, capture_output=True, cwd=self.folder, **self._run_as,
            )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.folder),
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "50",
            "shared_buffers": "128MB",
        }
        options = [item for key, value in settings.items() for item in ("-c", f"{key}={value}")]
        log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if self._run_as:
            os.fchown(log_file, self._run_as["user"], self._run_as["group"])
        try:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), *options],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder,
                preexec_fn=die_with_parent(signal.SIGQUIT), **self._run_as,
            )  # fmt: skip
        finally:
            os.close(log_file)
        _wait_for(self.log_path, "ready to accept connections", self.process, "postgres")
        return self

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, committed data stays."""
        _stop(self.process, signal.SIGINT)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A fresh database; returns its DSN."""
        import psycopg  # only the callers that use a database need the driver

        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.close()


class LocalRedis:
    """redis-server in a temporary folder, with an append-only file so a restart keeps the data."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerMissing(
                "Redis is not installed: run `make system-deps` (Debian package redis-server)"
            )
        self.binary = binary
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="collector-redis-"))
        self.log_path = self.folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "yes", "--appendfsync", "no", "--daemonize", "no",
            "--logfile", str(self.log_path), "--protected-mode", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )  # fmt: skip
        self.log_path.touch()
        _wait_for(self.log_path, "Ready to accept connections", self.process, "redis-server")
        return self

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.close()
