"""`collector demo` runs all four exchanges: trades of each reach their market topics."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from agents.embedded_broker import free_port
from tests.harness import COLLECTOR, REPO, TopicReader, wait_for

pytestmark = pytest.mark.e2e

TOPICS = [
    "market.trade.binance.btc-usdt",
    "market.trade.binance-futures.btc-usdt",
    "market.trade.upbit.btc-krw",
    "market.trade.bithumb.btc-krw",
    "market.bbo.upbit.eth-krw",
    "market.kline.upbit.btc-krw",
    "market.ticker.bithumb.bnb-krw",
    "market.bbo.binance-futures.eth-usdt",
]


def test_the_demo_collects_all_four_exchanges(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        demo = subprocess.Popen(
            [COLLECTOR, "demo", "--port", str(free_port()), "--rate", "10"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "Ctrl-C stops everything" in output.read_text() or demo.poll() is not None, 120, "demo"
        )
        broker = re.search(r"embedded Kafka broker\s+(\S+)", output.read_text())
        assert demo.poll() is None and broker, output.read_text()
        reader = TopicReader(broker.group(1))
        try:

            def missing() -> list[str]:
                reader.follow("market.")
                reader.poll(0.3)
                return [topic for topic in TOPICS if not reader.records.get(topic)]

            try:
                wait_for(lambda: not missing(), 60, "records on every exchange's topics")
            except TimeoutError:
                raise AssertionError(f"no records on {missing()}; {output.read_text()}") from None
        finally:
            reader.close()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
