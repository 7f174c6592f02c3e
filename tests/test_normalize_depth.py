"""The Normalizer with order books: raw batches of diffs, whole books and REST snapshot answers in;
depth records, dead letters and snapshot requests out. Replaying the raw topic gives the same records.

Output is collected by the real TopicWriter through an in-memory produce function (no sockets).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from agents.book_metrics import BOOK_RESYNCS, BOOKS_CROSSED
from agents.metrics import exposition, flow_meter
from agents.normalize import Normalizer
from agents.writer import TopicWriter
from streams.continuity import FetchSnapshot
from streams.exchanges.base import Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.exchanges.binance_futures import BinanceFuturesAdapter
from streams.exchanges.upbit import UpbitAdapter
from streams.raw import RawBatch, RawFrame, encode_batch
from streams.records import Depth, MarketRecord
from tables.records import BookFlow
from tests.depth_consumer import RebuiltBook
from tests.test_validation_normalizer import MemoryTopics

NOW = 1_700_000_000_000
SPOT = [Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT"), Instrument("ETH/USDT", "ETHUSDT", "ETH", "USDT")]
DEPTH_TOPIC = "market.depth.binance.btc-usdt"


def normalizer_for(adapter: Any, wanted: set[str] | None = None) -> tuple[Normalizer, MemoryTopics]:
    memory = MemoryTopics()
    writer = TopicWriter(memory.produce, memory.declare)
    book_wanted = None if wanted is None else wanted.__contains__
    normalizer = Normalizer(adapter, writer, fetch=memory.fetches.append, book_wanted=book_wanted)  # type: ignore[arg-type]
    return normalizer, memory


def diff_frame(first: int, last: int, bids: list[list[str]] = (), asks: list[list[str]] = (), *,  # type: ignore[assignment]
               symbol: str = "BTCUSDT", pu: int | None = None) -> bytes:  # fmt: skip
    data: dict[str, Any] = {"e": "depthUpdate", "E": NOW - 2, "s": symbol, "U": first, "u": last,
                            "b": list(bids), "a": list(asks)}  # fmt: skip
    if pu is not None:
        data |= {"pu": pu, "T": NOW - 3}
    return json.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data}).encode()


def snapshot_body(
    last_id: int, bids: list[list[str]] | None = None, asks: list[list[str]] | None = None
) -> bytes:
    bids = bids if bids is not None else [["100.0", "1.0"], ["99.0", "1.0"], ["98.0", "1.0"]]
    asks = asks if asks is not None else [["101.0", "1.0"], ["102.0", "1.0"], ["103.0", "1.0"]]
    return json.dumps({"lastUpdateId": last_id, "bids": bids, "asks": asks}).encode()


def ws(
    *payloads: bytes, connection: str = "binance-0-1-1", first_sequence: int = 0, exchange: str = "binance"
) -> bytes:
    frames = [RawFrame(first_sequence + n, NOW, payload) for n, payload in enumerate(payloads)]
    return encode_batch(RawBatch(exchange, connection, frames))


def rest(body: bytes, request: str | None, tag: str = "depth/BTCUSDT/100") -> bytes:
    frame = RawFrame(0, NOW, body)
    return encode_batch(RawBatch("binance", "binance-0-rest", [frame], source=f"rest:{tag}", request=request))


def run(normalizer: Normalizer, *values: bytes) -> None:
    asyncio.run(normalizer.handle(list(values)))


def depth_records(memory: MemoryTopics, topic: str = DEPTH_TOPIC) -> list[MarketRecord]:
    return memory.trades(topic)


def data(record: MarketRecord) -> Depth:
    assert isinstance(record.data, Depth)
    return record.data


def test_diffs_ask_for_a_snapshot_whose_answer_through_the_raw_topic_syncs_the_book() -> None:
    normalizer, memory = normalizer_for(BinanceAdapter(SPOT))
    run(normalizer, ws(diff_frame(11, 12, [["100.0", "2.0"]]), diff_frame(13, 13, asks=[["101.0", "3.0"]])))
    assert depth_records(memory) == []
    [ask] = memory.fetches
    assert isinstance(ask, FetchSnapshot) and (ask.symbol, ask.group, ask.reason) == (
        "BTC/USDT",
        "binance:0",
        "start",
    )
    run(
        normalizer,
        rest(snapshot_body(12), ask.request_id),
        ws(diff_frame(14, 14, [["99.0", "0"]]), first_sequence=2),
    )
    records = depth_records(memory)
    assert [(data(r).snapshot, data(r).last_update_id, data(r).prev_update_id) for r in records] == [
        (True, "13", None),
        (False, "14", "13"),
    ]
    assert data(records[0]).asks[0] == ("101.0", "3.0") and data(records[1]).bids == [("99.0", "0")]
    assert records[0].exchange == "binance" and records[0].type == "depth"
    view = normalizer.book_view("BTC/USDT", 2)
    assert (
        view is not None and view["state"] == "synced" and view["bids"] == [("100.0", "1.0"), ("98.0", "1.0")]
    )
    states = flow_meter("binance").book_states
    assert states is not None and states() == {"BTC/USDT": BookFlow("synced", NOW)}


def test_an_invalid_diff_is_dead_lettered_and_resyncs_the_book() -> None:
    normalizer, memory = normalizer_for(BinanceAdapter(SPOT))
    counter = BOOK_RESYNCS.labels("binance", "invalid-item")
    before = counter._value.get()
    run(normalizer, ws(diff_frame(11, 12)), rest(snapshot_body(12), "x"))
    run(normalizer, ws(diff_frame(13, 13, [["-1", "2"]]), first_sequence=1))
    [letter] = memory.dead_letters()
    assert letter.reason == "invalid-price" and letter.sequence == 1
    assert counter._value.get() == before + 1
    assert len(memory.fetches) == 2


def test_a_broken_chain_is_logged_with_its_ids_a_first_sync_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    normalizer, _ = normalizer_for(BinanceAdapter(SPOT))
    with caplog.at_level(logging.INFO, logger="agents.normalize"):
        run(normalizer, ws(diff_frame(11, 12)), rest(snapshot_body(12), "x"))
        assert not [r for r in caplog.records if "resyncs" in r.getMessage()]  # "start": every book's
        run(normalizer, ws(diff_frame(13, 13), diff_frame(16, 17), first_sequence=1))  # 14..15 never came
    [line] = [r.getMessage() for r in caplog.records if "resyncs" in r.getMessage()]
    assert line == "binance BTC/USDT order book resyncs: sequence-break (U 16 after u 13)"


def test_a_diff_that_crosses_the_book_is_dead_lettered_as_crossed_and_counted() -> None:
    normalizer, memory = normalizer_for(BinanceAdapter(SPOT))
    crossed = BOOKS_CROSSED.labels("binance")
    before = crossed._value.get()
    run(normalizer, ws(diff_frame(11, 12)), rest(snapshot_body(12), "x"))
    run(normalizer, ws(diff_frame(13, 13, [["101.5", "1"]]), first_sequence=1))
    [letter] = memory.dead_letters()
    assert letter.reason == "crossed-book" and "101.5" in letter.detail and letter.frame is not None
    assert crossed._value.get() == before + 1
    assert [data(r).snapshot for r in depth_records(memory)] == [True]


def test_an_unreadable_snapshot_answer_is_dead_lettered_and_asked_again_after_a_pause() -> None:
    normalizer, memory = normalizer_for(BinanceAdapter(SPOT))
    run(normalizer, ws(diff_frame(11, 12)))
    run(normalizer, rest(b'{"lastUpdateId": "x"}', memory.fetches[0].request_id))
    [letter] = memory.dead_letters()
    assert letter.reason == "schema-mismatch" and letter.connection_id == "binance-0-rest"
    asyncio.run(normalizer.tick(NOW + 60_000))
    assert len(memory.fetches) == 2


def test_books_are_kept_only_for_symbols_subscribed_to_depth() -> None:
    normalizer, memory = normalizer_for(BinanceAdapter(SPOT), wanted={"ETH/USDT"})
    run(normalizer, ws(diff_frame(11, 12), diff_frame(11, 12, symbol="ETHUSDT")))
    assert [f.symbol for f in memory.fetches] == ["ETH/USDT"]


def test_usdm_diffs_chain_by_pu() -> None:
    normalizer, memory = normalizer_for(BinanceFuturesAdapter(SPOT))
    run(
        normalizer,
        ws(diff_frame(10, 12, pu=9), diff_frame(13, 15, [["100.0", "5"]], pu=12), exchange="binance-futures"),
    )
    body = json.dumps({"lastUpdateId": 14, "E": NOW - 1, "T": NOW - 2,
                       "bids": [["100.0", "1.0"]], "asks": [["101.0", "1.0"]]}).encode()  # fmt: skip
    frame = RawFrame(0, NOW, body)
    answer = RawBatch("binance-futures", "binance-futures-0-rest", [frame], source="rest:depth/BTCUSDT/50")
    run(normalizer, encode_batch(answer))
    [record] = depth_records(memory, "market.depth.binance-futures.btc-usdt")
    assert data(record).last_update_id == "15" and data(record).bids == [("100.0", "5")]


def test_upbit_whole_books_publish_snapshots_and_drop_repeats() -> None:
    krw = [Instrument("BTC/KRW", "KRW-BTC", "BTC", "KRW")]
    normalizer, memory = normalizer_for(UpbitAdapter(krw))

    def book(timestamp: int, bid: float) -> bytes:
        units = [{"ask_price": 101.0, "bid_price": bid, "ask_size": 1.5, "bid_size": 2}]
        body = {"type": "orderbook", "code": "KRW-BTC", "timestamp": timestamp, "total_ask_size": 1.5,
                "total_bid_size": 2, "orderbook_units": units, "stream_type": "REALTIME"}  # fmt: skip
        return json.dumps(body).encode()

    run(normalizer, ws(book(NOW - 5, 100.0), book(NOW - 5, 99.0), book(NOW - 3, 99.5), exchange="upbit"))
    records = depth_records(memory, "market.depth.upbit.btc-krw")
    assert [(data(r).snapshot, data(r).last_update_id, data(r).bids) for r in records] == [
        (True, str(NOW - 5), [("100.0", "2")]),
        (True, str(NOW - 3), [("99.5", "2")]),
    ]
    assert memory.fetches == []
    assert len(memory.trades("market.bbo.upbit.btc-krw")) == 3  # the bbo records go on as before


def test_replaying_the_raw_topic_reproduces_the_same_depth_records() -> None:
    """The snapshot answers sit in the raw topic between the diffs: a fresh normalizer reading the
    same records (a restart, another worker after a rebalance) publishes the same depth records."""
    raw = [
        ws(diff_frame(11, 12, [["100.0", "2.0"]]), diff_frame(13, 13, asks=[["101.0", "3.0"]])),
        rest(snapshot_body(9), "1"),  # older than the buffered diffs: asked again
        ws(diff_frame(14, 15, [["99.0", "0"]]), first_sequence=2),
        rest(snapshot_body(14), "2"),
        ws(diff_frame(16, 16, [["98.0", "4.0"]]), diff_frame(18, 18), first_sequence=3),  # 17 skipped
        rest(snapshot_body(18, bids=[["100.0", "7.0"], ["98.0", "4.0"]]), "3"),
        ws(diff_frame(19, 19, [["97.5", "1"]]), first_sequence=5),
    ]
    outputs = []
    for _ in range(2):
        normalizer, memory = normalizer_for(BinanceAdapter(SPOT))
        for value in raw:
            run(normalizer, value)
        outputs.append([value for _, value in memory.topics[DEPTH_TOPIC]])
    assert outputs[0] == outputs[1]
    consumer = RebuiltBook()
    records = depth_records(memory)
    for record in records:
        consumer.apply(record)
    assert [(data(r).snapshot, data(r).last_update_id) for r in records] == [
        (True, "15"), (False, "16"), (True, "18"), (False, "19"),
    ]  # fmt: skip


def test_book_metrics_are_exposed() -> None:
    normalizer, _ = normalizer_for(BinanceAdapter(SPOT))
    run(
        normalizer,
        ws(diff_frame(11, 12)),
        rest(snapshot_body(12), "x"),
        ws(diff_frame(11, 12, symbol="ETHUSDT"), first_sequence=1),
    )
    text = exposition().decode()
    assert 'collector_books{exchange="binance",state="synced"} 1.0' in text
    assert 'collector_books{exchange="binance",state="syncing"} 1.0' in text
    assert 'collector_book_age_seconds{exchange="binance",symbol="BTC/USDT"}' in text
    assert 'collector_book_resyncs_total{exchange="binance",reason="start"}' in text
