"""Raw batches the broker has not taken yet: kept in order, bounded, in memory and then on disk.

A pure core: batches (bytes) go in per lane (a topic partition), come out oldest first for the
producer to hand over, and leave once the broker has acknowledged them. No clock and no I/O but an
injected `SegmentStore` (agents/spool.py keeps its segments in files).

- Memory first: a batch is kept in memory while the bytes held there (waiting, and handed over but
  not acknowledged) stay within `memory_bytes`; past that it is appended to its lane's segment on
  disk, within `disk_bytes`.
- Order: a lane hands its batches over in the order they came. A batch handed back (the producer's
  queue was full, or it gave up on the batch) returns to the front of its lane, before every batch
  that came after it.
- Window: at most `window_bytes` are handed over and unacknowledged at once (always one batch when
  none is), so the producer's own queue holds little and a paused broker's backlog waits here.
- Bound: a batch neither memory nor disk can take is dropped, the NEWEST one. Once the spool has
  dropped a batch it drops every new one until it holds no more than `resume_fraction` of its
  capacity (an episode), so an outage leaves one hole per connection instead of many small ones.
  The newest, because the hole then lies at the recent end of the outage, which the exchanges' REST
  history still holds when the broker is back (Upbit and Bithumb page back from their newest trade
  only), and what is kept stays one run from the start of the outage, in order. Batch contents are
  never touched: the dropped frames' sequence numbers are simply missing, so the normalize agent sees
  a sequence gap and the continuity engine repairs it from REST.
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

Lane = tuple[str, int]  # (topic, partition); partition -1: the producer's partitioner picks it

# What a batch waiting in memory costs beyond its bytes (the entry object, the deque slot), so that
# the memory bound holds for a spool of many tiny batches too.
ENTRY_OVERHEAD = 128
# A record on disk: key length (2 bytes), value length (4 bytes), key, value.
_HEADER = 6
MAX_KEY_BYTES = 0xFFFF


class SegmentStore(Protocol):
    """Where spilled batches are written: named append-only segments. Raises OSError when it fails."""

    def append(self, name: str, data: bytes) -> None:
        """Append `data` to the segment `name`, creating it if needed."""
        ...

    def read(self, name: str, offset: int, size: int) -> bytes:
        """`size` bytes of segment `name` from `offset` (written before)."""
        ...

    def delete(self, name: str) -> None: ...


@dataclass(frozen=True)
class SpoolLimits:
    memory_bytes: int
    disk_bytes: int
    window_bytes: int
    segment_bytes: int = 16 * 1024 * 1024  # a lane's segment is closed beyond this size
    resume_fraction: float = 0.75  # after dropping, new batches are kept again at or below this share

    def __post_init__(self) -> None:
        if min(self.memory_bytes, self.disk_bytes, self.window_bytes) < 0 or self.segment_bytes <= 0:
            raise ValueError("spool limits must not be negative")
        if not 0 <= self.resume_fraction < 1:
            raise ValueError("resume_fraction must be in [0, 1)")

    @property
    def capacity(self) -> int:
        return self.memory_bytes + self.disk_bytes


class Outgoing(NamedTuple):
    """A batch to hand over now; `ticket` names it when it is acknowledged, fails or is handed back."""

    ticket: int
    lane: Lane
    key: bytes
    value: bytes


@dataclass
class Usage:
    """One topic's batches in the spool (bytes of the batches themselves)."""

    memory_bytes: int = 0  # waiting in memory
    disk_bytes: int = 0  # waiting on disk
    in_flight_bytes: int = 0  # handed over, not acknowledged yet
    batches: int = 0  # waiting or in flight
    spilled_batches: int = 0  # ever written to disk
    resent_batches: int = 0  # handed back and handed over again
    dropped_batches: int = 0  # never delivered: no room, or no broker would take them
    dropped_bytes: int = 0

    @property
    def held_bytes(self) -> int:
        return self.memory_bytes + self.disk_bytes + self.in_flight_bytes


@dataclass
class DropEpisode:
    """Batches dropped from the first drop until the spool kept new batches again, per topic."""

    batches: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    ended: bool = False

    def count(self, topic: str, size: int) -> None:
        self.batches[topic] = self.batches.get(topic, 0) + 1
        self.bytes[topic] = self.bytes.get(topic, 0) + size


class _Entry:
    """A batch waiting in memory; `ticket` is set when it was handed over before and came back."""

    __slots__ = ("key", "ticket", "value")

    def __init__(self, key: bytes, value: bytes, ticket: int | None = None) -> None:
        self.key = key
        self.value = value
        self.ticket = ticket


class _Segment:
    __slots__ = ("name", "unread", "written")

    def __init__(self, name: str) -> None:
        self.name = name
        self.written = 0  # bytes in the segment
        self.unread = 0  # records not read back yet


class _Run:
    """Consecutive batches of a lane in one segment: where the next one starts, how many are left."""

    __slots__ = ("count", "offset", "segment", "size")

    def __init__(self, segment: _Segment, offset: int) -> None:
        self.segment = segment
        self.offset = offset
        self.count = 0
        self.size = 0  # bytes of the batches left (values only)


class _Lane:
    __slots__ = ("open_segment", "segments", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[_Entry | _Run] = deque()
        self.open_segment: _Segment | None = None  # where this lane's next spilled batch goes
        self.segments = 0  # segments made, for their names


class Spool:
    def __init__(self, limits: SpoolLimits, store: SegmentStore | None = None) -> None:
        if limits.disk_bytes and store is None:
            raise ValueError("a spool with disk_bytes needs a segment store")
        self.limits = limits
        self._store = store
        self._lanes: dict[Lane, _Lane] = {}
        self._ready: dict[Lane, None] = {}  # lanes with batches waiting, in hand-over rotation order
        self._in_flight: dict[int, tuple[Lane, int]] = {}  # ticket → lane, size
        self._next_ticket = 0
        self._usage: dict[str, Usage] = {}
        self._memory = 0  # waiting in memory (with ENTRY_OVERHEAD each) + in flight
        self._in_flight_bytes = 0
        self._disk = 0  # bytes of the segments on disk, read or not
        self._held = 0  # bytes of the batches held, wherever they are
        self.episode: DropEpisode | None = None  # the current or latest drop episode

    # -- in -------------------------------------------------------------------------------------------

    def add(self, lane: Lane, key: bytes, value: bytes) -> bool:
        """Keep a batch at the end of its lane; False when it was dropped (counted in the episode)."""
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"a spooled batch's key is at most {MAX_KEY_BYTES} bytes")
        size = len(value)
        usage = self._topic(lane[0])
        # Measured as fullness is: memory with its overhead, disk with its segments' read parts.
        if self.dropping and self._memory + self._disk <= self.limits.resume_fraction * self.limits.capacity:
            assert self.episode is not None
            self.episode.ended = True
        if not self.dropping:
            if self._memory + size + ENTRY_OVERHEAD <= self.limits.memory_bytes:
                self._keep_in_memory(lane, key, value, usage)
                return True
            if self._disk + _HEADER + len(key) + size <= self.limits.disk_bytes and self._spill(
                lane, key, value, usage
            ):
                return True
            self.episode = DropEpisode()
        assert self.episode is not None
        self.episode.count(lane[0], size)
        usage.dropped_batches += 1
        usage.dropped_bytes += size
        return False

    @property
    def dropping(self) -> bool:
        return self.episode is not None and not self.episode.ended

    def _keep_in_memory(self, lane: Lane, key: bytes, value: bytes, usage: Usage) -> None:
        self._lane(lane).waiting.append(_Entry(key, value))
        self._ready[lane] = None
        size = len(value)
        self._memory += size + ENTRY_OVERHEAD
        self._held += size
        usage.memory_bytes += size
        usage.batches += 1

    def _spill(self, lane: Lane, key: bytes, value: bytes, usage: Usage) -> bool:
        """Append the batch to the lane's open segment; False when the store could not write it (a
        full or failing disk counts as no room)."""
        assert self._store is not None
        queue = self._lane(lane)
        segment = queue.open_segment
        if segment is None or segment.written >= self.limits.segment_bytes:
            queue.segments += 1
            segment = queue.open_segment = _Segment(f"{lane[0]}-{lane[1]}-{queue.segments}")
        record = len(key).to_bytes(2, "big") + len(value).to_bytes(4, "big") + key + value
        try:
            self._store.append(segment.name, record)
        except OSError:
            # Part of the record may be in the segment: nothing is appended to it any more.
            queue.open_segment = None
            if not segment.unread:
                self._forget_segment(queue, segment)
            else:
                segment.written += len(record)  # its space stays taken until the segment is deleted
                self._disk += len(record)
            return False
        last = queue.waiting[-1] if queue.waiting else None
        if not (isinstance(last, _Run) and last.segment is segment):
            last = _Run(segment, segment.written)
            queue.waiting.append(last)
        last.count += 1
        last.size += len(value)
        segment.written += len(record)
        segment.unread += 1
        self._ready[lane] = None
        size = len(value)
        self._disk += len(record)
        self._held += size
        usage.disk_bytes += size
        usage.batches += 1
        usage.spilled_batches += 1
        return True

    # -- out ------------------------------------------------------------------------------------------

    def take(self) -> list[Outgoing]:
        """Batches to hand over now, each lane's oldest first, lanes in turn, within the window."""
        taken: list[Outgoing] = []
        window = self.limits.window_bytes
        while self._ready:
            lane = next(iter(self._ready))
            queue = self._lanes[lane]
            try:
                size = self._head_size(queue)
                if self._in_flight and self._in_flight_bytes + size > window:
                    break
                key, value, returning = self._pop_head(lane, queue)
            except OSError:  # a segment that cannot be read back: its batches are lost, counted
                self._lose_run(lane, queue)
                if not queue.waiting:
                    del self._ready[lane]
                continue
            ticket = self._next_ticket
            self._next_ticket += 1
            self._in_flight[ticket] = (lane, size)
            self._in_flight_bytes += size
            self._memory += size
            usage = self._usage[lane[0]]
            usage.in_flight_bytes += size
            if returning:
                usage.resent_batches += 1
            del self._ready[lane]
            if queue.waiting:
                self._ready[lane] = None  # to the end of the rotation
            taken.append(Outgoing(ticket, lane, key, value))
        return taken

    def _head_size(self, queue: _Lane) -> int:
        head = queue.waiting[0]
        if isinstance(head, _Entry):
            return len(head.value)
        assert self._store is not None
        header = self._store.read(head.segment.name, head.offset, _HEADER)
        return int.from_bytes(header[2:6], "big")

    def _pop_head(self, lane: Lane, queue: _Lane) -> tuple[bytes, bytes, bool]:
        """Remove the lane's oldest batch from waiting: (key, value, whether it was handed over before)."""
        head = queue.waiting[0]
        usage = self._usage[lane[0]]
        if isinstance(head, _Entry):
            queue.waiting.popleft()
            size = len(head.value)
            self._memory -= size + ENTRY_OVERHEAD
            usage.memory_bytes -= size
            return head.key, head.value, head.ticket is not None
        assert self._store is not None
        segment = head.segment
        header = self._store.read(segment.name, head.offset, _HEADER)
        key_size, size = int.from_bytes(header[:2], "big"), int.from_bytes(header[2:6], "big")
        body = self._store.read(segment.name, head.offset + _HEADER, key_size + size)
        head.offset += _HEADER + key_size + size
        head.count -= 1
        head.size -= size
        if not head.count:
            queue.waiting.popleft()
        segment.unread -= 1
        usage.disk_bytes -= size
        if not segment.unread:  # everything in it was read: its space is free again
            self._forget_segment(queue, segment)
        return body[:key_size], body[key_size:], False

    def _forget_segment(self, queue: _Lane, segment: _Segment) -> None:
        assert self._store is not None
        if queue.open_segment is segment:
            queue.open_segment = None
        self._disk -= segment.written
        # A segment that cannot be deleted now is deleted when the store closes.
        with suppress(OSError):
            self._store.delete(segment.name)

    def _lose_run(self, lane: Lane, queue: _Lane) -> None:
        """The lane's oldest run cannot be read back: its batches are dropped."""
        run = queue.waiting.popleft()
        assert isinstance(run, _Run)
        usage = self._usage[lane[0]]
        usage.batches -= run.count
        usage.disk_bytes -= run.size
        usage.dropped_batches += run.count
        usage.dropped_bytes += run.size
        self._held -= run.size
        run.segment.unread -= run.count
        if not run.segment.unread:
            self._forget_segment(queue, run.segment)

    # -- back -----------------------------------------------------------------------------------------

    def acknowledged(self, ticket: int) -> None:
        """The broker has the batch: it leaves the spool."""
        lane, _ = self._settle(ticket)
        self._usage[lane[0]].batches -= 1

    def undeliverable(self, ticket: int) -> None:
        """No broker will ever take the batch (e.g. too large): it leaves the spool, counted as dropped."""
        lane, size = self._settle(ticket)
        usage = self._usage[lane[0]]
        usage.batches -= 1
        usage.dropped_batches += 1
        usage.dropped_bytes += size

    def hand_back(self, ticket: int, value: bytes, key: bytes) -> None:
        """The batch was not delivered (not handed over after all, or the producer gave up on it): it
        waits again at the front of its lane, after the batches handed back before it that came first."""
        lane, size = self._settle(ticket)
        queue = self._lane(lane)
        position = 0
        for item in queue.waiting:  # handed-back batches lead the lane, in ticket order
            if not (isinstance(item, _Entry) and item.ticket is not None and item.ticket < ticket):
                break
            position += 1
        queue.waiting.insert(position, _Entry(key, value, ticket))
        # First in the rotation: it was due before anything still waiting.
        self._ready = {lane: None, **self._ready}
        self._memory += size + ENTRY_OVERHEAD
        self._held += size
        self._usage[lane[0]].memory_bytes += size

    def _settle(self, ticket: int) -> tuple[Lane, int]:
        lane, size = self._in_flight.pop(ticket)
        self._in_flight_bytes -= size
        self._memory -= size
        self._held -= size
        self._usage[lane[0]].in_flight_bytes -= size
        return lane, size

    # -- accounting -----------------------------------------------------------------------------------

    def usage(self) -> dict[str, Usage]:
        """Per topic, a copy of what the spool holds and has dropped."""
        return {topic: replace(usage) for topic, usage in self._usage.items()}

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def memory_bytes(self) -> int:
        """Memory the spool accounts for: batches waiting (with their overhead) and in flight."""
        return self._memory

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segments on disk, including read records of segments still in use."""
        return self._disk

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def waiting(self, lane: Lane) -> int:
        """Batches of a lane waiting to be handed over."""
        queue = self._lanes.get(lane)
        if queue is None:
            return 0
        return sum(item.count if isinstance(item, _Run) else 1 for item in queue.waiting)

    def clear(self) -> dict[str, tuple[int, int]]:
        """Forget every waiting batch (the worker stops without a broker): per topic, the batches and
        bytes forgotten. Batches in flight stay until acknowledged or handed back."""
        forgotten: dict[str, tuple[int, int]] = {}
        for lane, queue in self._lanes.items():
            usage = self._usage[lane[0]]
            batches = size = 0
            for item in queue.waiting:
                if isinstance(item, _Entry):
                    batches, size = batches + 1, size + len(item.value)
                    self._memory -= len(item.value) + ENTRY_OVERHEAD
                else:
                    batches, size = batches + item.count, size + item.size
                    item.segment.unread -= item.count
                    if not item.segment.unread:
                        self._forget_segment(queue, item.segment)
            queue.waiting.clear()
            if batches:
                usage.batches -= batches
                usage.memory_bytes = usage.disk_bytes = 0
                self._held -= size
                earlier = forgotten.get(lane[0], (0, 0))
                forgotten[lane[0]] = (earlier[0] + batches, earlier[1] + size)
        self._ready.clear()
        return forgotten

    def _lane(self, lane: Lane) -> _Lane:
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = _Lane()
            self._topic(lane[0])
        return queue

    def _topic(self, topic: str) -> Usage:
        usage = self._usage.get(topic)
        if usage is None:
            usage = self._usage[topic] = Usage()
        return usage
