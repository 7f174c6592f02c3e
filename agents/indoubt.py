"""Records a produce request may or may not have written, looked up on their topics.

A broker that stops answering (paused, a long GC, a frozen VM) keeps the requests it was sent in its
socket and writes them when it wakes up. librdkafka gives each produce attempt at most 5 minutes
(socket.timeout.ms) and then sends it again, so a longer pause writes the records twice unless the
producer is idempotent, which the embedded broker makes too costly for the market producer
(docs/benchmarks.md). So the market producer takes those requests back before they time out (a
purge): their records are in doubt, and once the broker answers they are read back from their
partitions. What is there is not sent again; what is not is.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

InDoubt = tuple[str, int, bytes, bytes]  # topic, partition, key, value
Partition = tuple[str, int]
# Where a partition is read from when no record of it was acknowledged before: this many records
# before its end. The embedded broker's end offset can be short of the real one by up to a batch,
# which only makes the read start earlier.
READ_BACK_TAIL = 10_000


def still_missing(in_doubt: list[InDoubt], read: Iterable[InDoubt]) -> list[InDoubt]:
    """The in-doubt records not among those read back, in their order. Each record read accounts for
    one in-doubt record with the same partition, key and value."""
    found = Counter(read)
    missing = []
    for record in in_doubt:
        if found[record]:
            found[record] -= 1
        else:
            missing.append(record)
    return missing


def read_back(
    bootstrap: str, starts: Mapping[Partition, int | None], timeout: float, **settings: object
) -> list[InDoubt]:
    """Every record of the partitions from their start offsets (None: READ_BACK_TAIL records before
    the end) to their ends. Raises TimeoutError if they cannot all be read within `timeout`."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "exchange-collector-in-doubt",  # assigned partitions only: nothing is committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **settings,
        }
    )
    deadline = time.monotonic() + timeout
    try:
        assignment = []
        for (topic, partition), start in starts.items():
            if start is None:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=max(deadline - time.monotonic(), 0.1)
                )
                start = max(low, high - READ_BACK_TAIL) if high >= 0 else OFFSET_BEGINNING
            assignment.append(TopicPartition(topic, partition, start))
        consumer.assign(assignment)
        unread = set(starts)
        found: list[InDoubt] = []
        while unread:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(unread)} back within {timeout:.0f} s")
            for message in consumer.consume(num_messages=10_000, timeout=0.5):
                where = (message.topic() or "", message.partition() or 0)
                error = message.error()
                if error is None:
                    found.append((*where, message.key() or b"", message.value() or b""))
                elif error.code() == KafkaError._PARTITION_EOF:
                    unread.discard(where)
        return found
    finally:
        consumer.close()
