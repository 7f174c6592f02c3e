"""REST request limits counted per client and group, the way Upbit and Bithumb enforce them.

Upbit allows 10 quotation requests per second per IP in each group (market, candle, trade, ticker,
orderbook); Bithumb 150 per second per category (candle, orderbook, ticker, trade, other). A request
over the limit is refused with 429 (and not counted against the window); a client that keeps drawing
429s is banned for a while, which Upbit answers with 418 (exchange-protocols.md §3.2, §4.1).

Pure: the caller passes the time, so the rules are tested without a clock or a socket.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "over", "banned"]


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    remaining: int  # requests left in this second for the group (0 unless served)
    ban_left: float = 0.0  # seconds of ban left, when banned


class GroupRateLimit:
    """`per_second` requests per (client, group) in any rolling second; a ban after `ban_after`
    refusals within `ban_window` seconds (None: never banned)."""

    def __init__(
        self, per_second: int, *, ban_after: int | None, ban_seconds: float, ban_window: float = 60.0
    ) -> None:
        self.per_second = per_second
        self.ban_after = ban_after
        self.ban_seconds = ban_seconds
        self.ban_window = ban_window
        self._calls: dict[tuple[str, str], deque[float]] = {}
        self._refusals: dict[str, deque[float]] = {}
        self._banned_until: dict[str, float] = {}

    def check(self, client: str, group: str, now: float) -> Verdict:
        """Count one request; whether it is served, over the limit, or from a banned client."""
        banned_until = self._banned_until.get(client, 0.0)
        if now < banned_until:
            return Verdict("banned", 0, banned_until - now)
        calls = self._calls.setdefault((client, group), deque())
        while calls and calls[0] <= now - 1.0:
            calls.popleft()
        if len(calls) < self.per_second:
            calls.append(now)
            return Verdict("ok", self.per_second - len(calls))
        refusals = self._refusals.setdefault(client, deque())
        while refusals and refusals[0] <= now - self.ban_window:
            refusals.popleft()
        refusals.append(now)
        if self.ban_after is not None and len(refusals) >= self.ban_after:
            self._banned_until[client] = now + self.ban_seconds
            refusals.clear()
        return Verdict("over", 0)

    def banned(self, now: float) -> dict[str, float]:
        """Client → seconds of ban left."""
        return {client: until - now for client, until in self._banned_until.items() if until > now}

    def clear(self) -> None:
        """Forget bans and recent refusals (a test's `/_sim/faults/clear`); the request windows stay."""
        self._refusals.clear()
        self._banned_until.clear()
