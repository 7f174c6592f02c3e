"""Reads market records back as they are appended, with confluent-kafka, cheaply enough not to be
the bottleneck: librdkafka fetches in its own threads, Python only decodes a few fields per record.

Latency is measured two ways, because the embedded broker (Tansu) ignores
`message.timestamp.type=LogAppendTime` and returns the producer's CreateTime:
- receipt → CreateTime: the producer stamps the record when the writer hands it over (produce call);
- receipt → read back: when this reader got it, an upper bound on the append time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


class _TradeData(msgspec.Struct):
    tradeId: str


class _Record(msgspec.Struct):
    symbol: str
    timestamp: int
    receivedAt: int
    data: _TradeData


_decode = msgspec.json.Decoder(_Record).decode


@dataclass
class Sample:
    """Per-record times in epoch ms: exchange event, frame receipt, producer stamp, read back."""

    event: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    created: list[int] = field(default_factory=list)
    read: list[int] = field(default_factory=list)


def create_topics(bootstrap: str, topics: list[str]) -> None:
    """Create the market topics up front (one partition, as the collector does) so reading can
    start from offset 0 before the first record, and topic creation stays out of the measurement."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for start in range(0, len(topics), 200):
        futures = admin.create_topics([NewTopic(t, 1, 1) for t in topics[start : start + 200]])
        for future in futures.values():
            try:
                future.result(timeout=30)
            except KafkaException as exc:  # the worker may have created it first: fine
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise


class MarketReader:
    def __init__(
        self, bootstrap: str, topics: list[str], start_paused: bool = False, fetch_wait_ms: int = 5
    ) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                # Short for the live reader's latency figure. Reading 1,000 partitions back with a 5 ms
                # wait took the embedded broker 18 s per 150 k records, 1 s with 100 ms.
                "fetch.wait.max.ms": fetch_wait_ms,
                "fetch.min.bytes": 1,
                "queued.max.messages.kbytes": 262144,
            }
        )
        self.partitions = [TopicPartition(topic, 0, 0) for topic in topics]
        self.paused = start_paused
        if not start_paused:
            self.consumer.assign(self.partitions)
        self.records = 0
        self.errors = 0
        self.trade_ids: set[tuple[str, str]] = set()
        self.sample = Sample()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.consumer.assign(self.partitions)

    def poll(self, seconds: float) -> int:
        """Read for `seconds`; returns the number of records read."""
        deadline = time.monotonic() + seconds
        count = 0
        consume, sample, ids = self.consumer.consume, self.sample, self.trade_ids
        while time.monotonic() < deadline:
            messages = consume(num_messages=20000, timeout=0.05)
            read_ms = time.time_ns() // 1_000_000
            for message in messages:
                if message.error():
                    self.errors += 1
                    continue
                record = _decode(message.value() or b"")
                ids.add((record.symbol, record.data.tradeId))
                sample.event.append(record.timestamp)
                sample.received.append(record.receivedAt)
                sample.created.append(message.timestamp()[1])
                sample.read.append(read_ms)
            count += len(messages)
        self.records += count
        return count

    def read_to_end(self, within: float, progress: float = 30.0) -> list[tuple[str, int, int]]:
        """Read every partition up to the end it had when called, for at most `within` seconds; returns
        the partitions left short as (topic, position, end). Ends are asked of the broker rather than
        guessed from a quiet spell: a slow broker pauses between fetches without being done."""
        self.resume()
        ends = {tp.topic: self.consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in self.partitions}
        started = time.monotonic()
        reported = started
        short: list[tuple[str, int, int]] = []
        while time.monotonic() - started < within:
            self.poll(1.0)
            positions = self.consumer.position(self.partitions)
            short = [(tp.topic, tp.offset, ends[tp.topic]) for tp in positions if tp.offset < ends[tp.topic]]
            if not short:
                return []
            if time.monotonic() - reported >= progress:
                reported = time.monotonic()
                left = sum(end - max(offset, 0) for _, offset, end in short)
                print(f"read {self.records:,}; {left:,} left in {len(short)} partitions", flush=True)
        return short

    def close(self) -> None:
        self.consumer.close()
