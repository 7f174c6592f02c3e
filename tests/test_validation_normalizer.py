"""The Normalizer with validation: raw batches in, market records / dead letters / events out.

Output is collected by the real TopicWriter through an in-memory produce function.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict
from typing import Any

import pytest

from agents.metrics import DEADLETTERS
from agents.normalize import MAX_DEAD_LETTER_FRAME, Normalizer
from agents.writer import TopicWriter
from streams.continuity import FetchTrades, Seed
from streams.deadletter import DeadLetter, decode_dead_letter
from streams.events import CollectorEvent, decode_event
from streams.exchanges.base import Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.raw import RawBatch, RawFrame, encode_batch
from streams.records import MarketRecord, decode_record
from streams.topics import EVENTS

NOW = 1_700_000_000_000
TRADES_TOPIC = "market.trade.binance.btc-usdt"
DEADLETTERS_TOPIC = "deadletter.binance"
INSTRUMENTS = [
    Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT"),
    Instrument("ETH/USDT", "ETHUSDT", "ETH", "USDT"),
]


class MemoryTopics:
    """Where the TopicWriter's records land: topic → [(key, value)], acknowledged at once."""

    def __init__(self) -> None:
        self.topics: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        self.fetches: list[FetchTrades] = []  # history the continuity engine asked for

    async def produce(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.topics[topic].append((key, value))
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged

    async def declare(self, topic: str) -> None:
        return None

    def trades(self, topic: str = TRADES_TOPIC) -> list[MarketRecord]:
        return [decode_record(value) for _, value in self.topics.get(topic, [])]

    def dead_letters(self) -> list[DeadLetter]:
        return [decode_dead_letter(value) for _, value in self.topics.get(DEADLETTERS_TOPIC, [])]

    def events(self) -> list[CollectorEvent]:
        return [decode_event(value) for _, value in self.topics.get(EVENTS, [])]


def make_normalizer(
    clock_skew_seconds: float = 300, last_id: int | None = None
) -> tuple[Normalizer, MemoryTopics]:
    """A Normalizer writing to memory; with `last_id`, the BTC trade topic is taken to end there."""
    memory = MemoryTopics()
    writer = TopicWriter(memory.produce, memory.declare)

    async def seeds(symbols: object) -> dict[str, Seed]:
        return (
            {} if last_id is None else {"BTC/USDT": Seed(last_id=last_id, last_price="100.5", last_time=NOW)}
        )

    normalizer = Normalizer(
        BinanceAdapter(INSTRUMENTS), writer, clock_skew_seconds, read_seeds=seeds, fetch=memory.fetches.append
    )
    return normalizer, memory


def trade_frame(trade_id: int, price: str = "100.5", quantity: str = "0.25", **extra: Any) -> bytes:
    data = {"e": "trade", "E": NOW - 3, "s": "BTCUSDT", "t": trade_id, "p": price, "q": quantity,
            "T": NOW - 4, "m": False, "M": True, **extra}  # fmt: skip
    return json.dumps({"stream": "btcusdt@trade", "data": data}, separators=(",", ":")).encode()


def rest_trades(*ids: int, time: int = NOW - 3_600_000) -> bytes:
    """A REST `trades` body, as backfill fetches it (by default an hour old)."""
    rows = [{"id": n, "price": "100.5", "qty": "0.25", "quoteQty": "25.125", "time": time,
             "isBuyerMaker": False, "isBestMatch": True} for n in ids]  # fmt: skip
    return json.dumps(rows).encode()


def batch(*payloads: bytes, source: str = "ws", first_sequence: int = 0, request: str | None = None) -> bytes:
    frames = [RawFrame(first_sequence + n, NOW, payload) for n, payload in enumerate(payloads)]
    return encode_batch(RawBatch("binance", "binance-0-1-1", frames, source=source, request=request))


def run(normalizer: Normalizer, *values: bytes) -> None:
    asyncio.run(normalizer.handle(list(values)))


def test_a_record_breaking_a_rule_is_dead_lettered_with_its_reason_and_counted() -> None:
    normalizer, memory = make_normalizer()
    counter = DEADLETTERS.labels("binance", "invalid-price")
    before = counter._value.get()
    run(normalizer, batch(trade_frame(1), trade_frame(2, price="-3"), trade_frame(3)))
    (letter,) = memory.dead_letters()
    assert (letter.reason, letter.sequence, letter.connection_id) == ("invalid-price", 1, "binance-0-1-1")
    assert letter.frame == trade_frame(2, price="-3").decode()
    assert "'-3'" in letter.detail
    assert normalizer.dead_lettered == 1
    assert counter._value.get() == before + 1
    # Trade 2 never reached the stream intact: 3 waits while the exchange's history is asked for 2.
    assert [t.data.trade_id for t in memory.trades()] == ["1"]  # type: ignore[union-attr]
    assert [f.from_id for f in memory.fetches] == [2]
    run(normalizer, batch(rest_trades(2, 3, time=NOW - 4), source="rest:trades/BTCUSDT", request="1"))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2", "3"]  # type: ignore[union-attr]


def test_a_duplicate_is_dropped_and_counted_not_dead_lettered() -> None:
    normalizer, memory = make_normalizer()
    run(normalizer, batch(trade_frame(1), trade_frame(2), trade_frame(2)), batch(trade_frame(1)))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2"]  # type: ignore[union-attr]
    assert memory.dead_letters() == []
    assert normalizer.duplicates == 2


def test_a_gap_in_trade_ids_is_filled_from_history_before_later_trades_and_reported() -> None:
    normalizer, memory = make_normalizer()
    run(normalizer, batch(trade_frame(1), trade_frame(2), trade_frame(6), trade_frame(7)))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2"]  # type: ignore[union-attr]
    [fetch] = memory.fetches
    assert (fetch.symbol, fetch.from_id, fetch.group) == ("BTC/USDT", 3, "binance:0")
    run(normalizer, batch(rest_trades(3, 4, 5, 6, 7), source="rest:trades/BTCUSDT", request=fetch.request_id))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2", "3", "4", "5", "6", "7"]  # type: ignore[union-attr]
    (event,) = memory.events()
    assert (event.type, event.exchange, event.symbol) == ("gap", "binance", "BTC/USDT")
    assert (event.detail["firstMissingId"], event.detail["lastMissingId"], event.detail["missing"]) == (
        "3",
        "5",
        3,
    )
    assert (event.detail["outcome"], event.detail["unrecoverable"]) == ("repaired", False)


def test_an_empty_history_answer_is_an_answer_so_the_engine_asks_again_soon() -> None:
    # History can lag the stream: `[]` for "from id 3" means "nothing yet", not a lost request. Taken
    # as no answer at all, the repair would hold the later trades until the answer timeout (20 s).
    normalizer, memory = make_normalizer()
    run(normalizer, batch(trade_frame(1), trade_frame(2), trade_frame(6)))
    [first] = memory.fetches
    run(normalizer, batch(b"[]", source="rest:trades/BTCUSDT", request=first.request_id))
    asyncio.run(normalizer.tick(NOW + 1_000))
    assert [(f.from_id, f.request_id != first.request_id) for f in memory.fetches] == [(3, False), (3, True)]
    answer = rest_trades(3, 4, 5, 6, time=NOW - 4)
    run(normalizer, batch(answer, source="rest:trades/BTCUSDT", request=memory.fetches[-1].request_id))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2", "3", "4", "5", "6"]  # type: ignore[union-attr]


def test_a_quiet_symbol_taken_over_reads_its_topic_and_asks_history_without_any_frame() -> None:
    # No raw record has come yet (the symbol is quiet), so no step has read the seeds: the tick does.
    normalizer, memory = make_normalizer(last_id=41)
    normalizer.stream_up("binance:0", ["BTC/USDT"], NOW)

    async def ticks() -> None:
        await normalizer.tick(NOW + 5_000)
        assert memory.fetches == []
        await normalizer.tick(NOW + 10_000)

    asyncio.run(ticks())
    assert [(f.symbol, f.from_id, f.reason) for f in memory.fetches] == [("BTC/USDT", 42, "quiet start")]


def test_stale_live_frames_are_refused_but_rest_input_may_be_old() -> None:
    normalizer, memory = make_normalizer(clock_skew_seconds=1, last_id=8)
    old = json.dumps({"stream": "btcusdt@trade", "data": {
        "e": "trade", "E": NOW - 60_000, "s": "BTCUSDT", "t": 9, "p": "100.5", "q": "1", "T": NOW - 60_000,
        "m": True}}).encode()  # fmt: skip
    run(normalizer, batch(old))
    assert [d.reason for d in memory.dead_letters()] == ["implausible-timestamp"]
    run(normalizer, batch(rest_trades(9, time=NOW - 60_000), source="rest:trades/BTCUSDT"))
    assert [t.data.trade_id for t in memory.trades()] == ["9"]  # type: ignore[union-attr]
    future = rest_trades(10, time=NOW + 60_000)
    run(normalizer, batch(future, source="rest:trades/BTCUSDT"))
    assert [d.reason for d in memory.dead_letters()] == ["implausible-timestamp"] * 2


def test_unknown_extra_fields_are_tolerated() -> None:
    normalizer, memory = make_normalizer()
    frame = trade_frame(1, X={"nested": [1, {"deep": None}]}, newField="surprise", z=1.5e300)
    run(normalizer, batch(frame))
    assert len(memory.trades()) == 1 and memory.dead_letters() == []


HOSTILE = [
    pytest.param(b"\xff\xfe\x00garbage\x80", "invalid-json", id="non-utf8"),
    pytest.param(b'{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTC\xffUSDT"}}', "invalid-json",
                 id="non-utf8-inside-json"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "schema-mismatch", id="deeply-nested-list"),
    pytest.param(b'{"x":' * 100_000 + b"1" + b"}" * 100_000, "invalid-json", id="deeply-nested-object"),
    pytest.param(b'{"stream":"btcusdt@trade","data":' + b'{"a":' * 5000 + b"1" + b"}" * 5001, "invalid-json",
                 id="deeply-nested-data"),
    pytest.param(trade_frame(1).replace(b'"p":"100.5"', b'"p":100.5'), "schema-mismatch",
                 id="number-for-string"),
    pytest.param(trade_frame(1).replace(b'"t":1', b'"t":"1"'), "schema-mismatch", id="string-for-number"),
    pytest.param(trade_frame(1).replace(b'"m":false', b'"m":null'), "schema-mismatch", id="null-for-bool"),
    pytest.param(b'{"e":"marginCall","E":1}', "unknown-event", id="unknown-event-type"),
    pytest.param(b'{"stream":"btcusdt@weird","data":{}}', "unknown-stream", id="unknown-stream"),
    pytest.param(b'{"hello":"world"}', "unknown-event", id="unknown-shape"),
    pytest.param(b"[1,2,3]", "schema-mismatch", id="not-an-object"),
    pytest.param(b"", "invalid-json", id="empty"),
    pytest.param(b'{"stream":"btcusdt@trade","data":' + b'"' + b"x" * 4_000_000 + b'"}', "schema-mismatch",
                 id="huge"),
    pytest.param(trade_frame(1, p="NaN"), "invalid-price", id="nan-price"),
    pytest.param(trade_frame(1, q="0"), "invalid-quantity", id="zero-quantity"),
    pytest.param(trade_frame(1).replace(b'"t":1', b'"t":-1'), "invalid-trade-id", id="negative-id"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "expected"), HOSTILE)
def test_each_hostile_frame_is_dead_lettered_with_its_reason_between_good_ones(
    payload: bytes, expected: str
) -> None:
    normalizer, memory = make_normalizer()
    run(normalizer, batch(trade_frame(1), payload, trade_frame(2)))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2"]  # type: ignore[union-attr]
    (letter,) = memory.dead_letters()
    assert (letter.reason, letter.sequence) == (expected, 1)
    kept = payload[:MAX_DEAD_LETTER_FRAME]
    try:
        text = kept.decode("utf-8")
    except UnicodeDecodeError:
        assert letter.frame is None and base64.b64decode(letter.frame_base64 or "") == kept
    else:
        assert letter.frame == text and letter.frame_base64 is None


def test_a_huge_frame_is_dead_lettered_truncated_so_the_dead_letter_can_be_produced() -> None:
    normalizer, memory = make_normalizer()
    # Raw control characters: invalid JSON, and each one escaped 6-fold in the dead letter's JSON.
    huge = b'{"stream":"btcusdt@trade","data":"' + b"\x01" * 4_000_000 + b'"}'
    run(normalizer, batch(huge))
    (value,) = [v for _, v in memory.topics[DEADLETTERS_TOPIC]]
    assert len(value) < 1_000_000  # the producer's default message.max.bytes
    letter = decode_dead_letter(value)
    assert letter.reason == "invalid-json"
    assert letter.frame is not None and letter.frame.encode() == huge[:MAX_DEAD_LETTER_FRAME]
    assert letter.detail.startswith(f"frame of {len(huge)} bytes, first {MAX_DEAD_LETTER_FRAME} kept")


def test_a_broken_raw_record_is_dead_lettered_and_the_rest_of_the_take_goes_on() -> None:
    normalizer, memory = make_normalizer()
    run(normalizer, batch(trade_frame(1)), b"\xc1 not msgpack", batch(trade_frame(2), first_sequence=1))
    assert [t.data.trade_id for t in memory.trades()] == ["1", "2"]  # type: ignore[union-attr]
    assert [d.reason for d in memory.dead_letters()] == ["invalid-raw-record"]
