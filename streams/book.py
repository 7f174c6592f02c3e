"""A pure order book: exact decimal prices, bounded per side, and the diffs that depth records carry.

Prices and quantities stay the exchange's decimal strings; only the ordering uses a number, the exact
integer `price_key` (the price times 10^18), never a float. A side keeps at most `capacity` levels,
best first.

What the book knows. Binance's snapshots and this book are bounded, but the exchange's book is not:
levels past a truncated snapshot's last one, or pushed out because the side is full, are unknown,
and a diff that later touches them says nothing about their neighbours. So each side remembers
`limit`, the first price it does not know (None: it knows the whole side). Levels at or past the
limit are ignored when a diff sets them, and the side holds exactly the exchange's levels better than
the limit. When levels near the top are removed the side holds fewer levels, never wrong ones; it
fills again only with levels the exchange adds, or with a new snapshot. `holds(n)` tells whether the
top n levels of both sides are known (what a caller publishing n levels checks before it does).

Levels must have passed validation first (`streams.validation.depth_problem`); a price or quantity
that is not a plain decimal raises ValueError here rather than entering the book.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from typing import NamedTuple

from streams.records import Depth

Level = tuple[str, str]  # (price, quantity) exactly as the exchange wrote them
PRICE_DECIMALS = 18  # the most fractional digits a price may have: keys are the price times 10^18
_SCALE = [10 ** (PRICE_DECIMALS - decimals) for decimals in range(PRICE_DECIMALS + 1)]


def price_key(price: str) -> int:
    """The exact integer order of a plain decimal price (`"0.3513"` → 351300000000000000)."""
    whole, _, fraction = price.partition(".")
    digits, decimals = whole + fraction, len(fraction)
    if decimals > PRICE_DECIMALS or not (digits.isdigit() and digits.isascii()):
        raise ValueError(f"price {price!r} is not a plain decimal with at most {PRICE_DECIMALS} decimals")
    return int(digits) * _SCALE[decimals]


def is_zero(quantity: str) -> bool:
    """Whether a plain decimal quantity is zero (`"0"`, `"0.00000000"`): the level is removed."""
    digits = quantity.replace(".", "", 1)
    if not (digits.isdigit() and digits.isascii()):
        raise ValueError(f"quantity {quantity!r} is not a plain decimal")
    return not digits.strip("0")


class _Side:
    """One side of the book. Keys are price keys, negated for bids, so ascending order is best first."""

    __slots__ = ("capacity", "levels", "limit", "order", "sign")

    def __init__(self, sign: int, capacity: int) -> None:
        self.sign = sign
        self.capacity = capacity
        self.levels: dict[int, Level] = {}
        self.order: list[int] = []  # the keys of `levels`, best first
        self.limit: int | None = None  # the first key not known; None: the whole side is known

    def set(self, price: str, quantity: str) -> None:
        key = price_key(price) * self.sign
        levels = self.levels
        if is_zero(quantity):
            if levels.pop(key, None) is not None:
                order = self.order
                del order[bisect_left(order, key)]
            return  # removing a level the book does not hold is normal
        if key in levels:
            levels[key] = (price, quantity)
            return
        limit = self.limit
        if limit is not None and key >= limit:
            return  # past what the book knows: holding it would suggest the levels before it are known
        levels[key] = (price, quantity)
        order = self.order
        insort(order, key)
        if len(order) > self.capacity:
            self._drop_worst()

    def replace(self, levels: Iterable[Level], truncated_at: int | None) -> None:
        """The side as a snapshot gives it; `truncated_at`: the snapshot's level count limit, if any."""
        fresh: dict[int, Level] = {}
        count = 0
        for price, quantity in levels:
            count += 1
            key = price_key(price) * self.sign
            if is_zero(quantity):
                fresh.pop(key, None)
            else:
                fresh[key] = (price, quantity)
        self.levels = fresh
        self.order = sorted(fresh)
        # A snapshot that filled its limit may have stopped short of the exchange's book.
        cut_short = truncated_at is not None and count >= truncated_at and fresh
        self.limit = self.order[-1] + 1 if cut_short else None
        while len(self.order) > self.capacity:
            self._drop_worst()

    def _drop_worst(self) -> None:
        worst = self.order.pop()
        del self.levels[worst]
        self.limit = worst  # it and everything past it are no longer known

    def top(self, count: int) -> dict[int, Level]:
        levels = self.levels
        return {key: levels[key] for key in self.order[:count]}


class BookView(NamedTuple):
    """The top levels of a book at one update id, best first (keys: internal order, see price_key)."""

    update_id: int | None
    bids: dict[int, Level]
    asks: dict[int, Level]


class OrderBook:
    """One symbol's book. Not thread-safe; about 300 bytes per level (README, "Order books")."""

    __slots__ = ("_asks", "_bids", "capacity", "update_id")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 level per side")
        self.capacity = capacity
        self.update_id: int | None = None  # None until the first snapshot
        self._bids = _Side(-1, capacity)
        self._asks = _Side(1, capacity)

    def replace(
        self, bids: Iterable[Level], asks: Iterable[Level], update_id: int, truncated_at: int | None = None
    ) -> None:
        """Become a snapshot. `truncated_at` is the level count the snapshot was asked for (Binance's
        `limit`): a side that has that many levels may be cut short, so what lies past it is unknown.
        None for a snapshot that is the exchange's whole book (Upbit's top-N messages replace the book
        and are all that is published)."""
        self._bids.replace(bids, truncated_at)
        self._asks.replace(asks, truncated_at)
        self.update_id = update_id

    def apply(self, bids: Iterable[Level], asks: Iterable[Level], update_id: int) -> None:
        """Apply one diff: each level's quantity replaces the book's; a zero quantity removes the level."""
        bid_side, ask_side = self._bids, self._asks
        for price, quantity in bids:
            bid_side.set(price, quantity)
        for price, quantity in asks:
            ask_side.set(price, quantity)
        self.update_id = update_id

    def clear(self) -> None:
        self._bids = _Side(-1, self.capacity)
        self._asks = _Side(1, self.capacity)
        self.update_id = None

    def best_bid(self) -> Level | None:
        order = self._bids.order
        return self._bids.levels[order[0]] if order else None

    def best_ask(self) -> Level | None:
        order = self._asks.order
        return self._asks.levels[order[0]] if order else None

    def crossed(self) -> bool:
        """Whether the best bid is at or above the best ask: a book no exchange can have."""
        bids, asks = self._bids.order, self._asks.order
        return bool(bids and asks) and -bids[0] >= asks[0]

    @property
    def depth(self) -> tuple[int, int]:
        """Levels held: (bids, asks)."""
        return len(self._bids.order), len(self._asks.order)

    @property
    def complete(self) -> tuple[bool, bool]:
        """Whether each side holds the exchange's whole side (nothing past its levels is unknown)."""
        return self._bids.limit is None, self._asks.limit is None

    def holds(self, levels: int) -> bool:
        """Whether the top `levels` of each side are known: it holds that many, or the whole side."""
        return all(len(side.order) >= levels or side.limit is None for side in (self._bids, self._asks))

    def top(self, levels: int) -> BookView:
        return BookView(self.update_id, self._bids.top(levels), self._asks.top(levels))


def diff_views(before: BookView, after: BookView) -> tuple[list[Level], list[Level]]:
    """The levels that change `before` into `after`, best first per side: new or changed levels with
    their quantity, levels gone (removed, or pushed out of the view) with quantity "0"."""
    return _diff_side(before.bids, after.bids), _diff_side(before.asks, after.asks)


def _diff_side(before: dict[int, Level], after: dict[int, Level]) -> list[Level]:
    changed = [(key, level) for key, level in after.items() if before.get(key) != level]
    changed += [(key, (level[0], "0")) for key, level in before.items() if key not in after]
    changed.sort()
    return [level for _, level in changed]


def snapshot_data(view: BookView, prev_update_id: int | None) -> Depth:
    """A snapshot record's data: the whole view at its update id (firstUpdateId = lastUpdateId)."""
    if view.update_id is None:
        raise ValueError("a book without an update id has no snapshot")
    last = str(view.update_id)
    return Depth(
        snapshot=True,
        first_update_id=last,
        last_update_id=last,
        prev_update_id=None if prev_update_id is None else str(prev_update_id),
        bids=list(view.bids.values()),
        asks=list(view.asks.values()),
    )


def update_data(before: BookView, after: BookView, first_update_id: int) -> Depth:
    """An update record's data: what changed since `before`, the view the previous record described."""
    if before.update_id is None or after.update_id is None:
        raise ValueError("an update needs the update ids of both views")
    bids, asks = diff_views(before, after)
    return Depth(
        snapshot=False,
        first_update_id=str(first_update_id),
        last_update_id=str(after.update_id),
        prev_update_id=str(before.update_id),
        bids=bids,
        asks=asks,
    )
