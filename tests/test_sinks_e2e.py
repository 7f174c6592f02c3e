"""The sinks end to end: market records in the embedded broker, the sink services reading them in
their own consumer groups, real PostgreSQL and Redis servers — replays, a restart of the sinks, new
topics, and each database restarting in the middle of a run."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.embedded_broker import EmbeddedBroker
from agents.metrics import REGISTRY
from agents.sinks import Sinks, build_sinks
from agents.sinks.localservers import LocalPostgres, LocalRedis
from streams.config import parse_config
from streams.records import MarketRecord, encode_record
from streams.topics import market_topic
from tests.test_sinks_rules import T0, kline, trade

pytestmark = pytest.mark.e2e
_apps = itertools.count(1)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


class Market:
    """Writes market records to the broker the way the normalize agent does (one partition per topic)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.topics: set[str] = set()
        self.sent: dict[str, int] = {}  # topic → records written: its end offset (the broker's
        # ListOffsets answer is wrong, reference/platform.md)

    def send(self, records: list[MarketRecord]) -> None:
        for record in records:
            topic = market_topic(record.type, record.exchange, record.symbol)
            if topic not in self.topics:
                for created in self.admin.create_topics([NewTopic(topic, 1, 1)]).values():
                    created.result(10)
                self.topics.add(topic)
            self.producer.produce(topic, encode_record(record), record.symbol.encode())
            self.sent[topic] = self.sent.get(topic, 0) + 1
        assert self.producer.flush(10) == 0

    def committed(self, group: str) -> dict[str, int]:
        reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            found = reader.committed([TopicPartition(t, 0) for t in self.topics], timeout=10)
            return {p.topic: p.offset for p in found}
        finally:
            reader.close()


def trades(symbol: str, ids: range, at: int = T0) -> list[MarketRecord]:
    return [msgspec.structs.replace(trade(str(i), f"{100 + i}.5", at + i), symbol=symbol) for i in ids]


def sinks_for(bootstrap: str, app_id: str, **sinks: dict[str, Any]) -> Sinks:
    config = parse_config(
        {
            "exchanges": {
                "binance": {
                    "wsEndpoint": "ws://127.0.0.1:1",
                    "restEndpoint": "http://127.0.0.1:1",
                    "symbols": ["BTC/USDT"],
                    "dataTypes": ["trade"],
                }
            },
            "kafka": {"brokers": [bootstrap]},
            "sinks": {name: {"batchMs": 100, **settings} for name, settings in sinks.items()},
        }
    )
    return build_sinks(config, [bootstrap], app_id)


async def until(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, connect_timeout=3) as connection:
        return connection.execute(sql).fetchall()


def trade_ids(dsn: str) -> dict[str, list[str]]:
    """symbol → stored trade ids in order; empty before the sink created its tables or while the
    server is down."""
    try:
        stored = rows(dsn, "SELECT symbol, trade_id FROM trades ORDER BY symbol, trade_id::int")
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return {}
    found: dict[str, list[str]] = {}
    for symbol, trade_id in stored:
        found.setdefault(symbol, []).append(trade_id)
    return found


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def drained(market: Market, group: str) -> bool:
    return market.committed(group) == market.sent


async def test_rows_are_exact_after_replays_a_restart_of_the_sinks_and_new_topics(
    broker: EmbeddedBroker, postgres_dsn: str, redis_url: str
) -> None:
    market = Market(broker.bootstrap)
    app_id = f"sinks-test-{next(_apps)}"
    market.send(trades("BTC/USDT", range(1, 301)) + trades("ETH/USDT", range(1, 201)))
    market.send(trades("BTC/USDT", range(100, 151)))  # a replay, as after a rebalance upstream
    market.send(
        [kline(False, T0 + 10, "100.1"), kline(True, T0 + 59_999, "100.9"), kline(False, T0 + 60_100, "555")]
    )  # an open update after the close
    hostile = msgspec.structs.replace(
        trades("BTC/USDT", range(9000, 9001))[0],
        data=msgspec.structs.replace(trade().data, trade_id="9000", price="1e400"),
    )
    market.send([hostile])
    sinks = sinks_for(
        broker.bootstrap,
        app_id,
        postgres={"dsn": postgres_dsn},
        redis={"url": redis_url, "streamMaxLen": 100_000},
    )
    await sinks.start()
    try:
        await until(
            lambda: (
                trade_ids(postgres_dsn).get("ETH/USDT", []) == [str(i) for i in range(1, 201)]
                and len(trade_ids(postgres_dsn).get("BTC/USDT", [])) == 300
            ),
            60,
            "the first rows",
        )
        # A symbol subscribed at runtime: its topic appears after the sinks started.
        market.send(trades("BNB/USDT", range(1, 51)))
        await until(
            lambda: len(trade_ids(postgres_dsn).get("BNB/USDT", [])) == 50, 30, "the new topic's rows"
        )
        await until(lambda: drained(market, f"{app_id}-sinks-postgres"), 30, "postgres offsets committed")
        await until(lambda: drained(market, f"{app_id}-sinks-redis"), 30, "redis offsets committed")
    finally:
        await sinks.stop()
    assert sinks.health.report(0)["postgres"]["rejected"] == {"not-a-decimal": 1}

    # While the sinks are down: new trades and another replay. A new sinks service (a worker restart)
    # starts from the committed offsets.
    market.send(trades("BTC/USDT", range(301, 401)) + trades("BTC/USDT", range(1, 101)))
    restarted = sinks_for(
        broker.bootstrap,
        app_id,
        postgres={"dsn": postgres_dsn},
        redis={"url": redis_url, "streamMaxLen": 100_000},
    )
    await restarted.start()
    try:
        await until(lambda: drained(market, f"{app_id}-sinks-postgres"), 60, "postgres caught up again")
        await until(lambda: drained(market, f"{app_id}-sinks-redis"), 30, "redis caught up again")
    finally:
        await restarted.stop()

    stored = trade_ids(postgres_dsn)
    assert stored == {
        "BTC/USDT": [str(i) for i in range(1, 401)],
        "ETH/USDT": [str(i) for i in range(1, 201)],
        "BNB/USDT": [str(i) for i in range(1, 51)],
    }
    assert rows(
        postgres_dsn, "SELECT price::text FROM trades WHERE symbol = 'BTC/USDT' AND trade_id = '7'"
    ) == [("107.5",)]
    assert rows(postgres_dsn, "SELECT close::text, closed FROM klines") == [("100.9", True)]
    assert rows(postgres_dsn, "SELECT count(*) FROM trades WHERE trade_id = '9000'") == [(0,)]
    with redis.Redis.from_url(redis_url) as client:
        latest = client.hgetall("collector:latest:binance:btc-usdt")
        assert (
            msgspec.json.decode(latest[b"trade"])["data"]["tradeId"] == "400"
        )  # newest event, not last sent
        assert msgspec.json.decode(latest[b"kline:1m"])["data"]["closed"] is True
        streamed = {
            msgspec.json.decode(fields[b"record"])["data"].get("tradeId")
            for _, fields in client.xrange("collector:stream:binance:btc-usdt")
        }
        assert {str(i) for i in range(1, 401)} <= streamed
        assert "9000" not in streamed
    assert sample("collector_sink_rows_total", sink="postgres", type="trade") >= 650


async def _outage_run(
    broker: EmbeddedBroker,
    sinks: Sinks,
    sink: str,
    symbol: str,
    restart: Callable[[], None],
    stored: Callable[[], set[str]],
) -> None:
    """Trades of `symbol` flow in while the database goes down and comes back; afterwards every one
    is stored."""
    market = Market(broker.bootstrap)
    expected = {str(i) for i in range(1, 1201)}
    errors_before = sample("collector_sink_errors_total", sink=sink)
    stop_sending = threading.Event()
    sent = [25]

    def send_steadily() -> None:  # ~7 s: the outage happens while records keep arriving
        for first in range(26, 1201, 25):
            market.send(trades(symbol, range(first, first + 25)))
            sent[0] = first + 24
            if stop_sending.wait(0.15):
                return

    market.send(trades(symbol, range(1, 26)))
    await sinks.start()
    status = sinks.health.sinks[sink]
    try:
        await until(lambda: len(stored()) >= 25, 60, "the first rows")
        sender = asyncio.create_task(asyncio.to_thread(send_steadily))
        await asyncio.to_thread(restart)
        assert sent[0] < 1200, "the records were all sent before the database came back"
        await until(lambda: status.reachable is True and status.state == "running", 60, "the sink resuming")
        await sender
        await until(lambda: stored() >= expected, 60, "every trade stored")
    finally:
        stop_sending.set()
        await sinks.stop()
    assert stored() == expected
    assert sample("collector_sink_errors_total", sink=sink) > errors_before
    assert status.last_error is not None


async def test_a_postgres_restart_in_the_middle_of_a_run_loses_and_duplicates_nothing(
    broker: EmbeddedBroker, private_postgres: LocalPostgres
) -> None:
    dsn = private_postgres.create_database("outage")
    sinks = sinks_for(
        broker.bootstrap, f"sinks-test-{next(_apps)}", postgres={"dsn": dsn, "types": ["trade"]}
    )
    seen_down: list[list[str]] = []

    def cannot_write() -> list[str]:
        # On a loaded machine the sink can also be reported behind the topics: only this reason counts.
        reasons = sinks.health.reasons(int(time.time() * 1000))
        return [reason for reason in reasons if reason.startswith("sink postgres cannot write")]

    def restart() -> None:
        private_postgres.stop()
        deadline = time.monotonic() + 30
        while not cannot_write() and time.monotonic() < deadline:
            time.sleep(0.1)
        seen_down.append(cannot_write())
        time.sleep(1.5)  # records keep arriving while it is down
        private_postgres.start()

    await _outage_run(
        broker, sinks, "postgres", "SOL/USDT", restart, lambda: set(trade_ids(dsn).get("SOL/USDT", []))
    )
    assert seen_down and seen_down[0], "the outage was never reported as a sink that cannot write"
    assert rows(dsn, "SELECT count(*), count(DISTINCT trade_id) FROM trades WHERE symbol = 'SOL/USDT'") == [
        (1200, 1200)
    ]


async def test_a_redis_restart_in_the_middle_of_a_run_loses_nothing(
    broker: EmbeddedBroker, private_redis: LocalRedis
) -> None:
    sinks = sinks_for(
        broker.bootstrap,
        f"sinks-test-{next(_apps)}",
        redis={"url": private_redis.url, "types": ["trade"], "streamMaxLen": 100_000},
    )

    def restart() -> None:
        private_redis.stop()
        deadline = time.monotonic() + 30
        while sinks.health.sinks["redis"].reachable is not False and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        private_redis.start()

    def streamed() -> set[str]:
        try:
            with redis.Redis.from_url(private_redis.url, socket_timeout=3) as client:
                entries = client.xrange("collector:stream:binance:xrp-usdt")
        except redis.ConnectionError:
            return set()
        return {msgspec.json.decode(fields[b"record"])["data"]["tradeId"] for _, fields in entries}

    await _outage_run(broker, sinks, "redis", "XRP/USDT", restart, streamed)
    with redis.Redis.from_url(private_redis.url) as client:
        latest = client.hget("collector:latest:binance:xrp-usdt", "trade")
    assert latest is not None and msgspec.json.decode(latest)["data"]["tradeId"] == "1200"
