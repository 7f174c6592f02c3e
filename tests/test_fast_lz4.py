"""Market batches are LZ4-compressed at the fast level, not aiokafka's LZ4HC, and still read back."""

from __future__ import annotations

import cramjam
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from agents.aiokafka_delivery import AiokafkaDelivery, fast_lz4

LZ4, NONE = 3, 0
HEADER = 61  # a v2 record batch's header; the (compressed) records follow it
RECORDS = [
    (f"BTCUSDT-{n}".encode(), b'{"e":"trade","s":"BTCUSDT","t":%d,"p":"43000.1%d","q":"0.01"}' % (n, n % 10))
    for n in range(200)
]


def _batch(compression: int) -> bytes:
    builder = BatchBuilder(1 << 20, compression)
    for n, (key, value) in enumerate(RECORDS):
        builder.append(key=key, value=value, timestamp=1_700_000_000_000 + n)
    return bytes(builder._build())


def test_an_lz4_delivery_makes_aiokafka_compress_at_the_fast_level() -> None:
    AiokafkaDelivery(["127.0.0.1:9"], 25, "lz4")  # no connection is made before the first hand-over
    plain, compressed = _batch(NONE), _batch(LZ4)

    assert compressed[HEADER:] == fast_lz4(plain[HEADER:])
    level_nine = cramjam.lz4.Compressor(level=9, content_checksum=False, block_linked=False)
    level_nine.compress(plain[HEADER:])
    assert compressed[HEADER:] != bytes(level_nine.finish())  # the two levels are told apart here


def test_a_fast_lz4_batch_reads_back_as_the_records_written() -> None:
    AiokafkaDelivery(["127.0.0.1:9"], 25, "lz4")
    records = MemoryRecords(_batch(LZ4))
    batch = records.next_batch()
    assert batch is not None
    assert batch.compression_type == LZ4
    assert [(record.key, record.value) for record in batch] == RECORDS
    assert records.next_batch() is None
