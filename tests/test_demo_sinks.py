"""`collector demo --sinks`: throwaway PostgreSQL and Redis servers, the worker storing into them, the
printed `psql` and `redis-cli` commands working, and everything gone after Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from agents.embedded_broker import free_port
from tests.harness import COLLECTOR, REPO, child_pids, is_alive, wait_for
from tests.test_sinks_databases import readme_block

pytestmark = pytest.mark.e2e


def test_the_demo_with_sinks_stores_into_servers_it_started_and_prints_how_to_look(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        demo = subprocess.Popen(
            [COLLECTOR, "demo", "--sinks", "--port", str(free_port()), "--rate", "20"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "Ctrl-C stops everything" in output.read_text() or demo.poll() is not None, 120, "demo"
        )
        text = output.read_text()
        assert demo.poll() is None, text
        psql = re.search(r"psql (postgresql://\S+)", text)
        redis_cli = re.search(r"redis-cli -p (\d+) HGETALL (\S+)", text)
        assert psql and redis_cli, text
        dsn, redis_port, latest_key = psql[1], redis_cli[1], redis_cli[2]

        def ohlcv() -> str:
            answer = subprocess.run(["psql", dsn, "-c", readme_block("-- ohlcv-1m")],
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
            return answer.stdout if "binance" in answer.stdout and "BTC/USDT" in answer.stdout else ""

        table = wait_for(ohlcv, 90, "OHLCV rows from the demo's trades")
        print(table)  # the psql session the issue asks to show
        assert re.search(
            r"exchange\s*\|\s*symbol\s*\|\s*minute\s*\|\s*open\s*\|\s*high\s*\|\s*low\s*\|\s*close\s*\|\s*volume\s*\|\s*trades",
            table,
        )

        def latest() -> str:
            answer = subprocess.run(["redis-cli", "-p", redis_port, "HGETALL", latest_key],
                                    capture_output=True, text=True, timeout=10)  # fmt: skip
            return answer.stdout if "trade" in answer.stdout.split() else ""

        assert '"type":"trade"' in wait_for(latest, 30, "the latest trade in Redis")
        children = child_pids(demo.pid)
        assert len(children) == 4, "simulator, worker, PostgreSQL and Redis"

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
        wait_for(lambda: not any(is_alive(pid) for pid in children), 30, "the demo's processes to exit")
    finally:
        if demo.poll() is None:
            demo.kill()
