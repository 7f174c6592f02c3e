"""The raw spool's pure core (streams/spool.py) and its file store (agents/spool.py).

The core is driven the way the raw producer drives it: add batches, take what the window allows,
acknowledge them or hand them back. Its disk is an in-memory `SegmentStore` here (the file store has
tests of its own below), so every test sees exactly what was spilled and what was deleted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.spool import FileSegments
from streams.spool import ENTRY_OVERHEAD, Lane, Outgoing, Spool, SpoolLimits

A: Lane = ("raw.binance", 0)
B: Lane = ("raw.binance", 1)
U: Lane = ("raw.upbit", 3)
KEY = b"binance:0"


class MemorySegments:
    """A `SegmentStore` in a dict; `fail_appends`, `fail_reads`: it raises as a full or broken disk would."""

    def __init__(self) -> None:
        self.segments: dict[str, bytearray] = {}
        self.deleted: list[str] = []
        self.fail_appends = False
        self.fail_reads = False

    def append(self, name: str, data: bytes) -> None:
        if self.fail_appends:
            raise OSError(28, "No space left on device")
        self.segments.setdefault(name, bytearray()).extend(data)

    def read(self, name: str, offset: int, size: int) -> bytes:
        if self.fail_reads:
            raise OSError(5, "Input/output error")
        return bytes(self.segments[name][offset : offset + size])

    def delete(self, name: str) -> None:
        del self.segments[name]
        self.deleted.append(name)


def batch(n: int, size: int = 100) -> bytes:
    """A distinct batch of `size` bytes (its number first, so order is visible)."""
    head = f"{n:08d}".encode()
    return head + b"x" * (size - len(head))


def values(taken: list[Outgoing]) -> list[bytes]:
    return [out.value for out in taken]


def drain(spool: Spool) -> list[Outgoing]:
    """Take and acknowledge until nothing is left: everything the broker would get, in order."""
    delivered: list[Outgoing] = []
    while True:
        taken = spool.take()
        if not taken:
            return delivered
        for out in taken:
            spool.acknowledged(out.ticket)
        delivered += taken


def roomy(memory: int = 1 << 20, disk: int = 0, window: int = 1 << 20, **kwargs: float) -> SpoolLimits:
    return SpoolLimits(memory, disk, window, **kwargs)  # type: ignore[arg-type]


# -- order and the window --------------------------------------------------------------------------------


def test_batches_come_out_in_order_per_lane_with_lanes_taking_turns() -> None:
    spool = Spool(roomy())
    for n in range(3):
        spool.add(A, KEY, batch(n))
    spool.add(B, b"binance:1", batch(10))
    spool.add(U, b"upbit:3", batch(20))
    taken = spool.take()
    assert [(out.lane, out.value) for out in taken] == [
        (A, batch(0)), (B, batch(10)), (U, batch(20)), (A, batch(1)), (A, batch(2)),
    ]  # fmt: skip
    assert [out.key for out in taken] == [KEY, b"binance:1", b"upbit:3", KEY, KEY]
    assert spool.in_flight == 5 and spool.take() == []


def test_the_window_bounds_what_is_in_flight_and_an_acknowledgement_opens_it_again() -> None:
    spool = Spool(roomy(window=250))
    for n in range(5):
        spool.add(A, KEY, batch(n))
    first = spool.take()
    assert values(first) == [batch(0), batch(1)]  # a third would pass 250 bytes
    assert spool.take() == []
    spool.acknowledged(first[0].ticket)
    assert values(spool.take()) == [batch(2)]
    usage = spool.usage()["raw.binance"]
    assert (usage.in_flight_bytes, usage.memory_bytes, usage.batches) == (200, 200, 4)


def test_a_batch_larger_than_the_window_goes_alone_when_nothing_is_in_flight() -> None:
    spool = Spool(roomy(window=100))
    spool.add(A, KEY, batch(0, size=5000))
    spool.add(A, KEY, batch(1))
    big = spool.take()
    assert values(big) == [batch(0, size=5000)]
    assert spool.take() == []
    spool.acknowledged(big[0].ticket)
    assert values(spool.take()) == [batch(1)]


def test_acknowledged_batches_leave_and_the_accounts_return_to_zero() -> None:
    spool = Spool(roomy())
    for n in range(4):
        spool.add(A, KEY, batch(n))
    assert spool.held_bytes == 400 and spool.memory_bytes == 400 + 4 * ENTRY_OVERHEAD
    assert values(drain(spool)) == [batch(n) for n in range(4)]
    usage = spool.usage()["raw.binance"]
    assert (usage.held_bytes, usage.batches, usage.dropped_batches) == (0, 0, 0)
    assert (spool.held_bytes, spool.memory_bytes, spool.in_flight) == (0, 0, 0)


# -- memory, then disk -----------------------------------------------------------------------------------


def test_past_the_memory_limit_batches_spill_to_disk_and_come_back_in_order_byte_for_byte() -> None:
    store = MemorySegments()
    memory = 3 * (100 + ENTRY_OVERHEAD)  # three batches fit in memory
    spool = Spool(roomy(memory=memory, disk=1 << 20, window=1 << 20), store)
    for n in range(10):
        assert spool.add(A, KEY, batch(n))
    usage = spool.usage()["raw.binance"]
    assert (usage.memory_bytes, usage.disk_bytes, usage.spilled_batches) == (300, 700, 7)
    assert list(store.segments) == ["raw.binance-0-1"]
    delivered = drain(spool)
    assert values(delivered) == [batch(n) for n in range(10)]
    assert all(out.key == KEY for out in delivered)
    assert store.segments == {} and store.deleted == ["raw.binance-0-1"]  # read back: deleted
    assert spool.disk_bytes == 0 and spool.usage()["raw.binance"].disk_bytes == 0


def test_memory_freed_while_spilled_batches_wait_takes_new_batches_but_order_holds() -> None:
    store = MemorySegments()
    memory = 2 * (100 + ENTRY_OVERHEAD)
    spool = Spool(roomy(memory=memory, disk=1 << 20, window=100), store)
    for n in range(5):  # 0, 1 in memory; 2, 3, 4 on disk
        spool.add(A, KEY, batch(n))
    first = spool.take()  # batch 0 in flight (still counted in memory)
    spool.acknowledged(first[0].ticket)  # memory has room again
    spool.add(A, KEY, batch(5))  # in memory, behind the batches on disk
    assert spool.usage()["raw.binance"].spilled_batches == 3
    assert values(first + drain(spool)) == [batch(n) for n in range(6)]


def test_segments_are_per_lane_closed_at_their_size_and_deleted_once_read() -> None:
    store = MemorySegments()
    spool = Spool(SpoolLimits(0, 1 << 20, 1 << 20, segment_bytes=250), store)
    for n in range(4):
        spool.add(A, KEY, batch(n))
        spool.add(U, b"upbit:3", batch(100 + n))
    # A record is 6 + 9 + 100 bytes: a segment takes three before it passes 250.
    assert sorted(store.segments) == ["raw.binance-0-1", "raw.binance-0-2", "raw.upbit-3-1", "raw.upbit-3-2"]
    assert spool.disk_bytes == sum(len(data) for data in store.segments.values())
    taken = spool.take()
    assert values(taken) == [v for n in range(4) for v in (batch(n), batch(100 + n))]
    assert store.segments == {}


# -- the bound: the newest batches are dropped, one episode at a time ------------------------------------


def test_a_full_spool_drops_the_newest_batches_and_keeps_dropping_until_down_to_the_resume_mark() -> None:
    limits = SpoolLimits(memory_bytes=1000, disk_bytes=0, window_bytes=150, resume_fraction=0.5)
    spool = Spool(limits)
    kept = [n for n in range(10) if spool.add(A, KEY, batch(n))]
    assert kept == [0, 1, 2, 3]  # 4 x (100 + 128) bytes fit in 1,000
    assert spool.dropping
    episode = spool.episode
    assert episode is not None and episode.batches == {"raw.binance": 6}
    assert episode.bytes == {"raw.binance": 600}
    usage = spool.usage()["raw.binance"]
    assert (usage.dropped_batches, usage.dropped_bytes) == (6, 600)

    # The broker takes one batch: there is room for another, but the spool still fills 3 x 228 bytes,
    # over 50 % of 1,000.
    taken = spool.take()
    spool.acknowledged(taken[0].ticket)
    assert not spool.add(A, KEY, batch(10)) and spool.dropping
    taken += spool.take()
    spool.acknowledged(taken[1].ticket)  # 2 x 228 bytes: under the mark
    assert spool.add(A, KEY, batch(11))
    assert not spool.dropping and spool.episode is episode and episode.ended
    assert episode.batches == {"raw.binance": 7}
    delivered = values(taken) + values(drain(spool))
    assert [int(v[:8]) for v in delivered] == [0, 1, 2, 3, 11]  # one hole: 4-10


def test_without_disk_the_bound_is_memory_and_with_disk_it_is_both() -> None:
    memory_only = Spool(SpoolLimits(500, 0, 500))
    assert sum(memory_only.add(A, KEY, batch(n)) for n in range(10)) == 2
    store = MemorySegments()
    both = Spool(SpoolLimits(500, 1000, 500), store)
    kept = sum(both.add(A, KEY, batch(n)) for n in range(20))
    assert kept == 2 + 8  # 8 records of 115 bytes fit in 1,000 on disk
    assert both.usage()["raw.binance"].dropped_batches == 10


def test_a_disk_that_fails_to_write_counts_as_full() -> None:
    store = MemorySegments()
    spool = Spool(SpoolLimits(0, 1 << 20, 1 << 20), store)
    assert spool.add(A, KEY, batch(0))
    store.fail_appends = True
    assert not spool.add(A, KEY, batch(1)) and spool.dropping
    store.fail_appends = False
    assert values(drain(spool)) == [batch(0)]
    assert spool.add(A, KEY, batch(2))  # empty again: kept, in a new segment
    assert values(drain(spool)) == [batch(2)]
    assert spool.usage()["raw.binance"].dropped_batches == 1


def test_spilled_batches_that_cannot_be_read_back_are_counted_as_dropped_and_the_lane_goes_on() -> None:
    store = MemorySegments()
    spool = Spool(SpoolLimits(0, 1 << 20, 1 << 20), store)
    for n in range(3):
        spool.add(A, KEY, batch(n))
    spool.add(B, KEY, batch(9))
    store.fail_reads = True
    assert spool.take() == []
    store.fail_reads = False
    usage = spool.usage()["raw.binance"]
    assert (usage.dropped_batches, usage.dropped_bytes, usage.batches, usage.held_bytes) == (4, 400, 0, 0)
    assert spool.add(A, KEY, batch(3))
    assert values(drain(spool)) == [batch(3)]


def test_an_undeliverable_batch_leaves_counted_as_dropped() -> None:
    spool = Spool(roomy())
    spool.add(A, KEY, batch(0))
    spool.add(A, KEY, batch(1))
    first, second = spool.take()
    spool.undeliverable(first.ticket)
    spool.acknowledged(second.ticket)
    usage = spool.usage()["raw.binance"]
    assert (usage.dropped_batches, usage.dropped_bytes, usage.batches, usage.held_bytes) == (1, 100, 0, 0)


# -- handed back: resent first, in order -----------------------------------------------------------------


def test_batches_not_handed_over_after_all_go_first_next_time_in_their_order() -> None:
    spool = Spool(roomy())
    for n in range(5):
        spool.add(A, KEY, batch(n))
    taken = spool.take()
    accepted, refused = taken[:2], taken[2:]  # the producer's queue was full after two
    for out in reversed(refused):  # in any order: they go back by ticket
        spool.hand_back(out.ticket, out.value, out.key)
    spool.add(A, KEY, batch(5))
    for out in accepted:
        spool.acknowledged(out.ticket)
    again = drain(spool)
    assert values(accepted + again) == [batch(n) for n in range(6)]
    assert spool.usage()["raw.binance"].resent_batches == 3


def test_a_batch_the_producer_gave_up_on_is_sent_again_before_everything_still_waiting() -> None:
    store = MemorySegments()
    spool = Spool(roomy(memory=300 + 3 * ENTRY_OVERHEAD, disk=1 << 20, window=300), store)
    for n in range(6):  # 0-2 in memory, 3-5 on disk
        spool.add(A, KEY, batch(n))
    spool.add(B, KEY, batch(50))
    first = spool.take()
    assert values(first) == [batch(0), batch(50), batch(1)]
    spool.acknowledged(first[1].ticket)
    spool.hand_back(first[2].ticket, first[2].value, first[2].key)  # gave up on batch 1
    spool.hand_back(first[0].ticket, first[0].value, first[0].key)  # and on batch 0, reported later
    assert values(drain(spool)) == [batch(n) for n in range(6)]
    assert spool.usage()["raw.binance"].held_bytes == 0 and spool.disk_bytes == 0


def test_clear_forgets_what_waits_and_says_how_much() -> None:
    store = MemorySegments()
    spool = Spool(roomy(memory=200 + 2 * ENTRY_OVERHEAD, disk=1 << 20, window=100), store)
    for n in range(5):
        spool.add(A, KEY, batch(n))
    spool.add(U, KEY, batch(9, size=40))
    in_flight = spool.take()
    assert spool.clear() == {"raw.binance": (4, 400), "raw.upbit": (1, 40)}
    assert store.segments == {} and spool.take() == []
    spool.acknowledged(in_flight[0].ticket)
    assert spool.held_bytes == 0 and spool.memory_bytes == 0 and spool.disk_bytes == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="negative"):
        SpoolLimits(-1, 0, 0)
    with pytest.raises(ValueError, match="resume_fraction"):
        SpoolLimits(1, 0, 1, resume_fraction=1.0)
    with pytest.raises(ValueError, match="segment store"):
        Spool(SpoolLimits(1, 1, 1))


# -- any sequence of operations: nothing lost, nothing twice, order kept, accounts exact ------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from([A, B, U]), st.integers(1, 400)),
        st.tuples(st.just("take"), st.just(A), st.just(0)),
        st.tuples(st.just("ack"), st.just(A), st.integers(0, 100)),
        st.tuples(st.just("give-up"), st.just(A), st.integers(0, 100)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.integers(0, 3000), st.integers(0, 3000), st.integers(1, 1500))
def test_whatever_happens_each_lane_delivers_what_it_kept_once_and_in_order(
    operations: list[tuple[str, Lane, int]], memory: int, disk: int, window: int
) -> None:
    store = MemorySegments()
    spool = Spool(SpoolLimits(memory, disk, window, segment_bytes=500), store)
    kept: dict[Lane, list[bytes]] = {A: [], B: [], U: []}
    delivered: dict[Lane, list[bytes]] = {A: [], B: [], U: []}
    in_flight: list[Outgoing] = []
    counter = 0
    for name, lane, number in operations:
        if name == "add":
            counter += 1
            value = batch(counter, size=max(number, 8))
            if spool.add(lane, KEY, value):
                kept[lane].append(value)
        elif name == "take":
            in_flight += spool.take()
        elif in_flight:
            out = in_flight.pop(number % len(in_flight))
            if name == "ack":
                spool.acknowledged(out.ticket)
                delivered[out.lane].append(out.value)
            else:
                spool.hand_back(out.ticket, out.value, out.key)
        assert spool.held_bytes == sum(u.held_bytes for u in spool.usage().values())
    for out in in_flight:  # what was in flight at the end is given up on, then everything drains
        spool.hand_back(out.ticket, out.value, out.key)
    for out in drain(spool):
        delivered[out.lane].append(out.value)
    for lane in kept:
        assert sorted(delivered[lane]) == sorted(kept[lane])  # each kept batch exactly once
    assert spool.held_bytes == spool.memory_bytes == spool.disk_bytes == 0 and store.segments == {}
    dropped = sum(u.dropped_batches for u in spool.usage().values())
    assert dropped + sum(map(len, kept.values())) == counter


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=60), st.integers(0, 2000), st.integers(0, 4000))
def test_with_acknowledgements_in_order_a_lane_delivers_exactly_what_it_kept_in_order(
    sizes: list[int], memory: int, disk: int
) -> None:
    spool = Spool(SpoolLimits(memory, disk, 700, segment_bytes=400), MemorySegments())
    kept = []
    for n, size in enumerate(sizes):
        value = batch(n, size=max(size, 8))
        if spool.add(A, KEY, value):
            kept.append(value)
        if n % 7 == 3:  # the broker takes some now and then
            for out in spool.take():
                spool.acknowledged(out.ticket)
                assert out.value == kept.pop(0)
    assert values(drain(spool)) == kept


# -- the file store -----------------------------------------------------------------------------------------


def test_file_segments_append_read_back_and_delete(tmp_path: Path) -> None:
    store = FileSegments(tmp_path / "spool")
    store.append("raw.binance-0-1", b"hello ")
    store.append("raw.binance-0-1", b"world")
    store.append("raw.upbit-3-1", b"other")
    assert store.read("raw.binance-0-1", 6, 5) == b"world"
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [
        "raw.binance-0-1.spool", "raw.upbit-3-1.spool",
    ]  # fmt: skip
    with pytest.raises(OSError, match="ends at"):
        store.read("raw.upbit-3-1", 2, 10)
    store.delete("raw.binance-0-1")
    assert [p.name for p in (tmp_path / "spool").iterdir()] == ["raw.upbit-3-1.spool"]
    store.close()
    assert list((tmp_path / "spool").iterdir()) == []


def test_file_segments_start_empty_and_refuse_names_that_leave_the_directory(tmp_path: Path) -> None:
    (tmp_path / "old.spool").write_bytes(b"a batch of a process that is gone")
    (tmp_path / "keep.txt").write_text("not ours")
    store = FileSegments(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    for bad in ("nested/segment", ".hidden"):
        with pytest.raises(ValueError):
            store.append(bad, b"x")
    store.close()


def test_the_core_spills_through_the_file_store(tmp_path: Path) -> None:
    store = FileSegments(tmp_path)
    spool = Spool(SpoolLimits(0, 1 << 20, 1 << 20, segment_bytes=1000), store)
    for n in range(30):
        spool.add(A, KEY, batch(n))
    assert len(list(tmp_path.iterdir())) == 4  # 115-byte records, 9 to a 1,000-byte segment
    assert values(drain(spool)) == [batch(n) for n in range(30)]
    assert list(tmp_path.iterdir()) == []
    store.close()
