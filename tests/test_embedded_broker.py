"""`collector worker` with no brokers configured starts the embedded broker and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from agents.embedded_broker import EmbeddedBroker
from tests.harness import Simulator, Worker, child_pids, is_alive, wait_for, write_config

pytestmark = pytest.mark.e2e


def _broker_pid(worker: Worker) -> int:
    def find() -> int | None:
        for child in child_pids(worker.process.pid):
            try:
                if "tansu" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    return child
            except OSError:
                continue
        return None

    pid = wait_for(find, 20, "the embedded broker process")
    assert pid is not None
    return pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_the_worker_starts_the_embedded_broker_and_it_dies_with_the_worker(
    tmp_path: Path, signum: int
) -> None:
    simulator = Simulator(["BTC/USDT"], rate=5)
    config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
    worker = Worker(config, brokers=None, log_dir=tmp_path)
    try:
        started = time.monotonic()
        worker.wait_ready(timeout=60)
        assert "embedded broker listening on 127.0.0.1:" in worker.log()
        assert "the embedded broker is for a single machine" in worker.log()  # and when to move on
        assert "] +uvloop" in worker.log()  # Faust's banner: `collector worker` runs on uvloop
        broker = _broker_pid(worker)
        worker.signal(signum)
        worker.process.wait(timeout=30)
        wait_for(lambda: not is_alive(broker), 15, "the broker to exit")
        assert time.monotonic() - started < 60
        if signum != signal.SIGKILL:
            assert worker.process.returncode == 0, worker.log()[-3000:]
    finally:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGKILL)
        simulator.stop()


def test_a_broker_whose_port_another_broker_answers_on_refuses_to_start() -> None:
    # Its own broker could not bind, and the other one answered the readiness check: writing there
    # would put this worker's records into someone else's broker.
    with EmbeddedBroker() as first:
        second = EmbeddedBroker(port=first.port)
        with pytest.raises(RuntimeError, match="was taken by another process"):
            second.start()
        assert second.pid is None


def test_the_worker_reports_its_brokers_memory_and_its_death(tmp_path: Path) -> None:
    simulator = Simulator(["BTC/USDT"], rate=5)
    config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
    worker = Worker(config, brokers=None, log_dir=tmp_path)
    try:
        worker.wait_ready(timeout=60)

        def broker_memory() -> float | None:
            text = worker.request("/metrics")[1]
            for line in text.splitlines():
                if line.startswith("collector_embedded_broker_memory_bytes "):
                    return float(line.split()[1]) or None
            return None

        assert wait_for(broker_memory, 15, "the broker's memory in /metrics") > 1024 * 1024
        os.kill(_broker_pid(worker), signal.SIGKILL)  # as the kernel's OOM killer would

        def reasons() -> list[str] | None:
            status, health = worker.request("/health")
            return health["reasons"] if status == 503 else None

        said = wait_for(lambda: [r for r in reasons() or [] if "embedded broker exited" in r], 20, "/health")
        assert said == ["the embedded broker exited (code -9); restart the worker"]
        assert "the embedded broker exited (code -9" in worker.log()
    finally:
        os.killpg(worker.process.pid, signal.SIGKILL)
        simulator.stop()
