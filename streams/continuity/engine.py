"""The continuity engine of one exchange: every symbol's trade line, and what connections tell them.

Sans-I/O, like a protocol core: the normalize agent feeds it what the raw topic carries — live trades
(with the connection and raw record they came in), the frames' sequence numbers and receive times,
REST history answers and refusals — plus clock ticks, and drains typed outputs (streams/continuity/
outputs.py). The exchange adapter declares the rule (`ExchangeAdapter.trade_ids`):

    increasing  ids count trades: a jump is a gap, `IncreasingLine`
    unique      ids are unique, a position orders trades: `TimedLine`; since ids cannot show a gap, what
                the connection shows does: a new connection, lost frames (a sequence gap in the raw
                topic) or a silence far longer than the connection's usual pace
    none        published as they come

Order books (`books`, given the exchange's depth settings) follow their own rule with update ids in
place of trade ids: streams/continuity/books.py. They share the engine's request ids and its view of
the connections (lost frames resync the books of that connection).

Because everything reaches the engine through the raw topic, replaying that topic replays the
engine's decisions (up to the clock: ticks decide when a wait is over).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any, Literal

from streams.continuity.books import Books, BookSettings
from streams.continuity.lines import IncreasingLine, Line, Seed, Settings, TimedLine
from streams.continuity.outputs import Output, Publish
from streams.depth import DepthBook, DepthDiff, DepthSnapshot
from streams.records import MarketRecord, Trade

Rule = Literal["increasing", "unique", "none"]
# A connection silent this much longer than its usual gap between frames may have dropped some.
SILENCE_FACTOR = 20.0
MIN_SILENCE_MS = 3_000
_PACE_WEIGHT = 0.05  # of a new gap in the connection's running pace


@dataclass
class _Connection:
    next_sequence: int
    last_at: int
    pace_ms: float | None = None  # running mean gap between frames


class ContinuityEngine:
    def __init__(
        self,
        rule: Rule,
        *,
        position: Callable[[Trade], int] | None = None,
        consistent: Callable[[Trade], bool] | None = None,
        settings: Settings | None = None,
        audits_per_second: float = 0.0,
        books: BookSettings | None = None,
    ) -> None:
        self.rule = rule
        # Where ids cannot show a gap, history is compared routinely, at most this many symbols a second
        # across the exchange (its REST budget is shared with repairs).
        self.audits_per_second = audits_per_second if rule == "unique" else 0.0
        self._audit_credit = 0.0
        self._last_tick: int | None = None
        self.settings = settings or Settings()
        self._position = position or (lambda trade: trade.trade_time)
        self._consistent = consistent or (lambda trade: True)
        self._lines: dict[str, Line] = {}
        self._connections: dict[str, _Connection] = {}
        self._symbols_of: dict[str, set[str]] = {}  # connection id → symbols whose trades it carried
        self._seeds: dict[str, Seed] = {}
        # Symbols whose stream came up with no line yet: (group, since). Their first live trade makes
        # the line; one that stays quiet for `quiet_start_ms` checks history (Line.quiet_start).
        self._starting: dict[str, tuple[str, int]] = {}
        self._out: list[Output] = []
        self._requests = count(1)
        self.books = Books(books, self._out, self._next_request_id) if books is not None else None

    # -- inputs -----------------------------------------------------------------------------------

    def seed(self, seeds: dict[str, Seed]) -> None:
        """What the market topics already hold; lines made from now on start there."""
        self._seeds.update(seeds)

    def forget(self) -> None:
        """Partitions moved: another worker may publish these symbols now. Held trades are dropped (their
        raw records were not committed, so whoever owns the partitions reads them again)."""
        self._lines.clear()
        self._connections.clear()
        self._symbols_of.clear()
        self._seeds.clear()
        self._starting.clear()
        if self.books is not None:
            self.books.forget()

    def live(self, record: MarketRecord, origin: Any, group: str, connection: str, now: int) -> None:
        """A validated live trade."""
        if self.rule == "none":
            self._out.append(Publish(record, (origin,)))
            return
        line = self._line(record.symbol, group)
        if isinstance(line, TimedLine):
            self._symbols_of.setdefault(connection, set()).add(record.symbol)
            line.live(record, origin, now, connection)
        else:
            assert isinstance(line, IncreasingLine)
            line.live(record, origin, now)

    def frames(
        self, connection: str, first_sequence: int, last_sequence: int, first_at: int, last_at: int
    ) -> None:
        """A raw batch of one connection's frames: lost frames and silences are possible gaps."""
        known = self._connections.get(connection)
        if known is None:
            self._connections[connection] = _Connection(last_sequence + 1, last_at)
            return
        reason = None
        if first_sequence > known.next_sequence:
            reason = "lost frames"
        elif known.pace_ms is not None:
            silence = first_at - known.last_at
            if silence > max(MIN_SILENCE_MS, SILENCE_FACTOR * known.pace_ms):
                reason = "silence"
        if first_sequence >= known.next_sequence:
            gap = max(first_at - known.last_at, 0)
            span = last_sequence - first_sequence + 1
            per_frame = (gap + max(last_at - first_at, 0)) / span
            known.pace_ms = (
                per_frame
                if known.pace_ms is None
                else known.pace_ms + _PACE_WEIGHT * (per_frame - known.pace_ms)
            )
            known.next_sequence = last_sequence + 1
            known.last_at = last_at
        if reason == "lost frames" and self.books is not None:
            self.books.lost_frames(connection, first_at)
        if reason is not None and self.rule == "unique":
            for symbol in self._symbols_of.get(connection, ()):
                line = self._lines.get(symbol)
                if isinstance(line, TimedLine):
                    line.boundary(reason, first_at)

    def history(
        self,
        symbol: str,
        group: str,
        request_id: str | None,
        records: list[MarketRecord],
        page_full: bool,
        now: int,
    ) -> None:
        """REST trades of a symbol, oldest first; `request_id` when they answer this engine's request."""
        line = self._lines.get(symbol)
        if line is None:
            if symbol not in self._seeds or self.rule == "none":
                return  # nothing to continue from: the live stream decides where it starts
            line = self._line(symbol, group)
        if isinstance(line, IncreasingLine | TimedLine):
            line.history(records, request_id, page_full, now)

    def stream_down(self, group: str, symbols: list[str], now: int) -> None:
        """The source has no live connection for these symbols' trades: their history is polled."""
        if self.rule == "none":
            return
        for symbol in symbols:
            line = self._line(symbol, group)
            if line.seeded:
                line.stream_down(now)

    def stream_up(self, group: str, symbols: list[str], now: int) -> None:
        for symbol in symbols:
            line = self._lines.get(symbol)
            if line is not None:
                line.stream_up(now)
            elif self.rule != "none":
                self._starting.setdefault(symbol, (group, now))

    @property
    def starting(self) -> bool:
        """Streams came up for symbols with no line yet: their seeds are wanted before the next tick."""
        return bool(self._starting)

    def refused(self, symbol: str, request_id: str, retry_after_ms: int, now: int) -> None:
        if self.books is not None and self.books.refused(symbol, request_id, retry_after_ms, now):
            return
        line = self._lines.get(symbol)
        if line is not None:
            line.refused(request_id, retry_after_ms, now)

    def tick(self, now: int) -> None:
        if self._starting:
            self._quiet_starts(now)
        for line in self._lines.values():
            if line.repair is not None:
                line.tick(now)
        if self.books is not None:
            self.books.tick(now)
        if self.audits_per_second > 0:
            self._audit(now)

    def _quiet_starts(self, now: int) -> None:
        quiet = self.settings.quiet_start_ms
        for symbol, (group, since) in list(self._starting.items()):
            if now - since < quiet:
                continue
            del self._starting[symbol]
            if symbol in self._seeds:  # else nothing was published before: nothing can be missing
                self._line(symbol, group).quiet_start(now)

    def _audit(self, now: int) -> None:
        elapsed = 0 if self._last_tick is None else max(0, now - self._last_tick)
        self._last_tick = now
        self._audit_credit = min(self._audit_credit + elapsed / 1000 * self.audits_per_second, 2.0)
        due = [
            line for line in self._lines.values()
            if isinstance(line, TimedLine) and now - line.last_audit >= self.settings.audit_min_ms
        ]  # fmt: skip
        for line in sorted(due, key=lambda line: line.last_audit):
            if self._audit_credit < 1:
                return
            if line.audit(now):
                self._audit_credit -= 1

    # -- order books ------------------------------------------------------------------------------

    def depth(self, item: DepthDiff | DepthBook, origin: Any, group: str, connection: str, now: int) -> None:
        """A validated order book item of a live connection (a diff, or a whole book)."""
        if self.books is not None:
            self.books.item(item, origin, group, connection, now)

    def snapshot(self, item: DepthSnapshot, group: str, request_id: str | None, now: int) -> None:
        """A validated REST order book (the answer to a `FetchSnapshot`, or a replay of one)."""
        if self.books is not None:
            self.books.snapshot(item, request_id, now)

    def book_invalid(
        self, symbol: str, group: str, reason: str, detail: str, now: int, answer: bool = False
    ) -> None:
        """An order book item of `symbol` failed validation (the caller dead-letters it); `answer`:
        it was a REST snapshot answer."""
        if self.books is not None:
            self.books.invalid(symbol, group, reason, detail, now, answer)

    # -- outputs and views ------------------------------------------------------------------------

    def drain(self) -> list[Output]:
        out = list(self._out)
        self._out.clear()  # the lines append to this very list
        return out

    def held(self) -> int:
        return sum(len(line.held) for line in self._lines.values())

    def repairing(self) -> list[str]:
        return sorted(symbol for symbol, line in self._lines.items() if line.repair is not None)

    # -- lines ------------------------------------------------------------------------------------

    def _next_request_id(self) -> str:
        return str(next(self._requests))

    def _line(self, symbol: str, group: str) -> Line:
        line = self._lines.get(symbol)
        if line is None:
            line = self._new_line(symbol, group)
            self._starting.pop(symbol, None)
            seed = self._seeds.pop(symbol, None)
            if seed is not None:
                line.seed(seed)
            self._lines[symbol] = line
        else:
            line.group = group
        return line

    def _new_line(self, symbol: str, group: str) -> Line:
        if self.rule == "increasing":
            return IncreasingLine(symbol, group, self.settings, self._out, self._next_request_id)
        return TimedLine(
            symbol, group, self.settings, self._out, self._next_request_id,
            position=self._position, consistent=self._consistent,
        )  # fmt: skip
