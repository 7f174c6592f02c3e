"""The hand-written produce request encoder and answer decoder against aiokafka's own schemas."""

from __future__ import annotations

import random
import struct
from io import BytesIO

import pytest
from aiokafka.protocol.produce import ProduceRequest_v3, ProduceResponse_v5

from agents.produce_codec import ANSWERS_V2, ANSWERS_V5, REQUESTS, encode_request, use_fast_produce_codec


def _topics(seed: int, count: int) -> list[tuple[str, list[tuple[int, bytes | None]]]]:
    rng = random.Random(seed)
    return [
        (
            f"market.trade.binance.{rng.choice(['BTC-USDT', 'ETH-USDT', 'é-KRW'])}{n}",
            [(rng.randrange(64), rng.randbytes(rng.randrange(0, 300)) if rng.random() > 0.05 else None)
             for _ in range(rng.randrange(0, 5))],
        )
        for n in range(count)
    ]  # fmt: skip


REQUEST_CASES = [
    pytest.param(None, 1, 300_000, [], id="no-topics"),
    pytest.param(None, -1, 300_000, _topics(1, 1), id="one-topic-acks-all"),
    pytest.param("txn-7", 0, 5, _topics(2, 40), id="transactional-many-topics"),
    pytest.param(None, 1, 30_000, None, id="null-topics"),
    pytest.param(None, -1, 300_000, [("t", [(0, bytearray(b"records")), (1, memoryview(b"more"))])],
                 id="bytearray-and-memoryview"),
]  # fmt: skip


@pytest.mark.parametrize("request_class", REQUESTS)
@pytest.mark.parametrize(("transactional_id", "acks", "timeout", "topics"), REQUEST_CASES)
def test_a_request_encodes_as_aiokafka_s_schema_does(
    request_class: type, transactional_id: str | None, acks: int, timeout: int, topics: list | None
) -> None:
    assert request_class.SCHEMA is ProduceRequest_v3.SCHEMA
    request = request_class(transactional_id, acks, timeout, topics)
    generic = [(t, [(p, None if r is None else bytes(r)) for p, r in parts]) for t, parts in topics or ()]
    expected = request_class.SCHEMA.encode(
        [transactional_id, acks, timeout, None if topics is None else generic]
    )
    assert encode_request(request) == expected


def _answer_rows(seed: int, fields: int) -> list[tuple[str | None, list[tuple[int, ...]] | None]]:
    rng = random.Random(seed)

    def row() -> tuple[int, ...]:
        partition, error, offset = rng.randrange(100), rng.choice([0, 6, 10, 87]), rng.randrange(-1, 2**40)
        return (partition, error, offset, -1, rng.randrange(2**33))[:fields]

    return [
        (f"market.bbo.upbit.KRW-{n}", [row() for _ in range(rng.randrange(0, 6))])
        for n in range(rng.randrange(1, 30))
    ]


@pytest.mark.parametrize(
    ("answer_classes", "fields"), [(ANSWERS_V2, 4), (ANSWERS_V5, 5)], ids=["v2-v4", "v5-v7"]
)
@pytest.mark.parametrize("seed", range(6))
def test_an_answer_decodes_as_aiokafka_s_schema_does(answer_classes: tuple, fields: int, seed: int) -> None:
    use_fast_produce_codec()
    topics: list = _answer_rows(seed, fields)
    if seed == 0:
        topics = [(None, None), *topics]  # a null name and a null partition array, as the schema allows
    for answer_class in answer_classes:
        wire = answer_class.SCHEMA.encode([topics, seed * 7])
        generic = answer_class.SCHEMA.decode(BytesIO(wire))
        answer = answer_class.decode(BytesIO(wire))
        assert (answer.topics, answer.throttle_time_ms) == (generic[0], generic[1]) == (topics, seed * 7)


def test_an_answer_read_after_its_header_reads_the_rest_of_the_buffer() -> None:
    use_fast_produce_codec()
    wire = ProduceResponse_v5.SCHEMA.encode([_answer_rows(9, 5), 0])
    data = BytesIO(b"\x00\x00\x00\x2a" + wire)
    data.read(4)  # the correlation id, as aiokafka's connection reads it first
    assert ProduceResponse_v5.decode(data).topics == ProduceResponse_v5.SCHEMA.decode(BytesIO(wire))[0]


def test_a_truncated_answer_is_an_error_not_a_short_list() -> None:
    use_fast_produce_codec()
    wire = ProduceResponse_v5.SCHEMA.encode([_answer_rows(3, 5), 0])
    with pytest.raises(struct.error):
        ProduceResponse_v5.decode(BytesIO(wire[:-7]))


def test_the_codec_is_what_aiokafka_s_classes_use_once_installed() -> None:
    use_fast_produce_codec()
    request = REQUESTS[-1](None, -1, 1000, _topics(4, 3))
    assert request.encode() == encode_request(request)
    wire = ProduceResponse_v5.SCHEMA.encode([_answer_rows(5, 5), 3])
    assert ProduceResponse_v5.decode(wire).throttle_time_ms == 3
