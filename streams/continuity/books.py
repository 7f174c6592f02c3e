"""Order books per symbol, kept exact across every break: the continuity of `depth`.

Books are the continuity engine's third rule, with update ids in place of trade ids. A book line
follows one symbol's book the way its exchange documents it and publishes depth records (README,
"Order book record"); `Books` holds every line of one exchange and paces their REST snapshots.

Diff books (Binance spot and USD-M, `DiffBookLine`; exchange-protocols.md §1.5, §2.5):

1. buffer the diffs and ask for a REST snapshot (`FetchSnapshot`; the answer comes back through the
   raw topic, in order with the diffs);
2. drop the buffered diffs the snapshot already holds (spot `u <= lastUpdateId`, USD-M `u < lastUpdateId`);
3. the first diff left must straddle the snapshot (spot `U <= lastUpdateId + 1 <= u`, USD-M
   `U <= lastUpdateId <= u`): if it does not, the snapshot is older than the buffered diffs and
   another one is asked for (`stale-snapshot`);
4. from then on spot diffs chain by `U <= previous u + 1` (a diff wholly before the book is ignored),
   USD-M diffs by `pu == previous u`.

Whole books (Upbit, Bithumb, `WholeBookLine`): every message is the top-N book and its id the
orderbook timestamp; a book at or below the last id is dropped, any other replaces the book.

A line resyncs (a new snapshot, the diffs buffered again) on a broken chain (`sequence-break`), a
crossed book (`crossed-book`, and the diff is dead-lettered), an invalid item (`invalid-item`), a
book that no longer knows its top `levels` (`book-short`), diffs from a connection it has not seen
(`new-connection`: a reconnect or a rollover; the old connection's diffs are ignored from then on),
frames lost on its connection (`lost-frames`), and when it starts (`start`) or starts again after the
worker's partitions moved (`rebalance`). Per symbol, never per connection: a line's break touches no
other line.

What is published: a snapshot record when a line is synced (after every resync too) and then at
least every `snapshot_interval_ms`; otherwise, per diff, an update record with the levels of the top
`levels` that changed since the previous record, whose `lastUpdateId` is its `prevUpdateId`. A line
that resyncs publishes nothing until its next snapshot record, so a broken chain never reaches a
consumer without a snapshot in between.

Snapshots are staggered: lines that need one wait in a queue, and at most `max_in_flight` requests
are out at once; each is released when its answer (or refusal) comes back. The source executing the
requests spends the exchange's REST weight budget one request at a time (agents/rest.py), so a mass
resync (1,000 books after a reconnect) drains at the budget's pace instead of bursting into a 429.

Pure: no clock (every input carries `now`, epoch ms), no I/O; outputs go to the engine's list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from streams.book import BookView, OrderBook, snapshot_data, update_data
from streams.continuity.outputs import BookResync, FetchSnapshot, Output, Publish, RejectFrame
from streams.depth import DepthBook, DepthDiff, DepthSettings, DepthSnapshot
from streams.records import Depth, MarketRecord

START = "start"
REBALANCE = "rebalance"
NEW_CONNECTION = "new-connection"
LOST_FRAMES = "lost-frames"
SEQUENCE_BREAK = "sequence-break"
STALE_SNAPSHOT = "stale-snapshot"
CROSSED = "crossed-book"
INVALID = "invalid-item"
BOOK_SHORT = "book-short"
RESYNC_REASONS = (START, REBALANCE, NEW_CONNECTION, LOST_FRAMES, SEQUENCE_BREAK, STALE_SNAPSHOT,
                  CROSSED, INVALID, BOOK_SHORT)  # fmt: skip


@dataclass(frozen=True)
class BookSettings:
    exchange: str
    levels: int  # levels per side in depth records
    capacity: int  # levels kept per side (the REST snapshot's limit)
    snapshot_interval_ms: int  # a snapshot record at least this often
    whole_books: bool = False  # every message is the whole book (Upbit, Bithumb)
    max_in_flight: int = 4  # snapshot requests out at once, per exchange and worker
    queued_diffs: int = 20  # diffs kept per book while its snapshot request waits in the queue
    buffered_diffs: int = 2_000  # diffs kept per book while its snapshot request is out
    answer_timeout_ms: int = 90_000  # longer than a full minute of the weight budget: asked again
    retry_first_ms: int = 1_000  # after a refused snapshot request, doubling
    retry_max_ms: int = 30_000
    quiet_grace_ms: int = 2_000  # a book with no diff this long gets its periodic snapshot by the clock
    retired_connections: int = 8  # old connections remembered per line (their diffs are ignored)

    @classmethod
    def of(cls, exchange: str, depth: DepthSettings, whole_books: bool, **overrides: Any) -> BookSettings:
        return cls(
            exchange, depth.levels, max(depth.snapshot_limit, depth.levels),
            round(depth.snapshot_interval_seconds * 1000), whole_books, **overrides,
        )  # fmt: skip


Ask = Callable[["BookLine", int], None]
_Buffered = tuple[DepthDiff, Any]  # a diff and its origin (where it came from, for a dead letter)


class BookLine:
    """What every kind of book line shares: its book, its connection and what it published."""

    def __init__(self, symbol: str, group: str, settings: BookSettings, out: list[Output], ask: Ask,
                 now: int, reason: str) -> None:  # fmt: skip
        self.symbol = symbol
        self.group = group
        self.settings = settings
        self.out = out
        self._ask = ask
        self.book = OrderBook(settings.capacity)
        self.synced = False
        self.connection: str | None = None
        self.retired: deque[str] = deque(maxlen=settings.retired_connections)
        self.published: BookView | None = None  # the top levels the last record described
        self.last_record_id: int | None = None  # lastUpdateId of the last record published
        self.first_since_record: int | None = None  # first update id applied since that record
        self.last_snapshot_at = 0  # receipt time (epoch ms) of the last snapshot record
        self.event_time = 0  # exchange time of the book's state
        self.received_at = 0  # receipt time of what the book last applied
        self.changed_at = now  # when the book last applied anything (its age starts here)
        self.heard_at = now  # receipt time of the newest item of the symbol, applied or not
        self.sync_reason = reason
        self.syncing_since = now
        self.wanting = False  # a snapshot is wanted: queued, out, or waiting out a refusal
        self.asked = False  # a snapshot request is out
        self.attempts = 0  # refused or unanswered requests in a row

    # -- connections ------------------------------------------------------------------------------

    def follows(self, connection: str, now: int) -> bool:
        """Whether an item of this connection is for the book; a connection not seen before takes
        over (a reconnect, a rollover: the book resyncs), one it left is ignored."""
        if connection == self.connection:
            return True
        if connection in self.retired:
            return False
        previous, self.connection = self.connection, connection
        if previous is not None:
            self.retired.append(previous)
            self.resync(NEW_CONNECTION, now, f"{previous} → {connection}")
        return True

    # -- what each kind defines -------------------------------------------------------------------

    def resync(self, reason: str, now: int, detail: str = "") -> None:
        raise NotImplementedError

    def snapshot(self, item: DepthSnapshot, now: int) -> str:
        """Apply a REST snapshot: "used", "stale" (older than the buffered diffs), or "unwanted"."""
        return "unwanted"

    # -- publishing -------------------------------------------------------------------------------

    def _emit(self, data: Depth, view: BookView, received_at: int) -> None:
        record = MarketRecord(
            self.settings.exchange, self.symbol, "depth", self.event_time, received_at, data
        )
        self.out.append(Publish(record))
        self.published = view
        self.last_record_id = view.update_id
        self.first_since_record = None

    def publish_snapshot(self, received_at: int) -> None:
        view = self.book.top(self.settings.levels)
        self._emit(snapshot_data(view, self.last_record_id), view, received_at)
        self.last_snapshot_at = received_at

    def publish_change(self, received_at: int) -> None:
        """After a diff: a snapshot when one is due, else the levels that changed (if any did)."""
        if received_at - self.last_snapshot_at >= self.settings.snapshot_interval_ms:
            self.publish_snapshot(received_at)
            return
        before = self.published
        after = self.book.top(self.settings.levels)
        if before is None or before.update_id is None or self.first_since_record is None:
            self.publish_snapshot(received_at)
        elif after.bids != before.bids or after.asks != before.asks:
            self._emit(update_data(before, after, self.first_since_record), after, received_at)

    def _started_syncing(self, reason: str, now: int, detail: str) -> None:
        self.synced = False
        self.sync_reason, self.syncing_since = reason, now
        self.out.append(BookResync(self.symbol, reason, now, detail))

    # -- views ------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return "synced" if self.synced else "syncing"

    def view(self, levels: int) -> dict[str, Any]:
        top = self.book.top(levels)
        return {
            "exchange": self.settings.exchange,
            "symbol": self.symbol,
            "state": self.state,
            "updateId": None if top.update_id is None or not self.synced else str(top.update_id),
            "lastRecordId": None if self.last_record_id is None else str(self.last_record_id),
            "eventTime": self.event_time or None,
            "receivedAt": self.received_at or None,
            "bids": list(top.bids.values()) if self.synced else [],
            "asks": list(top.asks.values()) if self.synced else [],
            "levels": levels,  # asked for; a side shows fewer when the book knows fewer
            "publishedLevels": self.settings.levels,  # per side in depth records
            "capacity": self.settings.capacity,  # kept per side
            "syncReason": self.sync_reason,
            "syncingSince": None if self.synced else self.syncing_since,
        }


class DiffBookLine(BookLine):
    """A book made of a REST snapshot and the diffs after it (Binance spot: `U`/`u`; USD-M: `pu`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer: deque[_Buffered] = deque()
        self.first_pending = False  # the next diff applied is the first after the snapshot

    def diff(self, item: DepthDiff, origin: Any, connection: str, now: int) -> None:
        self.heard_at = max(self.heard_at, item.received_at)
        if not self.follows(connection, now):
            return
        if not self.synced:
            if not self.wanting:
                self._started_syncing(self.sync_reason, now, "")
                self._ask(self, now)
            self._buffer(item, origin)
            return
        if self._continue(item, origin, now):
            self.publish_change(item.received_at)

    def _buffer(self, item: DepthDiff, origin: Any) -> None:
        buffer = self.buffer
        buffer.append((item, origin))
        limit = self.settings.buffered_diffs if self.asked else self.settings.queued_diffs
        while len(buffer) > limit:
            buffer.popleft()  # a snapshot taken later holds them anyway

    def _continue(self, item: DepthDiff, origin: Any, now: int) -> bool:
        """Apply a diff to the synced book if it continues it; True when the book changed."""
        book_id = self.book.update_id
        assert book_id is not None
        first, last, chained = item.first_update_id, item.last_update_id, item.prev_update_id is not None
        if self.first_pending:
            if last < book_id or (last == book_id and not chained):
                return False  # the snapshot holds it already
            straddles = first <= book_id <= last if chained else first <= book_id + 1 <= last
            if not straddles:
                self._break(
                    item, origin, now, f"first diff {first}..{last} does not continue snapshot {book_id}"
                )
                return False
        elif last <= book_id:
            return False  # wholly before the book: already applied
        elif chained and item.prev_update_id != book_id:
            self._break(item, origin, now, f"pu {item.prev_update_id} after u {book_id}")
            return False
        elif not chained and first > book_id + 1:
            self._break(item, origin, now, f"U {first} after u {book_id}")
            return False
        return self._apply(item, origin, now)

    def _apply(self, item: DepthDiff, origin: Any, now: int) -> bool:
        book = self.book
        book.apply(item.bids, item.asks, item.last_update_id)
        self.first_pending = False
        if self.first_since_record is None:
            floor = -1 if self.last_record_id is None else self.last_record_id
            self.first_since_record = max(item.first_update_id, floor + 1)
        self.event_time, self.received_at = item.event_time, item.received_at
        self.changed_at = item.received_at
        if book.crossed():
            bid, ask = book.best_bid() or ("-", ""), book.best_ask() or ("-", "")
            detail = f"best bid {bid[0]} not below best ask {ask[0]} after u {item.last_update_id}"
            self.out.append(RejectFrame(self.symbol, CROSSED, detail, origin))
            self.resync(CROSSED, now, detail)
            return False
        # A book with room below its levels knows them all, or must sync again; one whose snapshot is
        # no deeper than its levels (the exchange's deepest) publishes the levels it knows.
        if self.settings.capacity > self.settings.levels and not book.holds(self.settings.levels):
            self.resync(
                BOOK_SHORT, now, f"fewer than {self.settings.levels} known levels at u {item.last_update_id}"
            )
            return False
        return True

    def _break(self, item: DepthDiff, origin: Any, now: int, detail: str) -> None:
        """The diffs do not continue the book: sync again, from this diff on."""
        self.resync(SEQUENCE_BREAK, now, detail)
        self._buffer(item, origin)

    def resync(self, reason: str, now: int, detail: str = "") -> None:
        if reason in (NEW_CONNECTION, LOST_FRAMES, CROSSED, INVALID):
            self.buffer.clear()  # what is buffered cannot be trusted to continue anything
        if not self.synced and self.wanting:
            return  # a snapshot is asked for already: its answer is checked against what comes next
        self.book.clear()
        self.first_pending = False
        self._started_syncing(reason, now, detail)
        self._ask(self, now)

    def snapshot(self, item: DepthSnapshot, now: int) -> str:
        if self.synced:
            return "unwanted"  # a late answer (asked twice), or one a replay of the raw topic repeats
        snapshot_id = item.last_update_id
        kept = [(d, o) for d, o in self.buffer if not _held_by(d, snapshot_id)]
        if kept:
            first = kept[0][0]
            chained = first.prev_update_id is not None
            straddles = first.first_update_id <= (snapshot_id if chained else snapshot_id + 1)
            if not straddles:
                self.buffer = deque(kept)
                return "stale"
        self.buffer.clear()
        self.book.replace(item.bids, item.asks, snapshot_id, item.limit)
        self.event_time, self.received_at = item.event_time, item.received_at
        self.changed_at = item.received_at
        self.first_pending = True
        self.synced, self.wanting, self.asked, self.attempts = True, False, False, 0
        for index, (diff, origin) in enumerate(kept):
            self._continue(diff, origin, now)
            if not self.synced:  # the buffered diffs broke the chain: they wait for the next snapshot
                for later, later_origin in kept[index + 1 :]:
                    self._buffer(later, later_origin)
                return "used"
        if self.synced and self.book.crossed():  # validation refuses crossed snapshots: belt and braces
            self.resync(CROSSED, now, f"snapshot {snapshot_id} is crossed")
        if self.synced:
            self.publish_snapshot(max(item.received_at, self.received_at))
        return "used"

    def quiet(self, now: int) -> None:
        """A synced book with no diff for a while still gets its periodic snapshot."""
        grace = self.settings.quiet_grace_ms
        if (
            self.synced
            and now - self.last_snapshot_at >= self.settings.snapshot_interval_ms + grace
            and now - self.received_at >= grace
        ):
            self.publish_snapshot(self.received_at)
            self.last_snapshot_at = now


def _held_by(diff: DepthDiff, snapshot_id: int) -> bool:
    """Whether a snapshot at `snapshot_id` already holds the diff (USD-M keeps `u == lastUpdateId`)."""
    if diff.prev_update_id is not None:
        return diff.last_update_id < snapshot_id
    return diff.last_update_id <= snapshot_id


class WholeBookLine(BookLine):
    """Every message is the whole top-N book (Upbit, Bithumb); ids are their orderbook timestamps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_id: int | None = None  # the newest book's id: books at or below it are repeats

    def whole(self, item: DepthBook, origin: Any, connection: str, now: int) -> None:
        self.heard_at = max(self.heard_at, item.received_at)
        if not self.follows(connection, now):
            return
        if self.last_id is not None and item.update_id <= self.last_id:
            return  # a repeat (a new connection's first book) or one out of order
        self.last_id = item.update_id
        self.book.replace(item.bids, item.asks, item.update_id)
        self.event_time, self.received_at, self.changed_at = (
            item.event_time,
            item.received_at,
            item.received_at,
        )
        if self.book.crossed():
            detail = f"book {item.update_id} is crossed"
            self.out.append(RejectFrame(self.symbol, CROSSED, detail, origin))
            self.resync(CROSSED, now, detail)
            return
        if not self.synced:
            self.synced = True
        self.publish_snapshot(item.received_at)

    def resync(self, reason: str, now: int, detail: str = "") -> None:
        """Nothing to ask for: the next message is a whole book. A new connection changes nothing:
        the book it replaces is still the newest whole book known (and a quiet symbol's first book on
        the new connection repeats it)."""
        if reason == NEW_CONNECTION:
            return
        if self.synced:
            self.book.clear()
            self._started_syncing(reason, now, detail)
        elif self.last_id is None:
            self._started_syncing(reason, now, detail)

    def quiet(self, now: int) -> None:
        """Every record is a snapshot already."""


class Books:
    """Every book line of one exchange on this worker, and the queue of their snapshot requests."""

    def __init__(self, settings: BookSettings, out: list[Output], next_request_id: Callable[[], str]) -> None:
        self.settings = settings
        self.out = out
        self._next_request_id = next_request_id
        self.lines: dict[str, DiffBookLine | WholeBookLine] = {}
        self.queue: deque[str] = deque()  # symbols whose snapshot request waits for a free slot
        self.in_flight: dict[str, tuple[str, int]] = {}  # symbol → (request id, asked at)
        self.waiting: dict[str, int] = {}  # symbol → when its refused request may be asked again
        self.first_reason = START
        self.requests = 0  # snapshot requests issued

    # -- inputs -----------------------------------------------------------------------------------

    def line(self, symbol: str, group: str, now: int) -> DiffBookLine | WholeBookLine:
        line = self.lines.get(symbol)
        if line is None:
            kind = WholeBookLine if self.settings.whole_books else DiffBookLine
            line = kind(symbol, group, self.settings, self.out, self._ask, now, self.first_reason)
            self.lines[symbol] = line
        else:
            line.group = group
        return line

    def item(self, item: DepthDiff | DepthBook, origin: Any, group: str, connection: str, now: int) -> None:
        line = self.line(item.symbol, group, now)
        if isinstance(item, DepthDiff):
            if isinstance(line, DiffBookLine):
                line.diff(item, origin, connection, now)
        elif isinstance(line, WholeBookLine):
            line.whole(item, origin, connection, now)

    def snapshot(self, item: DepthSnapshot, request_id: str | None, now: int) -> None:
        """A REST snapshot answer. Any answer for a syncing book is used, whichever request asked for
        it, so replaying the raw topic (with other request ids) makes the same decisions."""
        line = self.lines.get(item.symbol)
        if line is None:
            return
        asked = self.in_flight.pop(item.symbol, None)
        line.asked = False
        outcome = line.snapshot(item, now)
        if outcome == "stale":
            line.wanting = False
            line._started_syncing(
                STALE_SNAPSHOT, now, f"snapshot {item.last_update_id} is older than the buffered diffs"
            )
            self._ask(line, now)
        elif outcome == "used" and line.synced:
            self.waiting.pop(item.symbol, None)
        if asked is not None or outcome != "unwanted":
            self.release(now)

    def invalid(
        self, symbol: str, group: str, reason: str, detail: str, now: int, answer: bool = False
    ) -> None:
        """An item of this symbol that failed validation (dead-lettered by the caller): the book missed
        something. `answer`: it was a snapshot answer, whose request is settled."""
        kind = CROSSED if reason == CROSSED else INVALID
        if answer:
            line = self.lines.get(symbol)
            if line is not None and self.in_flight.pop(symbol, None) is not None:
                line.asked = False
                self._refused(line, 0, now)
                self.out.append(BookResync(symbol, kind, now, detail))
                self.release(now)
            return  # an answer nobody waits for changes nothing
        self.line(symbol, group, now).resync(kind, now, detail)

    def lost_frames(self, connection: str, now: int) -> None:
        for line in self.lines.values():
            if line.connection == connection and isinstance(line, DiffBookLine):
                line.resync(LOST_FRAMES, now, f"frames lost on {connection}")

    def refused(self, symbol: str, request_id: str, retry_after_ms: int, now: int) -> bool:
        """The source could not get a snapshot; False when the request is not a book's."""
        asked = self.in_flight.get(symbol)
        if asked is None or asked[0] != request_id:
            return False
        del self.in_flight[symbol]
        line = self.lines.get(symbol)
        if line is not None:
            line.asked = False
            self._refused(line, retry_after_ms, now)
        self.release(now)
        return True

    def tick(self, now: int) -> None:
        timeout = self.settings.answer_timeout_ms
        for symbol, (_, asked_at) in list(self.in_flight.items()):
            if now - asked_at >= timeout:
                del self.in_flight[symbol]
                line = self.lines.get(symbol)
                if line is not None:
                    line.asked = False
                    self._refused(line, 0, now)  # the answer was lost: ask again after a pause
        for symbol, not_before in list(self.waiting.items()):
            if now >= not_before:
                del self.waiting[symbol]
                line = self.lines.get(symbol)
                if line is not None and line.wanting and not line.synced:
                    self.queue.append(symbol)
        self.release(now)
        for line in self.lines.values():
            line.quiet(now)

    def forget(self) -> None:
        """Partitions moved: the books start over (as a `rebalance`) from the next diffs."""
        self.lines.clear()
        self.queue.clear()
        self.in_flight.clear()
        self.waiting.clear()
        self.first_reason = REBALANCE

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop the books of symbols no longer subscribed to depth."""
        for symbol in [s for s in self.lines if not keep(s)]:
            del self.lines[symbol]
            self.in_flight.pop(symbol, None)
            self.waiting.pop(symbol, None)

    # -- the snapshot queue -----------------------------------------------------------------------

    def _ask(self, line: BookLine, now: int) -> None:
        if line.wanting:
            return
        line.wanting = True
        self.queue.append(line.symbol)
        self.release(now)

    def _refused(self, line: BookLine, retry_after_ms: int, now: int) -> None:
        line.attempts += 1
        pause = min(self.settings.retry_max_ms, self.settings.retry_first_ms * 2 ** (line.attempts - 1))
        self.waiting[line.symbol] = now + max(retry_after_ms, pause)

    def release(self, now: int) -> None:
        """Issue queued snapshot requests while fewer than `max_in_flight` are out."""
        queue, in_flight = self.queue, self.in_flight
        while queue and len(in_flight) < self.settings.max_in_flight:
            symbol = queue.popleft()
            line = self.lines.get(symbol)
            if (
                line is None
                or line.synced
                or not line.wanting
                or symbol in in_flight
                or symbol in self.waiting
            ):
                continue  # synced meanwhile (an answer came first), dropped, or already asked
            request_id = self._next_request_id()
            in_flight[symbol] = (request_id, now)
            line.asked = True
            self.requests += 1
            self.out.append(FetchSnapshot(request_id, symbol, line.group, line.sync_reason))

    # -- views ------------------------------------------------------------------------------------

    def states(self) -> dict[str, tuple[str, int]]:
        """Symbol → (state, receipt time of the book's newest item): a syncing book is not silent."""
        return {symbol: (line.state, line.heard_at) for symbol, line in self.lines.items()}

    def progress(self) -> dict[str, int]:
        synced = sum(1 for line in self.lines.values() if line.synced)
        return {
            "synced": synced,
            "syncing": len(self.lines) - synced,
            "queued": sum(1 for s in self.queue if (line := self.lines.get(s)) is not None and line.wanting),
            "inFlight": len(self.in_flight),
            "waiting": len(self.waiting),
        }

    def ages(self, now: int) -> Iterator[tuple[str, str, float]]:
        """(symbol, state, seconds since the book last applied anything) per book."""
        for symbol, line in self.lines.items():
            yield symbol, line.state, max(now - line.changed_at, 0) / 1000.0

    def view(self, symbol: str, levels: int) -> dict[str, Any] | None:
        line = self.lines.get(symbol)
        return None if line is None else line.view(levels)
