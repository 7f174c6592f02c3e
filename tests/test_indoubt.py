"""Matching records in doubt (their produce request was taken back while the broker was silent)
against what their partitions hold (agents/indoubt.py). The read from a real paused broker is tested
in tests/test_writer.py."""

from __future__ import annotations

from agents.indoubt import still_missing

T = "market.trade.binance.btc-usdt"


def record(
    value: bytes, partition: int = 0, key: bytes = b"BTC/USDT", topic: str = T
) -> tuple[str, int, bytes, bytes]:
    return topic, partition, key, value


def test_records_found_on_their_partition_are_not_missing_and_the_rest_keep_their_order() -> None:
    in_doubt = [record(b"1"), record(b"2"), record(b"3"), record(b"4")]
    read = [record(b"0"), record(b"2"), record(b"4"), record(b"5")]
    assert still_missing(in_doubt, read) == [record(b"1"), record(b"3")]


def test_each_record_read_accounts_for_one_record_in_doubt() -> None:
    # The same bytes twice in doubt, once on the partition: one of them is still missing.
    assert still_missing([record(b"x"), record(b"x")], [record(b"x")]) == [record(b"x")]
    assert still_missing([record(b"x")], [record(b"x"), record(b"x")]) == []


def test_a_record_counts_only_on_its_own_topic_partition_and_key() -> None:
    in_doubt = [record(b"v")]
    elsewhere = [
        record(b"v", partition=1),
        record(b"v", key=b"ETH/USDT"),
        record(b"v", topic="market.trade.x"),
    ]
    assert still_missing(in_doubt, elsewhere) == in_doubt
    assert still_missing(in_doubt, []) == in_doubt
