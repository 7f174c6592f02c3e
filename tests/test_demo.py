"""`collector demo` brings up simulator, broker and worker, prints where to look, and stops cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from agents.embedded_broker import free_port
from tests.harness import COLLECTOR, REPO, TopicReader, child_pids, is_alive, wait_for

pytestmark = pytest.mark.e2e


def test_the_demo_runs_everything_prints_addresses_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    web_port = free_port()
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        demo = subprocess.Popen(
            [COLLECTOR, "demo", "--port", str(web_port)], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        wait_for(
            lambda: "Ctrl-C stops everything" in output.read_text() or demo.poll() is not None, 120, "demo"
        )
        text = output.read_text()
        assert demo.poll() is None, text
        broker = re.search(r"embedded Kafka broker\s+(\S+)", text)
        assert broker, text
        assert f"http://127.0.0.1:{web_port}/" in text
        assert "collector tail market.trade.binance.btc-usdt" in text
        children = child_pids(demo.pid)
        assert len(children) == 2, "the demo runs a simulator and a worker"

        reader = TopicReader(broker.group(1))
        try:

            def trades() -> int:
                reader.follow("market.trade.binance.btc-usdt")
                reader.poll(0.3)
                return len(reader.records.get("market.trade.binance.btc-usdt", []))

            wait_for(trades, 60, "demo trades in Kafka")
        finally:
            reader.close()

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
        wait_for(lambda: not any(is_alive(pid) for pid in children), 30, "the demo's processes to exit")
    finally:
        if demo.poll() is None:
            demo.kill()
