"""Pure rate limiting for connection management: backoff, attempt windows, message pacing, REST weight.

Nothing here reads a clock or sleeps: callers pass `now` (monotonic seconds) and wait the delays these
return, so every decision is unit-testable. Each limiter keeps a safety share of the exchange's
published limit, because the exchange counts things we cannot see (our pongs, other processes).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

SAFETY_SHARE = 0.5  # of a published limit we allow ourselves


class Backoff:
    """Exponential backoff with jitter (first, doubling to cap), reset once a connection was stable."""

    def __init__(
        self,
        first: float = 1.0,
        cap: float = 30.0,
        stable_after: float = 60.0,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.first, self.cap, self.stable_after = first, cap, stable_after
        self.current = first
        self._uniform = uniform

    def next_delay(self) -> float:
        delay = self._uniform(self.current / 2, self.current)
        self.current = min(self.current * 2, self.cap)
        return delay

    def connection_lasted(self, seconds: float) -> None:
        if seconds >= self.stable_after:
            self.current = self.first


class SlidingWindow:
    """At most `limit` events in any `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()

    def delay(self, now: float) -> float:
        """Seconds to wait before one more event is allowed (0 when it is allowed now)."""
        self._expire(now)
        if len(self._times) < self.limit:
            return 0.0
        return self._times[len(self._times) - self.limit] + self.window - now

    def record(self, now: float) -> None:
        self._times.append(now)

    def used(self, now: float) -> int:
        self._expire(now)
        return len(self._times)


def connect_window(max_attempts: int, window_seconds: float, share: float = SAFETY_SHARE) -> SlidingWindow:
    """The per-IP connection-attempt limiter one worker shares across all its connections to an exchange."""
    return SlidingWindow(max(1, int(max_attempts * share)), window_seconds)


def message_window(max_messages_per_second: float) -> SlidingWindow:
    """Outgoing control messages of one connection: the exchange's rate less room for pongs and slack."""
    return SlidingWindow(max(1, int(max_messages_per_second) - 2), 1.0)


class WeightBudget:
    """REST request weight per rolling minute, shared by all of a worker's requests to one exchange.

    It counts what it spends itself and also believes the exchange's own figure (a header such as
    `X-MBX-USED-WEIGHT-1M`), whichever is higher; after a 429/418 nothing is sent until Retry-After.
    """

    def __init__(self, limit_per_minute: int, share: float = SAFETY_SHARE, window: float = 60.0) -> None:
        self.budget = max(1, int(limit_per_minute * share))
        self.window = window
        self._spent: deque[tuple[float, int]] = deque()
        self._reported = 0
        self._reported_at = float("-inf")
        self.blocked_until = float("-inf")

    def _own(self, now: float) -> int:
        while self._spent and self._spent[0][0] <= now - self.window:
            self._spent.popleft()
        return sum(weight for _, weight in self._spent)

    def used(self, now: float) -> int:
        reported = self._reported if now - self._reported_at < self.window else 0
        return max(self._own(now), reported)

    def delay(self, now: float, weight: int) -> float:
        """Seconds to wait before a request of this weight fits the budget."""
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.used(now) + weight <= self.budget:
            return 0.0
        if self._spent:
            return max(0.05, self._spent[0][0] + self.window - now)
        return max(0.05, self._reported_at + self.window - now)

    def spend(self, now: float, weight: int) -> None:
        self._spent.append((now, weight))

    def reported(self, now: float, used: int) -> None:
        self._reported, self._reported_at = used, now

    def block(self, now: float, retry_after: float) -> None:
        self.blocked_until = max(self.blocked_until, now + max(1.0, retry_after))


REQUEST_RATE_SHARE = 0.8  # of a per-second request limit: it is counted per group, so less is left unseen
BRIEF_BACKOFF = 1.0  # seconds after a 429 that names no Retry-After (Upbit, Bithumb): the limit is per second
MAX_BRIEF_BACKOFF = 8.0


class RequestRate:
    """Requests per second per endpoint group (Upbit, Bithumb), with what the exchange says is left.

    Pure like the other limiters: `now` is monotonic seconds. A group the exchange reports exhausted
    (`Remaining-Req ... sec=0`) or answered 429 without Retry-After waits briefly, doubling while the
    429s repeat, never the long pause a missing Retry-After once meant.
    """

    def __init__(self, per_second: float, share: float = REQUEST_RATE_SHARE) -> None:
        self.limit = max(1, int(per_second * share))
        self._windows: dict[str, SlidingWindow] = {}
        self._blocked_until: dict[str, float] = {}
        self._backoff: dict[str, float] = {}

    def _window(self, group: str) -> SlidingWindow:
        window = self._windows.get(group)
        if window is None:
            window = self._windows[group] = SlidingWindow(self.limit, 1.0)
        return window

    def delay(self, now: float, group: str) -> float:
        blocked = self._blocked_until.get(group, float("-inf")) - now
        return max(blocked, self._window(group).delay(now), 0.0)

    def record(self, now: float, group: str) -> None:
        self._window(group).record(now)

    def remaining(self, now: float, group: str, left: int) -> None:
        """The exchange's own count: nothing left means wait for the next second."""
        if left <= 0:
            self._blocked_until[group] = max(self._blocked_until.get(group, float("-inf")), now + 1.0)

    def throttled(self, now: float, group: str) -> float:
        """A 429 without Retry-After: seconds this group now waits."""
        wait = self._backoff.get(group, BRIEF_BACKOFF / 2) * 2
        wait = min(wait, MAX_BRIEF_BACKOFF)
        self._backoff[group] = wait
        self._blocked_until[group] = max(self._blocked_until.get(group, float("-inf")), now + wait)
        return wait

    def answered(self, group: str) -> None:
        """A request of the group succeeded: the next 429 backs off briefly again."""
        self._backoff.pop(group, None)
