"""The normalize side of history: REST raw records, where each symbol continues, seeds read from Kafka."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

import msgspec
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.embedded_broker import EmbeddedBroker
from agents.lastseen import read_seeds
from agents.normalize import Normalizer
from agents.writer import TopicWriter
from streams.continuity import Seed
from streams.exchanges.base import Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.raw import RawBatch, RawFrame, encode_batch
from streams.records import MarketRecord, Trade, decode_record, encode_record
from streams.topics import market_topic

BTC = Instrument("BTC/USDT", "BTCUSDT", "BTC", "USDT")
NOW = 1_700_000_000_000


def rest_trades(ids: range) -> bytes:
    return msgspec.json.encode([
        {"id": i, "price": "100.0", "qty": "1.0", "quoteQty": "100.0", "time": NOW - 1000 + i,
         "isBuyerMaker": i % 2 == 0, "isBestMatch": True}
        for i in ids
    ])  # fmt: skip


def ws_trade(trade_id: int) -> bytes:
    data = {"e": "trade", "E": NOW, "s": "BTCUSDT", "t": trade_id, "p": "100.0", "q": "1.0", "T": NOW,
            "m": False, "M": True}  # fmt: skip
    return json.dumps({"stream": "btcusdt@trade", "data": data}).encode()


def batch(source: str, *payloads: bytes) -> bytes:
    frames = [RawFrame(i, NOW, payload) for i, payload in enumerate(payloads)]
    return encode_batch(
        RawBatch(exchange="binance", connection_id="binance-0-rest", frames=frames, source=source)
    )


class Published:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    async def produce(self, topic: str, key: bytes, value: bytes) -> Awaitable[None]:
        self.records.append((topic, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def declare(self, topic: str) -> None:
        return None

    def trade_ids(self) -> list[int]:
        return [int(decode_record(v).data.trade_id) for t, v in self.records if t.startswith("market.trade.")]  # type: ignore[union-attr]

    def dead_letter_reasons(self) -> list[str]:
        return [json.loads(v)["reason"] for t, v in self.records if t.startswith("deadletter.")]


async def test_rest_trades_and_live_frames_publish_each_trade_once_above_what_the_topic_held() -> None:
    published = Published()

    async def seeds(symbols: object) -> dict[str, Seed]:
        return {"BTC/USDT": Seed(last_id=104, last_price="100.0", last_time=NOW)}  # the topic ends at 104

    normalizer = Normalizer(BinanceAdapter([BTC]), TopicWriter(published.produce, published.declare),
                            read_seeds=seeds)  # fmt: skip
    await normalizer.handle([
        batch("rest:trades/BTCUSDT", rest_trades(range(101, 111))),  # 101-104 were published before
        batch("ws", *(ws_trade(i) for i in range(108, 114))),  # 108-110 overlap the REST page
    ])  # fmt: skip
    assert published.trade_ids() == list(range(105, 114))
    assert normalizer.duplicates == 3
    assert published.dead_letter_reasons() == []


class UnorderedIdsBinance(BinanceAdapter):
    """Binance frames, but ids declared unique-only, as Upbit's and Bithumb's are."""

    trade_ids = "unique"


async def test_where_trade_ids_are_not_ordered_new_ids_are_published_whatever_their_value() -> None:
    published = Published()

    async def seeds(symbols: object) -> dict[str, Seed]:
        # An unordered id far above the new trades' ids: only the position (the trade time) orders.
        return {"BTC/USDT": Seed(last_position=NOW - 5, last_price="100.0", last_time=NOW - 5,
                                 recent_ids=(str(10**9),))}  # fmt: skip

    normalizer = Normalizer(UnorderedIdsBinance([BTC]), TopicWriter(published.produce, published.declare),
                            read_seeds=seeds)  # fmt: skip
    await normalizer.handle([batch("ws", *(ws_trade(i) for i in (7, 3, 9)))])
    # A restart: the engine asks history first (nothing is asked here, so it waits); the trades are
    # held, not lost, and not published out of turn.
    assert published.trade_ids() == []
    assert normalizer.engine.held() == 3


@pytest.mark.parametrize(("source", "reason"), [
    ("rest:orderbook/BTCUSDT", "unknown-source"),
    ("rest:trades/XYZUSDT", "unknown-symbol"),
])  # fmt: skip
async def test_rest_records_the_normalizer_cannot_route_or_read_are_dead_lettered(
    source: str, reason: str
) -> None:
    published = Published()
    normalizer = Normalizer(BinanceAdapter([BTC]), TopicWriter(published.produce, published.declare))
    await normalizer.handle([batch(source, rest_trades(range(1, 3)))])
    assert published.dead_letter_reasons() == [reason]
    assert published.trade_ids() == []


@pytest.mark.e2e  # a real broker process
async def test_seeds_read_the_end_of_each_market_topic(broker: EmbeddedBroker) -> None:
    topic = market_topic("trade", "binance", "BTC/USDT")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for created in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        created.result(10)  # market topics have one partition (agents/pipeline.py)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for batch_ids in ((5, 6), (7, 8, 9)):  # two produce batches: the end is inside the second
        for trade_id in batch_ids:
            trade = Trade(f"1.{trade_id}", "1.0", "buy", str(trade_id), NOW + trade_id)
            producer.produce(
                topic, encode_record(MarketRecord("binance", "BTC/USDT", "trade", NOW, NOW, trade))
            )
        assert producer.flush(10) == 0
    found = await read_seeds([broker.bootstrap], "binance", ["BTC/USDT", "ETH/USDT"])
    assert list(found) == ["BTC/USDT"]  # ETH has no topic yet: nothing to continue from
    seed = found["BTC/USDT"]
    assert (seed.last_id, seed.last_price, seed.last_time) == (9, "1.9", NOW + 9)
    recent = await read_seeds([broker.bootstrap], "binance", ["BTC/USDT"], recent=4, position=int_id)
    assert recent["BTC/USDT"].recent_ids == ("6", "7", "8", "9")
    assert recent["BTC/USDT"].last_position == 9
    assert await read_seeds([broker.bootstrap], "binance", []) == {}


def int_id(trade: Trade) -> int:
    return int(trade.trade_id)
