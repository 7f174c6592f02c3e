"""Real processes for end-to-end tests: simulator, embedded broker, collector workers, topic reader.

Every wait polls a real condition with a deadline; nothing sleeps for a fixed time to "let it settle".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import yaml
from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import free_port

REPO = Path(__file__).resolve().parents[1]
COLLECTOR = str(Path(sys.executable).with_name("collector"))
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Simulator:
    """`collector simulate` in its own process; controlled over its /_sim/ endpoints."""

    def __init__(self, symbols: list[str], rate: float, seed: int = 7, extra: Iterable[str] = ()) -> None:
        self.port = free_port()
        self.log_path = Path(f"/tmp/collector-sim-{self.port}.log")
        command = [
            COLLECTOR, "simulate", "--host", "127.0.0.1", "--port", str(self.port),
            "--symbols", ",".join(symbols), "--rate", str(rate), "--seed", str(seed), *extra,
        ]  # fmt: skip
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: "listening" in self.log_path.read_text() or self._died(), 30, "the simulator")
        if self.process.poll() is not None:
            raise RuntimeError(f"simulator exited: {self.log_path.read_text()[-2000:]}")

    def _died(self) -> bool:
        return self.process.poll() is not None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def get(self, path: str, exact_numbers: bool = False) -> Any:
        """GET a simulator path; `exact_numbers` reads JSON floats as Decimal (Upbit/Bithumb prices)."""
        with urllib.request.urlopen(self.http + path, timeout=10) as response:
            return json.loads(response.read(), parse_float=Decimal if exact_numbers else float)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.http + path, data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def write_config(
    path: Path,
    simulator: Simulator,
    symbols: list[str],
    data_types: list[str],
    *,
    exchange: str = "binance",
    route: str = "",
    **extra: Any,
) -> Path:
    """A worker config for one simulated exchange; `route` is its dialect's path prefix (`/upbit`)."""
    document = {
        "exchanges": {
            exchange: {
                "wsEndpoint": simulator.ws + route,
                "restEndpoint": simulator.http + route,
                "symbols": symbols,
                "dataTypes": data_types,
                "connections": {"max": 5, "streamsPerConnection": 1000},
            }
        },
        "kafka": {"brokers": "embedded", "producer": {"lingerMs": 5, "compression": "lz4"}},
        "logging": {"level": "info", "format": "json"},
        **extra,
    }
    path.write_text(yaml.safe_dump(document))
    return path


class Worker:
    """`collector worker` in its own process, with its own web port and log file."""

    READY = re.compile(r"Worker ready|\[\^Worker\]: Ready")

    def __init__(self, config_path: Path, brokers: str | None, log_dir: Path, name: str = "worker") -> None:
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        env = {**os.environ, "COLLECTOR_CONFIG": str(config_path), "COLLECTOR_SERVER_PORT": str(self.port)}
        if brokers:
            env["COLLECTOR_KAFKA_BROKERS"] = brokers
        else:
            env.pop("COLLECTOR_KAFKA_BROKERS", None)
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [COLLECTOR, "worker", "-l", "info"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        self.ready_after: float | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> float:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            return bool(self.READY.search(self.log()))

        wait_for(ready, timeout, "the worker to be ready")
        self.ready_after = time.monotonic() - self.started
        return self.ready_after

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait(timeout=10)
        self._log.close()
        return code


class TopicReader:
    """Reads whole topics back from the broker with confluent-kafka."""

    def __init__(self, brokers: str) -> None:
        self.brokers = brokers
        self.consumer = Consumer(
            {
                "bootstrap.servers": brokers,
                "group.id": f"test-reader-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.assigned: set[str] = set()
        self.records: dict[str, list[Any]] = {}

    def topics(self, prefix: str) -> list[str]:
        metadata = self.consumer.list_topics(timeout=10)
        return sorted(name for name in metadata.topics if name.startswith(prefix))

    def follow(self, prefix: str) -> None:
        """Assign every partition of every topic with this prefix not yet assigned."""
        metadata = self.consumer.list_topics(timeout=10)
        partitions = []
        for name, topic in metadata.topics.items():
            if name.startswith(prefix) and name not in self.assigned:
                self.assigned.add(name)
                self.records.setdefault(name, [])
                partitions += [TopicPartition(name, p, 0) for p in topic.partitions]
        if partitions:
            self.consumer.incremental_assign(partitions)

    def poll(self, seconds: float = 0.5) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = self.consumer.consume(num_messages=10000, timeout=0.1)
            for message in messages:
                if message.error():
                    continue
                self.records.setdefault(message.topic(), []).append(message)
                count += 1
        return count

    def close(self) -> None:
        self.consumer.close()
