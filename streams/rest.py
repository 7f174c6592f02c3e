"""REST history requests and the pure decisions of backfill.

A `RestRequest` is built by the exchange adapter; its `tag` travels in the raw record's `source`
(`rest:<tag>`) so the normalize agent can hand the response body back to the same adapter to parse.
Tags are `trades/<exchange symbol>`, `klines/<exchange symbol>/<interval>`, `ticker/<exchange symbol>`
and `depth/<exchange symbol>/<levels asked for>` (an order book snapshot, `parse_depth_snapshot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RestKind = Literal["trades", "klines", "ticker", "depth"]
TRADES_PAGE = 1000  # trades per history request: the most Binance returns


@dataclass(frozen=True)
class RestRequest:
    kind: RestKind
    path: str  # appended to the exchange's restEndpoint
    params: dict[str, str] = field(hash=False)
    weight: int
    exchange_symbol: str
    interval: str | None = None
    limit: int | None = None  # depth: the levels asked for (a side that long may be cut short)

    @property
    def tag(self) -> str:
        parts = [self.kind, self.exchange_symbol] + ([self.interval] if self.interval else [])
        return "/".join(parts + ([str(self.limit)] if self.limit is not None else []))

    @property
    def described(self) -> RestTag:
        return RestTag(self.kind, self.exchange_symbol, self.interval, self.limit)


@dataclass(frozen=True)
class RestTag:
    kind: RestKind
    exchange_symbol: str
    interval: str | None
    limit: int | None = None


def parse_source(source: str) -> RestTag | None:
    """The REST tag in a raw record's `source`; None for WebSocket frames or an unreadable source."""
    if not source.startswith("rest:"):
        return None
    parts = source[5:].split("/")
    if parts[0] in ("trades", "ticker") and len(parts) == 2 and parts[1]:
        return RestTag(parts[0], parts[1], None)  # type: ignore[arg-type]
    if parts[0] == "klines" and len(parts) == 3 and parts[1] and parts[2]:
        return RestTag("klines", parts[1], parts[2])
    if parts[0] == "depth" and len(parts) in (2, 3) and parts[1]:
        if len(parts) == 2:
            return RestTag("depth", parts[1], None)
        if parts[2].isdigit() and parts[2].isascii() and len(parts[2]) <= 6:
            return RestTag("depth", parts[1], None, int(parts[2]))
    return None


@dataclass(frozen=True)
class Gap:
    """Trades missing between the last id published and the first id on a new connection."""

    first_missing: int
    last_missing: int

    @property
    def size(self) -> int:
        return self.last_missing - self.first_missing + 1


def trade_gap(last_seen: int | None, first_live: int | None) -> Gap | None:
    """The ids to fetch; None when nothing was seen before (nothing to continue) or nothing is missing.

    Without a first live id (no trade yet on the new connection) the gap is open-ended and backfill
    pages until the exchange has nothing newer; `last_missing` is then -1.
    """
    if last_seen is None:
        return None
    if first_live is None:
        return Gap(last_seen + 1, -1)
    if first_live <= last_seen + 1:
        return None
    return Gap(last_seen + 1, first_live - 1)


def backfill_complete(next_id: int, first_live: int | None, page_size: int, page_limit: int) -> bool:
    """After a page: done when the next id reaches the live stream, or the exchange returned a short page.

    A short page means there is nothing newer on the exchange yet; it only ends a backfill that was
    fetched after the new subscription was acknowledged, which the caller guarantees.
    """
    if first_live is not None and next_id >= first_live:
        return True
    return page_size < page_limit


_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000, "M": 2_678_400_000}


def interval_ms(interval: str) -> int:
    """Length of a kline interval such as `1m` (a month counts as 31 days: only used to look back)."""
    return int(interval[:-1]) * _UNIT_MS[interval[-1]]


def kline_backfill_start(down_since_ms: int, interval: str) -> int:
    """Where kline backfill starts: the bar that was open when the connection went down."""
    length = interval_ms(interval)
    return down_since_ms - down_since_ms % length if interval[-1] not in "wM" else down_since_ms - length
