"""End to end: runtime subscriptions through `collector subscribe|unsubscribe` and `/subscriptions`.

One worker (one connection group: connections.max 1) starts with the config's BTC/USDT trade. New
streams must arrive on the live connection: the simulator's connection count stays the same and the
connection that carried BTC/USDT from the start is the one that gets the new streams. A restart must
keep the runtime changes: the config's seed does not undo them.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.embedded_broker import EmbeddedBroker
from bench.step import bench_symbols
from tests.harness import COLLECTOR, REPO, Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

LISTED = ["BTC/USDT", "ETH/USDT", "BNB/USDT"]


@dataclass
class Collector:
    broker: EmbeddedBroker
    simulator: Simulator
    config: Path
    worker: Worker

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.worker.port}"

    def cli(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(action, *args, config=self.config, brokers=self.broker.bootstrap)


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    """One worker, one connection group (connections.max 1), the config's BTC/USDT trade only.

    The tests using it run in file order: the bad requests first (they change nothing), then the
    runtime changes, which expect the table to hold only the config's seed.
    """
    tmp_path = tmp_path_factory.mktemp("subscriptions")
    with EmbeddedBroker() as broker:
        simulator = Simulator(LISTED, rate=20)
        config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
        config.write_text(config.read_text().replace("max: 5", "max: 1"))
        worker = Worker(config, broker.bootstrap, tmp_path)
        try:
            worker.wait_ready()
            yield Collector(broker, simulator, config, worker)
        finally:
            code = worker.stop()
            simulator.stop()
        assert code == 0, worker.log()[-3000:]
        assert "Traceback" not in worker.log(), worker.log()[-5000:]


def streams_by_connection(simulator: Simulator) -> dict[str, set[str]]:
    return {cid: set(streams) for cid, streams in simulator.get("/_sim/stats")["subscriptions"].items()}


def connections_total(simulator: Simulator) -> int:
    return int(simulator.get("/_sim/stats")["connections"]["total"])


def cli(action: str, *args: str, config: Path, brokers: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLLECTOR_CONFIG": str(config), "COLLECTOR_KAFKA_BROKERS": brokers}
    return subprocess.run(
        [COLLECTOR, action, *args, "--wait", "30"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def http(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def records(reader: TopicReader, topic: str) -> int:
    reader.follow("market.")
    reader.poll(0.3)
    return len(reader.records.get(topic, []))


def test_bad_subscription_requests_get_clear_errors(collector: Collector) -> None:
    base = collector.base + "/subscriptions"
    body = {"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["trade"]}
    cases = [
        (None, b"{not json", 400, "not valid JSON"),
        ({"exchange": "binance", "symbol": "BTC/USDT"}, None, 422, "missing field"),
        ({**body, "exchange": "kraken"}, None, 422, "not configured"),
        ({**body, "symbol": "BTCUSDT"}, None, 422, "BASE/QUOTE"),
        ({**body, "dataTypes": ["kline_10m"]}, None, 422, "does not offer data type kline_10m"),
        ({**body, "dataTypes": ["candles"]}, None, 422, "unknown data type"),
    ]
    for method in ("POST", "DELETE"):
        for payload, raw, status, message in cases:
            got, answer = http(method, base, payload, raw)
            assert got == status and message in answer["error"], (method, payload, raw, answer)

    result = collector.cli("subscribe", "binance", "BTC/USDT", "candles")
    assert result.returncode == 2 and "unknown data type 'candles'" in result.stderr
    result = collector.cli("subscribe", "kraken", "BTC/USDT", "trade")
    assert result.returncode == 2 and "'kraken' is not configured" in result.stderr
    result = collector.cli("unsubscribe", "binance", "BTCUSDT", "trade")
    assert result.returncode == 2 and "BASE/QUOTE" in result.stderr
    result = collector.cli("subscribe", "binance", "BTC/USDT")
    assert result.returncode == 2 and "DATA_TYPE" in result.stderr
    # Well formed, but the exchange does not list it: the worker rejects it with a reason.
    result = collector.cli("subscribe", "binance", "FOO/BAR", "trade")
    assert result.returncode == 1 and "rejected: binance does not list FOO/BAR" in result.stderr


def test_subscribe_and_unsubscribe_at_runtime_on_the_live_connection(
    collector: Collector, record_property: Any
) -> None:
    simulator, base = collector.simulator, collector.base
    reader = TopicReader(collector.broker.bootstrap)
    try:
        wait_for(
            lambda: list(streams_by_connection(simulator).values()) == [{"btcusdt@trade"}],
            30,
            "the config's BTC/USDT trade stream on one connection",
        )
        (live,) = streams_by_connection(simulator)
        opened = connections_total(simulator)

        # -- subscribe from the command line --------------------------------------------------
        result = collector.cli("subscribe", "binance", "ETH/USDT", "trade", "kline_1m")
        assert result.returncode == 0, result.stderr
        assert "applied" in result.stdout and "kline_1m, trade" in result.stdout, result.stdout
        wait_for(
            lambda: (
                streams_by_connection(simulator).get(live, set())
                >= {"btcusdt@trade", "ethusdt@trade", "ethusdt@kline_1m"}
            ),
            15,
            "ETH/USDT streams on the live connection",
        )
        wait_for(
            lambda: records(reader, "market.trade.binance.eth-usdt") >= 5, 20, "ETH/USDT trades in Kafka"
        )
        wait_for(
            lambda: records(reader, "market.kline.binance.eth-usdt") >= 1, 20, "ETH/USDT klines in Kafka"
        )

        # -- subscribe through the web view -----------------------------------------------------
        status, answer = http(
            "POST",
            base + "/subscriptions",
            {"exchange": "binance", "symbol": "bnb-usdt", "dataTypes": ["bbo"]},
        )
        assert status == 202, answer
        assert answer["symbol"] == "BNB/USDT" and answer["group"] == "binance:0" and answer["commandId"]
        wait_for(
            lambda: "bnbusdt@bookTicker" in streams_by_connection(simulator).get(live, set()),
            15,
            "BNB/USDT bbo on the live connection",
        )
        wait_for(lambda: records(reader, "market.bbo.binance.bnb-usdt") >= 3, 20, "BNB/USDT bbo in Kafka")
        assert connections_total(simulator) == opened, "subscribing must not open or reopen connections"
        assert list(streams_by_connection(simulator)) == [live]

        status, listing = http("GET", base + "/subscriptions")
        assert status == 200, listing
        by_symbol = {row["symbol"]: row for row in listing["subscriptions"]}
        assert by_symbol["BTC/USDT"]["dataTypes"] == ["trade"]
        assert by_symbol["ETH/USDT"]["dataTypes"] == ["kline_1m", "trade"]
        assert by_symbol["BNB/USDT"]["dataTypes"] == ["bbo"]
        assert all(row["group"] == "binance:0" and row["running"] for row in listing["subscriptions"])
        assert listing["groups"]["binance:0"]["streams"] == 4

        # -- unsubscribe from the command line: the stream stops, the connection stays ---------------
        result = collector.cli("unsubscribe", "binance", "ETH/USDT", "trade")
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: "ethusdt@trade" not in streams_by_connection(simulator).get(live, set()),
            15,
            "ETH/USDT trade unsubscribed",
        )
        assert streams_by_connection(simulator)[live] == {
            "btcusdt@trade",
            "ethusdt@kline_1m",
            "bnbusdt@bookTicker",
        }
        btc_topic, eth_topic = "market.trade.binance.btc-usdt", "market.trade.binance.eth-usdt"
        # Let anything already in flight land, then ETH trades must stay put while BTC's keep coming.
        mark = records(reader, btc_topic)
        wait_for(lambda: records(reader, btc_topic) >= mark + 30, 20, "30 more BTC/USDT trades")
        eth_after = records(reader, eth_topic)
        mark = records(reader, btc_topic)
        wait_for(lambda: records(reader, btc_topic) >= mark + 30, 20, "another 30 BTC/USDT trades")
        assert records(reader, eth_topic) == eth_after, "ETH/USDT trades still arrive after unsubscribe"
        assert connections_total(simulator) == opened
        record_property("connections_total", opened)
    finally:
        reader.close()


def answers_to(reader: TopicReader, command_prefix: str) -> list[dict[str, Any]]:
    reader.follow("collector.events")
    reader.poll(0.3)
    events = [json.loads(m.value()) for m in reader.records.get("collector.events", [])]
    return [e for e in events if str(e.get("detail", {}).get("commandId", "")).startswith(command_prefix)]


def test_a_restart_keeps_runtime_changes_and_the_config_seed_does_not_undo_them(tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()  # its own: the subscription table must start empty
    simulator = Simulator(LISTED, rate=5)
    config = write_config(tmp_path / "c.yaml", simulator, ["BNB/USDT"], ["trade", "bbo"])
    reader = TopicReader(broker.bootstrap)
    worker = Worker(config, broker.bootstrap, tmp_path, name="before")
    try:
        worker.wait_ready()
        wait_for(
            lambda: len(answers_to(reader, "config:binance:BNB/USDT")) >= 1, 30, "the first seed applied"
        )
        result = cli("unsubscribe", "binance", "BNB/USDT", "bbo", config=config, brokers=broker.bootstrap)
        assert result.returncode == 0, result.stderr
        result = cli("subscribe", "binance", "BNB/USDT", "kline_1m", config=config, brokers=broker.bootstrap)
        assert result.returncode == 0, result.stderr
        assert worker.stop() == 0, worker.log()[-3000:]

        worker = Worker(config, broker.bootstrap, tmp_path, name="after")
        worker.wait_ready()
        wait_for(
            lambda: len(answers_to(reader, "config:binance:BNB/USDT")) >= 2,
            30,
            "the seed of the restart answered",
        )
        status, listing = http("GET", f"http://127.0.0.1:{worker.port}/subscriptions?exchange=binance")
        assert status == 200, listing
        (row,) = [r for r in listing["subscriptions"] if r["symbol"] == "BNB/USDT"]
        assert row["dataTypes"] == ["kline_1m", "trade"], "the restart's seed undid a runtime change"
        wait_for(
            lambda: (
                {s for streams in streams_by_connection(simulator).values() for s in streams}
                == {"bnbusdt@trade", "bnbusdt@kline_1m"}
            ),
            20,
            "BNB/USDT trade and kline_1m, without bbo, after the restart",
        )
    except BaseException:
        print("worker log:\n", worker.log()[-6000:])  # pytest shows it with the failure
        raise
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
        broker.stop()
    assert code == 0, worker.log()[-3000:]


def test_the_config_seed_of_many_symbols_lands_every_command_on_its_groups_partition(tmp_path: Path) -> None:
    # Seed commands are handed to the producer together and awaited once: none may be lost, and
    # each must land on its group's partition (a command on another partition would be moved).
    symbols = bench_symbols(40)
    with EmbeddedBroker() as broker:
        simulator = Simulator(symbols, rate=1)
        config = write_config(tmp_path / "c.yaml", simulator, symbols, ["trade"])
        worker = Worker(config, broker.bootstrap, tmp_path)
        try:
            worker.wait_ready()

            def listed() -> dict[str, str] | None:
                status, listing = http(
                    "GET", f"http://127.0.0.1:{worker.port}/subscriptions?exchange=binance"
                )
                rows = {row["symbol"]: row["group"] for row in listing.get("subscriptions", [])}
                return rows if status == 200 and len(rows) == len(symbols) else None

            rows = wait_for(listed, 60, "every seeded symbol in the subscriptions table")
            assert sorted(rows) == sorted(symbols)
            assert len(set(rows.values())) == 5, "40 symbols should spread over the 5 connection groups"
            wait_for(
                lambda: sum(len(s) for s in streams_by_connection(simulator).values()) == len(symbols),
                60,
                "every seeded symbol subscribed at the exchange",
            )
            assert "seeded 40 subscriptions from the config in" in worker.log()
            assert "moving command" not in worker.log()
        finally:
            code = worker.stop()
            simulator.stop()
        assert code == 0, worker.log()[-3000:]
