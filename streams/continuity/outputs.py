"""What the continuity engine tells its caller to do: a msgspec tagged union, drained after each input.

The engine never writes anything itself. Its caller (the normalize agent) publishes, dead-letters,
reports gaps and hands history requests to the source that runs the symbol's connection group.
`origin` is the caller's own handle on where a record came from (its raw record, to acknowledge once
the record's fate is settled); the engine only carries it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from streams.records import MarketRecord

GapOutcome = Literal["repaired", "unrecoverable"]


class Publish(msgspec.Struct, tag="publish", frozen=True, gc=False):
    """Write the record to its market topic. `origins`: the live records it settles (none for history).

    One per published record: untracked by the garbage collector (gc=False), as the caller's origins
    hold no reference back to it."""

    record: MarketRecord
    origins: tuple[Any, ...] = ()


class Reject(msgspec.Struct, tag="reject", frozen=True):
    """Dead-letter the record with this reason; it is not published."""

    record: MarketRecord
    reason: str
    detail: str
    origin: Any = None


class Drop(msgspec.Struct, tag="drop", frozen=True):
    """The record was delivered before (a repeat): nothing to write, its origin is settled."""

    origin: Any = None


class FetchTrades(msgspec.Struct, tag="fetch-trades", frozen=True):
    """Ask the exchange's REST history for trades of `symbol`.

    `from_id`: trades from this id on (exchanges whose ids increase). Otherwise the newest page, or with
    `cursor` the page before that trade id (history that only pages backwards). The answer comes back
    through the raw topic tagged with `request_id`; the source running `group` executes it.
    """

    request_id: str
    symbol: str
    group: str
    from_id: int | None = None
    cursor: str | None = None
    reason: str = ""


class GapClosed(msgspec.Struct, tag="gap", frozen=True):
    """A gap in a symbol's trades, once it is settled: repaired from history, or not repairable.

    Ids are exact where the exchange's ids count trades (`first_missing_id`..`last_missing_id`,
    `missing`); where they do not, the gap is the time window `after_time`..`before_time` and
    `missing` counts what history delivered (`None` when unrecoverable: unknown).
    """

    symbol: str
    data_type: str
    outcome: GapOutcome
    reason: str
    detected_at: int
    settled_at: int
    after_time: int | None
    before_time: int | None
    first_missing_id: str | None = None
    last_missing_id: str | None = None
    missing: int | None = None
    repaired: int = 0
    requests: int = 0
    detail: str = ""


class FetchSnapshot(msgspec.Struct, tag="fetch-snapshot", frozen=True):
    """Ask the exchange's REST order book of `symbol` (the adapter's `depth_snapshot_request`). The
    answer comes back through the raw topic tagged with `request_id`; the source running `group`
    executes it. `reason` is why the book syncs (streams/continuity/books.py)."""

    request_id: str
    symbol: str
    group: str
    reason: str = ""


class BookResync(msgspec.Struct, tag="book-resync", frozen=True):
    """A book started syncing (again): it publishes nothing until its next snapshot record."""

    symbol: str
    reason: str  # one of streams.continuity.books.RESYNC_REASONS
    at: int
    detail: str = ""


class RejectFrame(msgspec.Struct, tag="reject-frame", frozen=True):
    """Dead-letter the frame an order book item came in (`origin`, the caller's handle) with this reason."""

    symbol: str
    reason: str
    detail: str
    origin: Any = None


Output = Publish | Reject | Drop | FetchTrades | GapClosed | FetchSnapshot | BookResync | RejectFrame
FetchRequest = FetchTrades | FetchSnapshot
