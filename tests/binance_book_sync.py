"""Binance's documented local order book procedure, for tests (exchange-protocols.md §1.5, §2.5).

A small pure helper so tests can show that recorded and simulated diff streams line up with their
REST snapshots. The collector's own procedure lives in the depth engine; this one is only as much as
the documentation says, per symbol:

1. buffer the diffs until a snapshot is applied;
2. a snapshot older than the first buffered diff (spot: `lastUpdateId < U`) cannot be used: fetch again;
3. drop buffered diffs that the snapshot already holds (spot `u <= lastUpdateId`, USD-M `u < lastUpdateId`);
4. the first diff applied must straddle the snapshot (spot `U <= lastUpdateId + 1 <= u`, USD-M
   `U <= lastUpdateId <= u`);
5. after it, spot diffs chain by `U == previous u + 1`, USD-M diffs by `pu == previous u`; a diff
   wholly before the book's id is ignored.

Anything else raises `ChainBroken`: the book must be synced again.
"""

from __future__ import annotations

from streams.book import OrderBook
from streams.depth import DepthDiff, DepthSnapshot


class ChainBroken(Exception):
    """The diffs do not continue the book: resync."""


class StaleSnapshot(Exception):
    """The snapshot is older than the diffs buffered before it: fetch another one."""


class BinanceBookSync:
    def __init__(self, capacity: int, *, chained_by_previous_id: bool) -> None:
        self.book = OrderBook(capacity)
        self.futures = chained_by_previous_id  # USD-M: `pu`; spot: `U`
        self.buffered: list[DepthDiff] = []
        self.synced = False
        self.applied = 0
        self._last_u: int | None = None  # the last applied diff's u; None until the first one

    def on_diff(self, diff: DepthDiff) -> bool:
        """Buffer or apply one diff; True when it changed the book."""
        if not self.synced:
            self.buffered.append(diff)
            return False
        return self._apply(diff)

    def on_snapshot(self, snapshot: DepthSnapshot) -> None:
        if self.buffered and snapshot.last_update_id < self.buffered[0].first_update_id - (
            0 if self.futures else 1
        ):
            raise StaleSnapshot(f"snapshot {snapshot.last_update_id}, first diff {self.buffered[0]}")
        self.book.replace(snapshot.bids, snapshot.asks, snapshot.last_update_id, snapshot.limit)
        self.synced = True
        self._last_u = None
        buffered, self.buffered = self.buffered, []
        for diff in buffered:
            self._apply(diff)

    def _apply(self, diff: DepthDiff) -> bool:
        book_id = self.book.update_id
        assert book_id is not None
        first, last = diff.first_update_id, diff.last_update_id
        if self._last_u is None:  # the first diff after the snapshot
            if (last < book_id) if self.futures else (last <= book_id):
                return False  # already in the snapshot
            straddles = first <= book_id <= last if self.futures else first <= book_id + 1 <= last
            if not straddles:
                raise ChainBroken(f"first diff {first}..{last} does not continue snapshot {book_id}")
        elif self.futures:
            if diff.prev_update_id != self._last_u:
                raise ChainBroken(f"pu {diff.prev_update_id} after u {self._last_u}")
        else:
            if last <= book_id:
                return False  # wholly before the book's id
            if first != self._last_u + 1:
                raise ChainBroken(f"U {first} after u {self._last_u}")
        self.book.apply(diff.bids, diff.asks, last)
        self._last_u = last
        self.applied += 1
        return True
