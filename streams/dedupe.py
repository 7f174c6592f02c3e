"""What a market topic already holds: the floor below which a trade id is a repeat.

The validator (streams/validation.py) dedupes trades by id within one normalize agent's lifetime.
When a raw partition moves to another worker, or a worker restarts, the new agent's memory is
empty, yet raw records after the last committed offset are delivered again and the market topic may
already hold their trades. The normalize agent therefore reads each trade topic's last id when it
starts (and after partitions move) and drops any trade at or below it.

Trades reach the market topics in id order per symbol (the source writes backfill before the held
frames of a new connection), so everything up to that id has been published already.
"""

from __future__ import annotations


class PublishedFloor:
    def __init__(self) -> None:
        self._floor: dict[str, int] = {}
        self.seeded = False

    def seed(self, last_published: dict[str, int]) -> None:
        self._floor = dict(last_published)
        self.seeded = True

    def already_published(self, symbol: str, trade_id: int) -> bool:
        floor = self._floor.get(symbol)
        return floor is not None and trade_id <= floor

    def forget(self) -> None:
        """Partitions moved: another worker may have published since; read the topics again."""
        self._floor.clear()
        self.seeded = False
