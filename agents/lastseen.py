"""The last trade id already published per symbol, read from the end of its market topic.

This is how "last id seen" survives a group moving to another worker (or a worker restart): the
market topic is the record of what was published, so whoever starts a group, or takes over a raw
partition, reads its last record instead of trusting memory. Market topics have one partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams.records import Trade, decode_record
from streams.topics import market_topic

log = logging.getLogger(__name__)

READ_TIMEOUT_MS = 5000
QUIET_MS = 200


async def last_trade_ids(
    bootstrap: Iterable[str],
    exchange: str,
    symbols: Iterable[str],
    position: Callable[[Trade], int] | None = None,
) -> dict[str, int]:
    """symbol → highest trade position in `market.trade.<exchange>.<symbol>` (absent: no trades).

    The position is the trade id where ids increase; adapters whose ids are only unique (Bithumb)
    pass `position`, their own measure of where a trade stands in the symbol's history.
    """
    wanted = {market_topic("trade", exchange, symbol): symbol for symbol in symbols}
    if not wanted:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=list(bootstrap),
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_uncommitted",
        request_timeout_ms=10_000,
    )
    found: dict[str, int] = {}
    try:
        await consumer.start()
        existing = await consumer.topics()
        partitions = [TopicPartition(topic, 0) for topic in wanted if topic in existing]
        if not partitions:
            return {}
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > 0}
        for tp in pending:
            # From one before the end offset, read whatever is there: the embedded broker reports the
            # end offset of the last *batch*, so "end - 1" can be the start of several records.
            consumer.seek(tp, ends[tp] - 1)
        deadline = time.monotonic() + READ_TIMEOUT_MS / 1000
        answered: set[TopicPartition] = set()
        extra_polls = 1  # once every topic answered, one more poll picks up the rest of its last batch
        while pending and time.monotonic() < deadline and extra_polls >= 0:
            batches = await consumer.getmany(*pending, timeout_ms=QUIET_MS, max_records=10_000)
            for tp, messages in batches.items():
                answered.add(tp)
                symbol = wanted[tp.topic]
                for message in messages:
                    trade_id = _trade_position(message.value, position)
                    if trade_id is not None and trade_id > found.get(symbol, -1):
                        found[symbol] = trade_id
            if answered >= pending:
                extra_polls -= 1
        if not answered >= pending:
            log.warning("could not read the last trade of %d market topics", len(pending - answered))
    except KafkaError as exc:  # an I/O boundary: without the ids, recovery starts from live data
        log.warning("reading last trade ids failed: %r", exc)
    finally:
        await consumer.stop()
    return found


def _trade_position(value: bytes | None, position: Callable[[Trade], int] | None) -> int | None:
    if value is None:
        return None
    try:
        record = decode_record(value)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
        log.warning("the last record of a market topic is unreadable; backfill starts from live data")
        return None
    if not isinstance(record.data, Trade):
        return None
    if position is not None:
        return position(record.data)
    return int(record.data.trade_id) if record.data.trade_id.isdigit() else None
