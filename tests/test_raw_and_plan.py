"""Pure pieces of the data path: the raw batch format, connection planning, the batched writer."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from agents.connection import FAST_PACE, QUIET_PACE, FlushClock, flush_window
from agents.source import Backoff, FrameBatcher
from agents.writer import TopicWriter
from streams.exchanges.base import DataType, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.plan import PlanError, plan_connections
from streams.raw import RawBatch, RawFrame, coalesce, decode_batch, encode_batch
from streams.topics import market_topic, symbol_token


def test_raw_batches_keep_frame_bytes_untouched_even_when_not_utf8() -> None:
    frames = [RawFrame(0, 1700000000000, b'{"a":1}'), RawFrame(1, 1700000000001, b"\xff\xfe\x00garbage")]
    batch = RawBatch(exchange="binance", connection_id="binance-0-1", frames=frames)
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    assert decoded.frames[1].payload == b"\xff\xfe\x00garbage"
    assert decoded.source == "ws" and decoded.v == 1


def test_a_malformed_raw_record_raises_msgspec_errors() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_batch(b"\xc1not msgpack")
    with pytest.raises(msgspec.ValidationError):
        decode_batch(msgspec.msgpack.encode({"exchange": 1}))


def test_topic_names_follow_the_contract() -> None:
    assert symbol_token("BTC/USDT") == "btc-usdt"
    assert market_topic("kline", "binance", "1000SATS/USDT") == "market.kline.binance.1000sats-usdt"


def _instruments(count: int) -> list[Instrument]:
    return [Instrument(f"C{i}/USDT", f"C{i}USDT", f"C{i}", "USDT") for i in range(count)]


def test_streams_are_spread_over_connections_within_the_per_connection_limit() -> None:
    adapter = BinanceAdapter(_instruments(300))
    kinds = [DataType.parse(t) for t in ("trade", "kline_1m", "ticker", "bbo")]
    plans = plan_connections(adapter, _instruments(300), kinds, max_connections=5, streams_per_connection=500)
    assert [len(p.streams) for p in plans] == [500, 500, 200]
    assert all(p.route == "/stream" for p in plans)
    every = [s for p in plans for s in p.streams]
    assert len(every) == len(set(every)) == 1200


def test_the_exchange_limit_wins_over_a_larger_configured_one() -> None:
    adapter = BinanceAdapter(_instruments(600))
    plans = plan_connections(
        adapter,
        _instruments(600),
        [DataType("trade"), DataType("bbo")],
        max_connections=5,
        streams_per_connection=5000,
    )
    assert [len(p.streams) for p in plans] == [1024, 176]


def test_too_many_streams_for_the_allowed_connections_is_refused_clearly() -> None:
    adapter = BinanceAdapter(_instruments(100))
    with pytest.raises(PlanError, match=r"connections\.max is 1"):
        plan_connections(
            adapter, _instruments(100), [DataType("trade")], max_connections=1, streams_per_connection=10
        )


def test_backoff_doubles_to_its_cap_with_jitter_and_resets_after_a_stable_connection() -> None:
    backoff = Backoff(first=1.0, cap=30.0, stable_after=60.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.connection_lasted(5.0)
    assert backoff.current == 30.0
    backoff.connection_lasted(61.0)
    assert backoff.next_delay() <= 1.0


async def test_the_batcher_numbers_frames_per_connection_and_flushes_whole_batches() -> None:
    sent: list[tuple[str, bytes]] = []

    async def send_raw(key: str, value: bytes) -> None:
        sent.append((key, value))

    batcher = FrameBatcher("binance", "conn-1", send_raw)
    for i in range(5):
        batcher.add(f'{{"n":{i}}}'.encode(), 1000 + i)
    await batcher.flush()
    await batcher.flush()  # nothing new: no empty record
    batcher.add(b"{}", 2000)
    await batcher.flush()
    batches = [decode_batch(value) for _, value in sent]
    assert [key for key, _ in sent] == ["conn-1", "conn-1"]
    assert [f.sequence for b in batches for f in b.frames] == [0, 1, 2, 3, 4, 5]
    assert batches[0].frames[4].received_at == 1004


async def test_the_flush_clock_writes_the_batches_of_every_link_in_one_flush() -> None:
    sent: list[str] = []
    flushed = asyncio.Event()
    expected = [2]  # records sent when `flushed` is set

    async def send_raw(key: str, value: bytes) -> None:
        if key == "broken":
            raise RuntimeError("this link's producer failed")
        sent.append(key)
        if len(sent) == expected[0]:
            flushed.set()

    clock = FlushClock(interval=0.01)
    links = [FrameBatcher("binance", name, send_raw) for name in ("a", "broken", "b")]
    for batcher in links:
        batcher.add(b"{}", 1)
        clock.due(batcher)
    clock.due(links[0])  # due again before the flush: still one record for it
    for _ in range(5):
        await asyncio.sleep(0)
    assert sent == []  # nothing before the interval is up
    await asyncio.wait_for(flushed.wait(), timeout=5)
    # In the order they became due; the failing link's frames do not keep the others'.
    assert sent == ["a", "b"]
    assert all(batcher.pending == 0 for batcher in links)
    # A frame after the flush starts the clock again.
    links[0].add(b"{}", 2)
    clock.due(links[0])
    expected[0] = 3
    flushed.clear()
    await asyncio.wait_for(flushed.wait(), timeout=5)
    assert sent == ["a", "b", "a"]


@pytest.mark.parametrize(
    ("frames", "elapsed", "window"),
    [
        (400, 0.100, 0.005),  # 4,000 frames a second: never shorter than the shortest window
        (32, 0.010, 0.005),  # 3,200 a second (FAST_PACE): still the shortest
        (8, 0.00925, 0.0275),  # a gap halfway between FAST_PACE's and QUIET_PACE's: halfway
        (10, 0.010, 0.005 + 0.045 * (0.001 - 1 / 3200) / (0.002 - 1 / 3200)),  # 1,000 a second
        (10, 0.020, 0.050),  # 500 a second (QUIET_PACE): the longest window
        (10, 0.100, 0.050),  # slower still: never longer than the longest
        (1, 60.0, 0.050),  # the first frame after a quiet minute
        (0, 0.005, 0.050),  # a flush that found nothing (every batch had filled up and gone)
    ],
)
def test_the_flush_window_grows_with_the_gap_between_frames_within_bounds(frames, elapsed, window) -> None:
    assert (FAST_PACE, QUIET_PACE) == (3_200, 500)  # the paces the table is written for
    assert flush_window(frames, elapsed, shortest=0.005, longest=0.050) == pytest.approx(window)


async def test_the_flush_clock_waits_longer_while_frames_trickle_in_and_less_when_they_come_fast() -> None:
    flushed: asyncio.Queue[str] = asyncio.Queue()

    async def send_raw(key: str, value: bytes) -> None:
        flushed.put_nowait(key)

    clock = FlushClock(interval=0.005, quiet_interval=0.2)
    batcher = FrameBatcher("binance", "a", send_raw)
    windows = [clock.window]
    for _ in range(2):  # a frame at a time
        batcher.add(b"{}", 1)
        clock.due(batcher)
        await asyncio.wait_for(flushed.get(), timeout=5)
        windows.append(clock.window)
    # The first frames are not kept waiting; then the window grows to the longest one.
    assert windows[0] == 0.005 and 0.005 < windows[1] <= 0.2 and windows[2] == pytest.approx(0.2)
    for _ in range(FAST_PACE):  # a second's worth at FAST_PACE, in one window
        batcher.add(b"{}", 2)
    clock.due(batcher)
    await asyncio.wait_for(flushed.get(), timeout=5)
    assert clock.window == 0.005
    assert batcher.pending == 0


async def test_the_writer_returns_only_after_every_record_is_acknowledged_and_retries_failures() -> None:
    loop = asyncio.get_running_loop()
    declared: list[str] = []
    attempts: dict[bytes, int] = {}

    async def declare(topic: str) -> None:
        declared.append(topic)

    async def produce(topic: str, key: bytes, value: bytes) -> asyncio.Future[str]:
        attempts[value] = attempts.get(value, 0) + 1
        future: asyncio.Future[str] = loop.create_future()
        if value == b"flaky" and attempts[value] == 1:
            loop.call_soon(future.set_exception, ConnectionError("broker gone"))
        else:
            loop.call_soon(future.set_result, topic)
        return future

    writer = TopicWriter(produce, declare, retry_delay=0.01)
    writer.send("t1", b"k", b"ok")
    writer.send("t2", b"k", b"flaky")
    writer.send("t1", b"k", b"ok2")
    await asyncio.wait_for(writer.flush(), timeout=5)
    assert sorted(declared) == ["t1", "t2"]
    assert attempts == {b"ok": 1, b"flaky": 2, b"ok2": 1}
    assert writer.sent == 3 and writer.retries == 1
    writer.send("t1", b"k", b"again")
    await asyncio.wait_for(writer.flush(), timeout=5)
    assert sorted(declared) == ["t1", "t2"]  # declared once


async def test_a_large_frame_travels_in_a_raw_record_of_its_own() -> None:
    from agents.connection import MAX_BATCH_BYTES

    sent: list[bytes] = []

    async def send_raw(key: str, value: bytes) -> None:
        sent.append(value)

    batcher = FrameBatcher("binance", "conn-1", send_raw)
    batcher.add(b"{}", 1)
    batcher.add(b"x" * (MAX_BATCH_BYTES * 3), 2)
    batcher.add(b"{}", 3)
    await batcher.flush()
    batches = [decode_batch(value) for value in sent]
    assert [[f.sequence for f in b.frames] for b in batches] == [[0], [1], [2]]


def _ws(connection: str, sequences: list[int], payload: bytes = b"x") -> bytes:
    frames = [RawFrame(n, 1_700_000_000_000, payload) for n in sequences]
    return encode_batch(RawBatch(exchange="binance", connection_id=connection, frames=frames))


def _rest(request: str) -> bytes:
    frames = [RawFrame(0, 1_700_000_000_000, b"[]")]
    return encode_batch(
        RawBatch(exchange="binance", connection_id="c0", frames=frames, source="rest:t", request=request)
    )


@pytest.mark.parametrize(
    ("values", "max_frames", "max_bytes", "expected"),
    [
        ([], 10, 100, []),
        ([_ws("c0", [0, 1])], 10, 100, [("c0", [0, 1])]),
        ([_ws("c0", [0, 1]), _ws("c0", [2]), _ws("c0", [3, 4])], 10, 100, [("c0", [0, 1, 2, 3, 4])]),
        # another connection (a rollover's new link under the same group key) starts a new record
        ([_ws("c0", [7]), _ws("c1", [0]), _ws("c0", [8])], 10, 100, [("c0", [7]), ("c1", [0]), ("c0", [8])]),
        # within the frame and byte limits
        ([_ws("c0", [0, 1]), _ws("c0", [2, 3]), _ws("c0", [4])], 3, 100, [("c0", [0, 1]), ("c0", [2, 3, 4])]),
        ([_ws("c0", [0], b"a" * 60), _ws("c0", [1], b"b" * 60)], 10, 100, [("c0", [0]), ("c0", [1])]),
        # a REST answer travels alone and in its place
        (
            [_ws("c0", [0]), _rest("r1"), _ws("c0", [1])],
            10,
            100,
            [("c0", [0]), ("rest r1", [0]), ("c0", [1])],
        ),
    ],
)
def test_coalesce_merges_consecutive_batches_of_a_connection_in_order(
    values: list[bytes], max_frames: int, max_bytes: int, expected: list[tuple[str, list[int]]]
) -> None:
    out = [decode_batch(value) for value in coalesce(values, max_frames, max_bytes)]
    described = [
        (f"rest {b.request}" if b.request else b.connection_id, [f.sequence for f in b.frames]) for b in out
    ]
    assert described == expected


def test_coalesce_passes_a_record_that_does_not_decode_through_in_its_place() -> None:
    out = coalesce([_ws("c0", [0]), b"not msgpack", _ws("c0", [1]), _ws("c0", [2])], 10, 100)
    assert out[1] == b"not msgpack" and len(out) == 3
    assert [f.sequence for f in decode_batch(out[2]).frames] == [1, 2]
