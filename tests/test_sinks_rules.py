"""The sinks' pure rules: what they accept, how a batch becomes rows and script calls, which record is
"latest", which offsets a batch commits, the config section, and what health says. No sockets."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import yaml

from agents.sinks import build_sinks, sink_group
from agents.sinks.batch import SinkMessage, market_pattern, merge_offsets, next_offsets, oldest_timestamp
from agents.sinks.checks import Rejected, check_record, is_decimal, read_record, topic_type
from agents.sinks.health import SinkHealth, SinkStatus, redact
from agents.sinks.pg_tables import (
    MIGRATIONS,
    TABLES,
    Migration,
    copy_text,
    hypertable_statements,
    pending_migrations,
    rows_by_table,
    split_lanes,
)
from agents.sinks.redis_latest import (
    latest_field,
    latest_key,
    latest_rank,
    newest,
    plan_writes,
    rank_key,
    stream_key,
)
from agents.sinks.service import BACKOFF_MAX, backoff_seconds
from streams.config import ConfigError, load_config, parse_config
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade, encode_record

T0 = 1_700_000_000_000


def trade(trade_id: str = "1", price: str = "100.5", at: int = T0, **fields: object) -> MarketRecord:
    data = Trade(price=price, quantity="0.25", side="buy", trade_id=trade_id, trade_time=at)
    record = MarketRecord("binance", "BTC/USDT", "trade", at, at + 3, data)
    return msgspec.structs.replace(record, **fields) if fields else record


def kline(closed: bool, at: int, close: str = "101", start: int = T0, interval: str = "1m") -> MarketRecord:
    data = Kline(
        interval=interval,
        start_time=start,
        end_time=start + 59_999,
        open="100",
        high="102",
        low="99",
        close=close,
        volume="3",
        quote_volume="300",
        trades=7,
        closed=closed,
    )
    return MarketRecord("binance", "BTC/USDT", "kline", at, at + 2, data)


def ticker(change: str = "-1.5", at: int = T0) -> MarketRecord:
    data = Ticker(
        last="100",
        open="101.5",
        high="103",
        low="99",
        volume="10",
        quote_volume="1000",
        change=change,
        change_percent="-1.47",
        bid_price="99.9",
        bid_quantity="1",
    )
    return MarketRecord("binance", "BTC/USDT", "ticker", at, at + 1, data)


def bbo(update_id: str = "77", at: int = T0, bid: str = "99.9") -> MarketRecord:
    data = Bbo(bid_price=bid, bid_quantity="1", ask_price="100.1", ask_quantity="2", update_id=update_id)
    return MarketRecord("binance", "BTC/USDT", "bbo", at, at, data)


# ---- what a sink accepts ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "1", "16578.50", "0.00000001", "1.", ".5", "1" * 64])
def test_plain_decimals_are_accepted(text: str) -> None:
    assert is_decimal(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "-1",
        "+1",
        "1e5",
        "1E-8",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "1.2.3",
        " 1",
        "1 ",
        "0x10",
        "١٢",
        "1,5",
        "1" * 65,
        "1\x00",
    ],
)
def test_anything_else_is_not_a_decimal(text: str) -> None:
    assert not is_decimal(text)


def test_only_signed_fields_take_a_minus() -> None:
    assert is_decimal("-1.5", signed=True)
    assert not is_decimal("--1.5", signed=True)
    assert not is_decimal("-", signed=True)
    assert check_record(ticker(change="-1.5")) is None
    assert check_record(ticker(change="-1e3")) == Rejected("not-a-decimal", "change '-1e3'")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (trade(price="1e308"), "not-a-decimal"),
        (trade(price="NaN"), "not-a-decimal"),
        (trade(price="-5"), "not-a-decimal"),
        (trade(trade_id="7\x00"), "bad-text"),
        (trade(trade_id=""), "bad-text"),
        (trade(exchange="bin\x00ance"), "bad-text"),
        (trade(symbol="X" * 200), "bad-text"),
        (trade(timestamp=-1), "bad-time"),
        (trade(received_at=10**16), "bad-time"),
        (trade(at=10**18), "bad-time"),
        (
            MarketRecord(
                "binance",
                "BTC/USDT",
                "kline",
                T0,
                T0,
                msgspec.structs.replace(kline(True, T0).data, trades=-1),
            ),
            "bad-count",
        ),
        (bbo(bid="Infinity"), "not-a-decimal"),
    ],
)
def test_hostile_values_are_rejected_with_a_reason(record: MarketRecord, reason: str) -> None:
    rejected = check_record(record)
    assert rejected is not None and rejected.reason == reason


def test_good_records_of_every_type_pass() -> None:
    for record in (trade(), kline(True, T0), ticker(), bbo()):
        assert check_record(record) is None


def test_reading_a_topic_record_decodes_checks_and_matches_the_topic() -> None:
    topic = "market.trade.binance.btc-usdt"
    assert read_record(topic, encode_record(trade())) == trade()
    assert read_record(topic, b"{not json").reason == "undecodable"  # type: ignore[union-attr]
    assert read_record(topic, None).reason == "undecodable"  # type: ignore[union-attr]
    assert read_record(topic, b'{"exchange": 1}').reason == "undecodable"  # type: ignore[union-attr]
    assert read_record("market.bbo.binance.btc-usdt", encode_record(trade())).reason == "wrong-topic"  # type: ignore[union-attr]
    assert read_record(topic, encode_record(trade(price="1e5"))).reason == "not-a-decimal"  # type: ignore[union-attr]
    assert topic_type("market.kline.upbit.btc-krw") == "kline"
    assert topic_type("raw.binance") == ""


# ---- PostgreSQL rows -------------------------------------------------------------------------------


def test_a_batch_keeps_one_row_per_trade_id_the_first() -> None:
    rows = rows_by_table([trade("1", "10"), trade("2", "11"), trade("1", "99")])
    assert [(row[2], row[3]) for row in rows["trade"]] == [("1", "10"), ("2", "11")]


def test_a_closed_kline_in_a_batch_beats_a_later_open_update_of_its_bar() -> None:
    rows = rows_by_table(
        [kline(False, T0 + 1, "100.1"), kline(True, T0 + 2, "100.2"), kline(False, T0 + 3, "100.3")]
    )
    (row,) = rows["kline"]
    assert (row[8], row[12]) == ("100.2", "t")  # close, closed


def test_between_open_updates_the_later_event_wins_not_the_later_arrival() -> None:
    rows = rows_by_table([kline(False, T0 + 5, "105"), kline(False, T0 + 4, "104")])
    assert rows["kline"][0][8] == "105"
    other_bar = rows_by_table([kline(False, T0, start=T0), kline(False, T0, start=T0 + 60_000)])
    assert len(other_bar["kline"]) == 2


def test_rows_carry_exact_strings_and_epoch_milliseconds() -> None:
    (row,) = rows_by_table([trade("5", "16578.50000000")])["trade"]
    assert row == ("binance", "BTC/USDT", "5", "16578.50000000", "0.25", "buy", str(T0), str(T0 + 3))
    (ticker_row,) = rows_by_table([ticker()])["ticker"]
    assert ticker_row[-3:] == (None, None, str(T0 + 1))  # no ask side: NULL


def test_lanes_split_a_batch_by_symbol_so_no_two_transactions_share_a_row() -> None:
    records = [msgspec.structs.replace(trade(str(i)), symbol=f"S{i % 7}/USDT") for i in range(70)]
    lanes = split_lanes(records, 2)
    assert sum(map(len, lanes)) == 70
    symbols = [{r.symbol for r in lane} for lane in lanes]
    assert not symbols[0] & symbols[1]
    assert all(symbols)  # seven symbols spread over both lanes
    assert split_lanes(records, 1) == [records]


def test_copy_text_escapes_what_copy_would_misread_and_writes_null() -> None:
    text = copy_text([("a\tb", "c\\d", "e\nf", None, "g\rh"), ("1", "2", "3", "4", "5")])
    assert text == b"a\\tb\tc\\\\d\te\\nf\t\\N\tg\\rh\n1\t2\t3\t4\t5\n"
    assert copy_text([]) == b""


def test_the_write_rules_are_insert_if_absent_and_closed_klines_are_final() -> None:
    assert TABLES["trade"].insert_statement().endswith("ON CONFLICT (exchange, symbol, trade_id) DO NOTHING")
    assert "ON CONFLICT (exchange, symbol, event_time) DO NOTHING" in TABLES["ticker"].insert_statement()
    assert "ON CONFLICT (exchange, symbol, update_id) DO NOTHING" in TABLES["bbo"].insert_statement()
    kline_sql = TABLES["kline"].insert_statement()
    assert 'ON CONFLICT (exchange, symbol, "interval", start_time) DO UPDATE' in kline_sql
    assert kline_sql.endswith(
        "WHERE NOT klines.closed AND (EXCLUDED.closed OR EXCLUDED.event_time >= klines.event_time)"
    )
    for spec in TABLES.values():  # staging columns line up with the rows and the select list
        assert len(spec.stage) == len(
            spec.row(
                {"trade": trade(), "kline": kline(True, T0), "ticker": ticker(), "bbo": bbo()}[spec.kind]
            )
        )
        assert len(spec.columns) == len(spec.select)
        assert "ON COMMIT DELETE ROWS" in spec.create_stage()


def test_the_schema_has_the_issue_tables_and_keys() -> None:
    created = " ".join(MIGRATIONS[0].statements)
    for table, key in {
        "trades": "(exchange, symbol, trade_id)",
        "klines": '(exchange, symbol, "interval", start_time)',
        "tickers": "(exchange, symbol, event_time)",
        "bbo": "(exchange, symbol, update_id)",
    }.items():
        assert re.search(
            rf"CREATE TABLE IF NOT EXISTS {table} \(.*PRIMARY KEY {re.escape(key)}", created, re.S
        )
    assert "price numeric NOT NULL, quantity numeric NOT NULL" in created


def test_migrations_run_in_version_order_from_the_current_one() -> None:
    two = Migration(2, "b", ("SELECT 2",))
    one = Migration(1, "a", ("SELECT 1",))
    assert pending_migrations(0, [two, one]) == [one, two]
    assert pending_migrations(1, [two, one]) == [two]
    assert pending_migrations(2, [two, one]) == []


def test_hypertables_only_where_timescaledb_is_installed_and_only_time_keyed_tables() -> None:
    assert hypertable_statements(False) == []
    statements = hypertable_statements(True)
    assert any("'klines', 'start_time'" in s for s in statements)
    assert any("'tickers', 'event_time'" in s for s in statements)
    assert not any("trades" in s or "'bbo'" in s for s in statements)


# ---- Redis latest ----------------------------------------------------------------------------------


def test_keys_and_fields_follow_the_contract() -> None:
    assert latest_key("binance", "BTC/USDT") == "collector:latest:binance:btc-usdt"
    assert rank_key("upbit", "BTC/KRW") == "collector:latest-rank:upbit:btc-krw"
    assert stream_key("binance", "ETH/USDT") == "collector:stream:binance:eth-usdt"
    assert [latest_field(r) for r in (trade(), kline(True, T0, interval="5m"), ticker(), bbo())] == [
        "trade",
        "kline:5m",
        "ticker",
        "bbo",
    ]


def test_latest_is_by_event_time_never_by_arrival() -> None:
    late_arrival = trade("9", at=T0 + 10)
    older = trade("8", at=T0 + 5)
    ranked = [(latest_rank(r), r.data.trade_id.encode()) for r in (late_arrival, older)]  # type: ignore[union-attr]
    assert newest(ranked) == b"9"
    same_ms = [(latest_rank(trade(i, at=T0)), i.encode()) for i in ("12", "11")]
    assert newest(same_ms) == b"12"  # within a millisecond, the higher trade id


def test_a_closed_kline_stays_latest_when_an_open_update_of_its_bar_arrives_later() -> None:
    closed, late_open = kline(True, T0 + 59_000), kline(False, T0 + 59_500)
    assert latest_rank(closed) > latest_rank(late_open)
    next_bar = kline(False, T0 + 60_001, start=T0 + 60_000)
    assert latest_rank(next_bar) > latest_rank(closed)


def test_numeric_ids_too_big_for_lua_do_not_break_ties() -> None:
    assert latest_rank(trade("9" * 17)) == (T0, 0)
    assert latest_rank(bbo("1700000000123456")) == (T0, 1_700_000_000_123_456)
    assert latest_rank(bbo("abc")) == (T0, 0)


def test_a_batch_becomes_one_script_call_per_symbol_in_arrival_order() -> None:
    eth = msgspec.structs.replace(trade("3"), symbol="ETH/USDT")
    items = [(trade("1"), b"t1"), (eth, b"e3"), (kline(True, T0), b"k"), (trade("2"), b"t2")]
    writes = plan_writes(items, ttl_seconds=60, stream_max_len=None)
    assert [(w.symbol, w.records) for w in writes] == [("BTC/USDT", 3), ("ETH/USDT", 1)]
    btc = writes[0]
    assert btc.keys == [
        "collector:latest:binance:btc-usdt",
        "collector:latest-rank:binance:btc-usdt",
        "collector:stream:binance:btc-usdt",
    ]
    ttl, max_len, suffix, fields, *payloads = btc.args
    assert (ttl, max_len, suffix) == ("60", "0", ".binance.btc-usdt")
    closed_rank = str(2**43 + T0)
    assert msgspec.json.decode(fields) == [
        ["trade", str(T0), "1"],
        ["kline:1m", str(T0), closed_rank],
        ["trade", str(T0), "2"],
    ]
    assert payloads == [b"t1", b"k", b"t2"]
    assert btc.types() == {"trade": 2, "kline": 1}


# ---- offsets, pattern, backoff -----------------------------------------------------------------------


def message(topic: str, partition: int, offset: int, timestamp: int = T0) -> SinkMessage:
    return SinkMessage(topic, partition, offset, timestamp, b"")


def test_a_stored_batch_commits_the_offset_after_its_highest_record_per_partition() -> None:
    batch = [message("a", 0, 5), message("a", 0, 7), message("a", 0, 6), message("b", 0, 0)]
    assert next_offsets(batch) == {("a", 0): 8, ("b", 0): 1}
    assert merge_offsets({("a", 0): 9, ("c", 0): 2}, {("a", 0): 8, ("b", 0): 1}) == {
        ("a", 0): 9,
        ("b", 0): 1,
        ("c", 0): 2,
    }
    assert (
        oldest_timestamp([message("a", 0, 1, T0 + 5), message("a", 0, 2, T0), message("a", 0, 3, -1)]) == T0
    )


def test_the_pattern_takes_only_the_market_topics_of_the_stored_types() -> None:
    pattern = re.compile(market_pattern(["trade", "kline"]))
    assert pattern.match("market.trade.binance.btc-usdt")
    assert pattern.match("market.kline.upbit.btc-krw")
    assert not pattern.match("market.ticker.binance.btc-usdt")
    assert not pattern.match("market.depth.binance.btc-usdt")
    assert not pattern.match("raw.binance")
    assert not pattern.match("xmarket.trade.binance.btc-usdt")


def test_backoff_doubles_up_to_its_ceiling_with_jitter() -> None:
    assert backoff_seconds(1, 1.0) == 0.5
    assert backoff_seconds(2, 1.0) == 1.0
    assert backoff_seconds(1, 0.0) == 0.25
    assert backoff_seconds(30, 1.0) == BACKOFF_MAX
    assert backoff_seconds(30, 0.0) == BACKOFF_MAX / 2


# ---- health ----------------------------------------------------------------------------------------


def test_lag_is_the_age_of_what_waits_and_zero_once_caught_up() -> None:
    status = SinkStatus("postgres", "postgresql://x", "g")
    assert status.lag_seconds(T0) == 0
    status.read(T0)
    status.read(T0 + 500)  # a later batch while the first still waits: the oldest counts
    assert status.lag_seconds(T0 + 3000) == 3.0
    status.stored({"trade": 2}, T0 + 4000)
    assert status.lag_seconds(T0 + 9000) == 4.0  # what the last batch took
    status.caught_up()
    assert status.lag_seconds(T0 + 9000) == 0
    assert status.rows == {"trade": 2}


def test_health_names_an_unreachable_sink_and_one_that_falls_behind() -> None:
    health = SinkHealth(behind_after_seconds=10)
    postgres = health.add(SinkStatus("postgres", "postgresql://u@h/db", "g-postgres"))
    redis = health.add(SinkStatus("redis", "redis://h", "g-redis"))
    assert health.reasons(T0) == []
    postgres.failed("OperationalError: connection refused", T0)
    redis.read(T0 - 30_000)
    reasons = health.reasons(T0)
    assert reasons == [
        "sink postgres cannot write to postgresql://u@h/db: OperationalError: connection refused",
        "sink redis is 30 s behind the market topics",
    ]
    report = health.report(T0)
    assert report["postgres"]["reachable"] is False
    assert report["postgres"]["state"] == "paused"
    assert report["redis"]["lagSeconds"] == 30.0
    postgres.stored({}, T0 + 1)
    assert health.report(T0)["postgres"]["reachable"] is True


def test_addresses_lose_their_passwords() -> None:
    assert redact("postgresql://user:s3cret@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert redact("host=db password=s3cret user=u") == "host=db password=*** user=u"
    assert redact("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"


# ---- configuration ---------------------------------------------------------------------------------

BASE = {
    "exchanges": {
        "binance": {
            "wsEndpoint": "ws://127.0.0.1:1",
            "restEndpoint": "http://127.0.0.1:1",
            "symbols": ["BTC/USDT"],
            "dataTypes": ["trade"],
        }
    },
    "kafka": {"brokers": ["127.0.0.1:9092"]},
}


def test_sinks_are_optional_and_take_their_defaults() -> None:
    assert parse_config(BASE).sinks.postgres is None
    config = parse_config(
        {
            **BASE,
            "sinks": {
                "postgres": {"dsn": "postgresql://u@h/db"},
                "redis": {"url": "redis://h:6379/0", "streamMaxLen": 1000},
            },
        }
    )
    assert config.sinks.postgres is not None and config.sinks.redis is not None
    assert config.sinks.postgres.types == ["trade", "kline", "ticker", "bbo"]
    assert (config.sinks.postgres.batchRows, config.sinks.postgres.batchMs) == (10_000, 500)
    assert (config.sinks.redis.streamMaxLen, config.sinks.redis.ttlSeconds) == (1000, None)


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        ({"postgres": {"dsn": "postgresql://h/db", "batchrows": 5}}, "sinks.postgres.batchrows: unknown key"),
        ({"postgres": {}}, "sinks.postgres.dsn: required: write it here or set COLLECTOR_POSTGRES_DSN"),
        ({"postgres": {"dsn": "mysql://h"}}, "sinks.postgres.dsn: must be a postgresql:// URL"),
        ({"postgres": {"dsn": "postgresql://h", "types": ["depth"]}}, "sinks.postgres.types.0"),
        ({"postgres": {"dsn": "postgresql://h", "batchMs": 0}}, "sinks.postgres.batchMs"),
        ({"redis": {"url": "http://h"}}, "sinks.redis.url: must be a redis://"),
        (
            {"redis": {"url": "redis://h", "types": ["trade", "trade"]}},
            "sinks.redis.types: types are listed twice",
        ),
        ({"redis": {"url": "redis://h", "streamMaxLen": 0}}, "sinks.redis.streamMaxLen"),
        ({"kafka": {}}, "sinks.kafka: unknown key"),
    ],
)
def test_bad_sink_settings_are_refused_by_key(sinks: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**BASE, "sinks": sinks})


def test_the_environment_supplies_the_addresses(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({**BASE, "sinks": {"postgres": {"dsn": "postgresql://file/db", "batchMs": 50}}})
    )
    config = load_config(
        {
            "COLLECTOR_CONFIG": str(path),
            "COLLECTOR_POSTGRES_DSN": "postgresql://env:pw@h/db",
            "COLLECTOR_REDIS_URL": "redis://env:6379/1",
        }
    )
    assert config.sinks.postgres is not None and config.sinks.postgres.dsn == "postgresql://env:pw@h/db"
    assert config.sinks.postgres.batchMs == 50  # the file's other settings stay
    assert config.sinks.redis is not None and config.sinks.redis.url == "redis://env:6379/1"
    assert load_config({"COLLECTOR_CONFIG": str(path)}).sinks.redis is None


def test_building_the_sinks_makes_one_service_per_configured_sink_in_its_own_group() -> None:
    config = parse_config(
        {
            **BASE,
            "sinks": {
                "postgres": {"dsn": "postgresql://u:pw@h/db", "types": ["trade"]},
                "redis": {"url": "redis://h"},
            },
        }
    )
    sinks = build_sinks(config, ["127.0.0.1:9092"], "exchange-collector")  # builds, connects nothing
    assert [s.consumer.group_id for s in sinks.services] == [
        "exchange-collector-sinks-postgres",
        "exchange-collector-sinks-redis",
    ]
    assert sinks.services[0].consumer.pattern == market_pattern(["trade"])
    assert sinks.health.report(T0)["postgres"]["target"] == "postgresql://u:***@h/db"
    assert sink_group("x", "redis") == "x-sinks-redis"
    assert build_sinks(parse_config(BASE), ["127.0.0.1:9092"], "x").services == []
