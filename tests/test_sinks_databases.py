"""The sinks' writers against real PostgreSQL and Redis servers (Debian's binaries, tests/servers.py):
schema and migrations, exact values, write rules across batches, refusals, the Redis layout."""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal
from pathlib import Path

import msgspec
import psycopg
import pytest
import redis.asyncio as redis_asyncio

from agents.sinks.pg_tables import MIGRATIONS
from agents.sinks.writers import PostgresWriter, RedisWriter
from streams.records import MarketRecord, encode_record
from tests.test_sinks_rules import T0, bbo, kline, ticker, trade

pytestmark = pytest.mark.e2e  # real database servers


def items(*records: MarketRecord) -> list[tuple[MarketRecord, bytes]]:
    return [(record, encode_record(record)) for record in records]


def query(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(sql).fetchall()


async def test_the_sink_creates_its_schema_once_with_a_version_table(postgres_dsn: str) -> None:
    for _ in range(2):  # a second start (or a second worker) finds it done
        writer = PostgresWriter(postgres_dsn, ["trade", "kline", "ticker", "bbo"])
        await writer.open()
        await writer.close()
    versions = query(postgres_dsn, "SELECT version, description FROM collector_schema_version")
    assert versions == [(m.version, m.description) for m in MIGRATIONS]
    tables = {
        row[0] for row in query(postgres_dsn, "SELECT tablename FROM pg_tables WHERE schemaname='public'")
    }
    assert {"trades", "klines", "tickers", "bbo", "collector_schema_version"} <= tables
    types = dict(
        query(
            postgres_dsn,
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'trades'",
        )
    )
    assert types == {
        "exchange": "text",
        "symbol": "text",
        "trade_id": "text",
        "price": "numeric",
        "quantity": "numeric",
        "side": "text",
        "trade_time": "timestamp with time zone",
        "received_at": "timestamp with time zone",
    }


async def test_every_type_is_stored_exactly_and_replays_change_nothing(postgres_dsn: str) -> None:
    writer = PostgresWriter(postgres_dsn, ["trade", "kline", "ticker", "bbo"])
    batch = items(
        trade("1", "16578.50000000", T0 + 136), trade("2", "0.00000001"), kline(True, T0), ticker(), bbo("77")
    )
    try:
        for _ in range(3):
            result = await writer.write(batch)
            assert result.rejected == []
            assert dict(result.stored) == {"trade": 2, "kline": 1, "ticker": 1, "bbo": 1}
    finally:
        await writer.close()
    trades = query(
        postgres_dsn,
        "SELECT trade_id, price::text, quantity, side, "
        "(extract(epoch from trade_time) * 1000)::bigint FROM trades ORDER BY trade_id",
    )
    assert trades == [
        ("1", "16578.50000000", Decimal("0.25"), "buy", T0 + 136),
        ("2", "0.00000001", Decimal("0.25"), "buy", T0),
    ]
    assert query(postgres_dsn, "SELECT count(*) FROM klines") == [(1,)]
    assert query(postgres_dsn, "SELECT change::text, ask_price FROM tickers") == [("-1.5", None)]
    assert query(postgres_dsn, "SELECT update_id, bid_price::text FROM bbo") == [("77", "99.9")]


async def test_a_closed_kline_is_never_overwritten_by_an_open_one_that_arrives_later(
    postgres_dsn: str,
) -> None:
    writer = PostgresWriter(postgres_dsn, ["kline"])
    try:
        await writer.write(items(kline(False, T0 + 10, "100.1")))
        await writer.write(items(kline(False, T0 + 20, "100.2")))  # a later update of the open bar
        await writer.write(items(kline(False, T0 + 15, "100.15")))  # an older one delivered late
        assert query(postgres_dsn, "SELECT close::text, closed FROM klines") == [("100.2", False)]
        await writer.write(items(kline(True, T0 + 59_999, "100.9")))
        await writer.write(items(kline(False, T0 + 70_000, "555")))  # e.g. a replay, or a late REST bar
        await writer.write(items(kline(True, T0 + 70_000, "666")))  # even a later closed one: final
    finally:
        await writer.close()
    assert query(postgres_dsn, "SELECT close::text, closed FROM klines") == [("100.9", True)]


async def test_a_value_the_database_refuses_costs_only_its_own_row(postgres_dsn: str) -> None:
    """The checks keep such values out; should one get past them, the batch is halved until the
    refused row is alone, and everything else is stored."""
    writer = PostgresWriter(postgres_dsn, ["trade"])
    good = [trade(str(i)) for i in range(10)]
    hostile = trade("bad", price="not-a-number")
    try:
        result = await writer.write(items(*good[:4], hostile, *good[4:]))
    finally:
        await writer.close()
    assert [reason for reason, _ in result.rejected] == ["refused-by-database"]
    assert "numeric" in result.rejected[0][1]
    assert result.stored["trade"] == 10
    assert query(postgres_dsn, "SELECT count(*) FROM trades WHERE trade_id <> 'bad'") == [(10,)]


async def test_redis_keeps_the_latest_by_event_time_publishes_everything_and_trims_its_streams(
    redis_url: str,
) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("market.*")
    await pubsub.get_message(timeout=1)  # the subscription confirmation
    writer = RedisWriter(redis_url, ttl_seconds=600, stream_max_len=5)
    newer, older = trade("9", "109", T0 + 10), trade("8", "108", T0 + 5)
    try:
        await writer.write(items(newer, kline(False, T0 + 1, "100.1")))
        await writer.write(items(older, kline(True, T0 + 59_999, "100.9"), ticker(), bbo()))
        await writer.write(items(kline(False, T0 + 59_999 + 100, "777")))  # an open update after the close
        await writer.write(items(*(trade(str(i), at=T0 - 1000 + i) for i in range(20))))  # all older
    finally:
        await writer.close()
    latest = await client.hgetall("collector:latest:binance:btc-usdt")
    assert set(latest) == {b"trade", b"kline:1m", b"ticker", b"bbo"}
    assert msgspec.json.decode(latest[b"trade"])["data"]["tradeId"] == "9"
    closed = msgspec.json.decode(latest[b"kline:1m"])["data"]
    assert (closed["close"], closed["closed"]) == ("100.9", True)
    assert latest[b"ticker"] == encode_record(ticker())
    published = []
    while (found := await pubsub.get_message(timeout=1)) is not None:
        if found["type"] == "pmessage":
            published.append(found["channel"])
    assert len(published) == 2 + 4 + 1 + 20
    assert published[:2] == [b"market.trade.binance.btc-usdt", b"market.kline.binance.btc-usdt"]
    assert b"market.bbo.binance.btc-usdt" in published
    stream_length = await client.xlen("collector:stream:binance:btc-usdt")
    assert 5 <= stream_length < 27  # MAXLEN ~ trims whole nodes: near 5, never all
    ttl = await client.ttl("collector:latest:binance:btc-usdt")
    assert 0 < ttl <= 600
    await pubsub.aclose()
    await client.aclose()


async def test_redis_refusing_one_symbols_key_costs_only_that_symbols_records(redis_url: str) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    await client.set("collector:latest:binance:eth-usdt", "someone else's string")  # WRONGTYPE for HSET
    writer = RedisWriter(redis_url, ttl_seconds=None, stream_max_len=None)
    eth = msgspec.structs.replace(trade("1"), symbol="ETH/USDT")
    try:
        result = await writer.write(items(trade("1"), eth))
    finally:
        await writer.close()
    assert [reason for reason, _ in result.rejected] == ["refused-by-database"]
    assert result.stored["trade"] == 1
    assert await client.hget("collector:latest:binance:btc-usdt", "trade") == encode_record(trade("1"))
    assert await client.ttl("collector:latest:binance:btc-usdt") == -1  # no ttlSeconds: no expiry
    await client.aclose()


async def test_writers_report_an_unreachable_server_as_an_outage() -> None:
    from agents.embedded_broker import free_port
    from agents.sinks.writers import SinkUnavailable

    port = free_port()
    with pytest.raises(SinkUnavailable):
        await PostgresWriter(f"postgresql://u@127.0.0.1:{port}/db", ["trade"]).write(items(trade()))
    with pytest.raises(SinkUnavailable):
        await asyncio.wait_for(
            RedisWriter(f"redis://127.0.0.1:{port}/0", None, None).write(items(trade())), 30
        )


def readme_block(marker: str) -> str:
    """A ready query of README "Sinks", by its first line (`-- ohlcv-1m`) or the command it starts with."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for block in re.findall(r"```(?:sql|sh)\n(.*?)```", readme, re.S):
        if block.startswith(marker):
            return block
    raise AssertionError(f"README has no block starting with {marker!r}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_the_readme_queries_answer_from_what_the_sinks_stored(
    postgres_dsn: str, redis_url: str
) -> None:
    minute = now_ms() // 60_000 * 60_000 - 120_000  # two minutes ago, on the minute
    stored = [
        trade("1", "10.5", minute + 1000),
        trade("2", "12", minute + 2000),
        trade("3", "9.25", minute + 3000),
        trade("4", "11", minute + 59_000),  # the first minute: open 10.5, high 12, low 9.25, close 11
        trade("7", "13", minute + 61_000),  # the next minute; ids 5 and 6 are missing
        trade("9", "14", minute + 62_000),  # and 8
    ]
    writer = PostgresWriter(postgres_dsn, ["trade"])
    try:
        await writer.write(items(*stored))
    finally:
        await writer.close()
    ohlcv = query(postgres_dsn, readme_block("-- ohlcv-1m"))
    assert [row[3:] for row in ohlcv] == [
        (Decimal("10.5"), Decimal("12"), Decimal("9.25"), Decimal("11"), Decimal("1.00"), 4),
        (Decimal("13"), Decimal("14"), Decimal("13"), Decimal("14"), Decimal("0.50"), 2),
    ]
    assert ohlcv[0][:2] == ("binance", "BTC/USDT")
    missing = query(postgres_dsn, readme_block("-- missing-trade-ids"))
    assert missing == [("binance", "BTC/USDT", 5, 6, 2), ("binance", "BTC/USDT", 8, 8, 1)]

    redis_writer = RedisWriter(redis_url, None, None)
    eth = msgspec.structs.replace(trade("5", "2500.25"), symbol="ETH/USDT")
    try:
        await redis_writer.write(items(*stored, eth))
    finally:
        await redis_writer.close()
    command = readme_block("redis-cli EVAL")
    script = re.match(r'redis-cli EVAL "(.*)" 0\s*$', command, re.S)
    assert script is not None
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        prices = sorted(await client.eval(script[1], 0))
    finally:
        await client.aclose()
    assert prices == [b"binance:btc-usdt 14", b"binance:eth-usdt 2500.25"]
