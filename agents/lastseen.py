"""What each symbol's trade topic already holds: where the continuity engine continues from.

The market topic is the record of what was published, so whoever starts normalizing a raw partition
(a worker starting, or taking over after a rebalance) reads the end of each symbol's trade topic
instead of trusting memory: the last trade (id, position, price, time) and, where ids are only unique,
the ids of the last few hundred trades, to tell repeats from new trades. Market topics have one
partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agents.consumer_stop import stop_consumer
from streams.continuity import Seed
from streams.records import MarketRecord, Trade, decode_record
from streams.topics import market_topic

log = logging.getLogger(__name__)

READ_TIMEOUT_MS = 10_000
QUIET_MS = 200
RECENT_TRADES = 600  # more than one history page of the exchanges that page backwards


async def read_seeds(
    bootstrap: Iterable[str],
    exchange: str,
    symbols: Iterable[str],
    recent: int = 1,
    position: Callable[[Trade], int] | None = None,
) -> dict[str, Seed]:
    """symbol → Seed from the last `recent` records of `market.trade.<exchange>.<symbol>` (absent: no
    trades). `position` orders trades where ids are only unique (the adapter's `trade_position`)."""
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
    tails: dict[str, list[MarketRecord]] = {}
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
            # The embedded broker reports the end offset of the last *batch*, so reading from
            # `end - recent` on, until nothing more comes, also picks up the rest of that batch.
            consumer.seek(tp, max(0, ends[tp] - recent))
        deadline = time.monotonic() + READ_TIMEOUT_MS / 1000
        answered: set[TopicPartition] = set()
        extra_polls = 1  # once every topic answered, one more poll picks up the rest of its last batch
        while pending and time.monotonic() < deadline and extra_polls >= 0:
            batches = await consumer.getmany(*pending, timeout_ms=QUIET_MS, max_records=10_000)
            for tp, messages in batches.items():
                answered.add(tp)
                tail = tails.setdefault(wanted[tp.topic], [])
                tail += (record for record in map(_trade_record, messages) if record is not None)
                del tail[:-recent]
            if answered >= pending:
                extra_polls -= 1
        if not answered >= pending:
            log.warning("could not read the last trades of %d market topics", len(pending - answered))
    except KafkaError as exc:  # an I/O boundary: without seeds, each symbol starts from live data
        log.warning("reading the market topics' last trades failed: %r", exc)
    finally:
        await stop_consumer(consumer, "last trades")
    return {symbol: seed_of(tail, position) for symbol, tail in tails.items() if tail}


def seed_of(tail: list[MarketRecord], position: Callable[[Trade], int] | None) -> Seed:
    trades = [record.data for record in tail if isinstance(record.data, Trade)]
    last = max(trades, key=position) if position is not None else trades[-1]
    return Seed(
        last_id=int(last.trade_id) if last.trade_id.isdigit() else None,
        last_position=position(last) if position is not None else None,
        last_price=last.price,
        last_time=last.trade_time,
        recent_ids=tuple(trade.trade_id for trade in trades),
        recent_from=min(map(position, trades)) if position is not None else None,
    )


def _trade_record(message: object) -> MarketRecord | None:
    value = getattr(message, "value", None)
    if value is None:
        return None
    try:
        record = decode_record(value)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
        log.warning("a record of a market topic is unreadable; it is not a starting point")
        return None
    return record if isinstance(record.data, Trade) else None
