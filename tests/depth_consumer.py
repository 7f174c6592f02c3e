"""A downstream consumer of `market.depth.*`, for tests: it rebuilds a book from the records the way the
README tells consumers to (start at a snapshot, apply updates in order, check the `prevUpdateId`
chain), and says where the chain broke.
"""

from __future__ import annotations

from decimal import Decimal

from streams.records import Depth, MarketRecord


class ChainBroken(AssertionError):
    """An update whose prevUpdateId is not the previous record's lastUpdateId."""


class RebuiltBook:
    def __init__(self) -> None:
        self.bids: dict[Decimal, tuple[str, str]] = {}
        self.asks: dict[Decimal, tuple[str, str]] = {}
        self.last_id: str | None = None
        self.synced = False
        self.snapshots = 0
        self.updates = 0
        self.crossed = 0  # records after which the rebuilt book was crossed

    def apply(self, record: MarketRecord) -> None:
        data = record.data
        assert isinstance(data, Depth), record
        if data.snapshot:
            self.bids = {Decimal(price): (price, qty) for price, qty in data.bids}
            self.asks = {Decimal(price): (price, qty) for price, qty in data.asks}
            self.synced = True
            self.snapshots += 1
        elif self.synced:
            if data.prev_update_id != self.last_id:
                raise ChainBroken(
                    f"update {data.last_update_id} follows {data.prev_update_id}, not {self.last_id}"
                )
            for side, levels in ((self.bids, data.bids), (self.asks, data.asks)):
                for price, qty in levels:
                    if Decimal(qty) == 0:
                        side.pop(Decimal(price), None)
                    else:
                        side[Decimal(price)] = (price, qty)
            self.updates += 1
        else:
            return  # joined mid-stream: wait for a snapshot
        self.last_id = data.last_update_id
        if self.bids and self.asks and max(self.bids) >= min(self.asks):
            self.crossed += 1

    def top(self, levels: int) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        """The best `levels` of each side as exact numbers (spellings may differ from the truth's)."""
        bids = [(price, Decimal(self.bids[price][1])) for price in sorted(self.bids, reverse=True)[:levels]]
        asks = [(price, Decimal(self.asks[price][1])) for price in sorted(self.asks)[:levels]]
        return bids, asks


def exact(levels: list[list[str]] | list[tuple[str, str]]) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(str(price)), Decimal(str(qty))) for price, qty in levels]
