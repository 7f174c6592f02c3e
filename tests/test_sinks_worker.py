"""End to end with a real worker: simulator → worker (collection and sinks) → embedded broker →
PostgreSQL and Redis. Every trade the simulator made is a row exactly once, with its exact values,
across a worker restart; /metrics counts the rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import redis
import yaml

from agents.embedded_broker import EmbeddedBroker
from tests.harness import Simulator, Worker, assert_clean_exit, trades_made_until, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
EXCHANGE_SYMBOLS = {"BTC/USDT": "BTCUSDT", "ETH/USDT": "ETHUSDT"}
DATA_TYPES = ["trade", "kline_1s", "ticker", "bbo"]


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def stored_trades(dsn: str) -> dict[str, dict[str, tuple[str, str, str, int]]]:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as connection:
            found = connection.execute(
                "SELECT symbol, trade_id, price::text, quantity::text, side, "
                "(extract(epoch FROM trade_time) * 1000)::bigint FROM trades"
            ).fetchall()
    except psycopg.errors.UndefinedTable:
        return {}
    table: dict[str, dict[str, tuple[str, str, str, int]]] = {}
    for symbol, trade_id, price, quantity, side, trade_time in found:
        table.setdefault(symbol, {})[trade_id] = (price, quantity, side, trade_time)
    return table


def expected(truth: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[str, str, str, int]]]:
    return {
        symbol: {
            str(t["id"]): (t["price"], t["qty"], "sell" if t["isBuyerMaker"] else "buy", t["time"])
            for t in trades
        }
        for symbol, trades in truth.items()
    }


def test_a_worker_stores_every_trade_once_with_its_exact_values_across_a_restart(
    broker: EmbeddedBroker, tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    simulator = Simulator(SYMBOLS, rate=40)
    before = simulator.post("/_sim/pause")["tradesGenerated"]
    config = write_config(
        tmp_path / "c.yaml",
        simulator,
        SYMBOLS,
        DATA_TYPES,
        sinks={"postgres": {"dsn": postgres_dsn, "batchMs": 200}, "redis": {"url": redis_url}},
    )
    worker = Worker(config, broker.bootstrap, tmp_path)
    try:
        worker.wait_ready()
        every_stream = len(SYMBOLS) * len(DATA_TYPES)
        wait_for(
            lambda: sum(map(len, simulator.get("/_sim/stats")["subscriptions"].values())) == every_stream,
            30,
            "all subscriptions",
        )
        simulator.post("/_sim/resume")
        truth = trades_made_until(simulator, before, 100, EXCHANGE_SYMBOLS)
        wait_for(lambda: stored_trades(postgres_dsn) == expected(truth), 60, "every trade in PostgreSQL")
        status, metrics = worker.request("/metrics")
        assert status == 200
        assert 'collector_sink_rows_total{sink="postgres",type="trade"}' in metrics
        assert 'collector_sink_lag_seconds{sink="redis"}' in metrics
        status, sinks = worker.request("/sinks")
        assert status == 200, sinks
        assert sinks["sinks"]["postgres"]["reachable"] is True
        assert sinks["sinks"]["postgres"]["group"] == "exchange-collector-sinks-postgres"
        # Redis is its own sink and consumer group: it may store its batch a moment after PostgreSQL.
        wait_for(lambda: worker.request("/sinks")[1]["sinks"]["redis"]["rows"].get("trade", 0) >= 200, 30,
                 "every trade in Redis")  # fmt: skip
        _, health = worker.request("/health")
        assert health["sinks"]["postgres"]["state"] == "running", health
        assert not [reason for reason in health["reasons"] if reason.startswith("sink ")], health
    finally:
        code = worker.stop()
    assert_clean_exit(worker, code)

    # A restart: the new worker's sinks start from the committed offsets; trades made meanwhile and
    # after are stored, none twice.
    restarted = Worker(config, broker.bootstrap, tmp_path, name="restarted")
    try:
        restarted.wait_ready()
        simulator.post("/_sim/resume")
        truth = trades_made_until(simulator, before, 200, EXCHANGE_SYMBOLS)
        wait_for(lambda: stored_trades(postgres_dsn) == expected(truth), 90, "every trade after the restart")
        newest = max(truth["BTC/USDT"], key=lambda t: (t["time"], t["id"]))

        def latest_trade_id() -> str | None:
            with redis.Redis.from_url(redis_url) as client:
                found = client.hget("collector:latest:binance:btc-usdt", "trade")
            return None if found is None else msgspec.json.decode(found)["data"]["tradeId"]

        wait_for(lambda: latest_trade_id() == str(newest["id"]), 30, "the newest trade in Redis")
    finally:
        code = restarted.stop()
        simulator.stop()
    assert_clean_exit(restarted, code)


def test_a_worker_that_only_stores_runs_its_sinks_without_collecting(
    broker: EmbeddedBroker, tmp_path: Path, postgres_dsn: str
) -> None:
    """`collection: false` plus `sinks`: no exchange is contacted, the market topics are stored."""
    from tests.test_sinks_e2e import Market, trades

    config = tmp_path / "store-only.yaml"
    config.write_text(yaml.safe_dump({
        "collection": False,
        "exchanges": {"binance": {"wsEndpoint": "ws://127.0.0.1:9", "restEndpoint": "http://127.0.0.1:9",
                                  "symbols": ["BTC/USDT"], "dataTypes": ["trade"]}},
        "sinks": {"postgres": {"dsn": postgres_dsn, "types": ["trade"], "batchMs": 100}},
        "logging": {"level": "info", "format": "json"},
    }))  # fmt: skip
    Market(broker.bootstrap).send(trades("DOGE/USDT", range(1, 101)))
    worker = Worker(config, broker.bootstrap, tmp_path, name="store-only")
    try:
        worker.wait_ready()
        every_trade = {str(i) for i in range(1, 101)}
        wait_for(lambda: set(stored_trades(postgres_dsn).get("DOGE/USDT", {})) == every_trade,
                 60, "the trades stored by a worker that collects nothing")  # fmt: skip
        # The trades were produced before the worker started: their first batch counts as behind,
        # until a read finds nothing more and the sink says it has caught up.
        _, body = wait_for(lambda: (answer := worker.request("/sinks"))[0] == 200 and answer, 30,
                           "the sink caught up")  # fmt: skip
        assert body["sinks"]["postgres"]["rows"]["trade"] >= 100
    finally:
        code = worker.stop()
    assert_clean_exit(worker, code)
    assert "wsEndpoint" not in worker.log() and "connecting" not in worker.log()
