"""What exchange adapters parse order book frames and REST snapshots into, and the depth settings.

These are not market records: the depth engine (streams/, issue 14's continuity engine with update
ids in place of trade ids) turns them into `depth` records. It follows each exchange's procedure:

- `DepthDiff`, Binance spot and USD-M `depthUpdate`: the levels changed in updates
  `first_update_id`..`last_update_id` (`U`, `u`); USD-M also names the previous event's last id
  (`pu`, `prev_update_id`), spot does not (None: its events chain by `U == previous u + 1`).
- `DepthBook`, Upbit and Bithumb `orderbook`: the whole top-N book; `update_id` is the orderbook
  timestamp (ms on Upbit, µs on Bithumb), their only id.
- `DepthSnapshot`, a REST book (Binance `depth`, Upbit and Bithumb `orderbook`): the book at
  `last_update_id`, cut at `limit` levels (the count asked for; a side with that many levels may be
  cut short).

Levels are `(price, quantity)` pairs of the exchange's decimal strings (Upbit's and Bithumb's JSON
numbers written with exactly their digits), best first as the exchange sent them. They are not
validated by the adapter: run `streams.validation.depth_problem` before applying them to a book.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

Levels = list[tuple[str, str]]


class DepthDiff(msgspec.Struct, frozen=True, gc=False):
    symbol: str  # normalized BASE/QUOTE
    event_time: int  # epoch ms
    received_at: int
    first_update_id: int  # U
    last_update_id: int  # u
    prev_update_id: int | None  # pu (USD-M); None on spot
    bids: Levels
    asks: Levels


class DepthBook(msgspec.Struct, frozen=True, gc=False):
    symbol: str
    event_time: int
    received_at: int
    update_id: int  # the orderbook timestamp as sent (Bithumb: µs)
    bids: Levels
    asks: Levels


class DepthSnapshot(msgspec.Struct, frozen=True, gc=False):
    symbol: str
    event_time: int  # the exchange's time where it gives one (USD-M `E`, Upbit `timestamp`), else receipt
    received_at: int
    last_update_id: int
    limit: int | None  # the levels asked for; None when the answer is not cut by a count
    bids: Levels
    asks: Levels


DepthItem = DepthDiff | DepthBook | DepthSnapshot


@dataclass(frozen=True, slots=True)
class DepthSettings:
    """An exchange's depth configuration, defaults applied (config `exchanges.<name>.depth`).

    levels                    levels per side published in depth records
    speed                     the diff stream's update speed (`100ms`, `1000ms`, ...; `realtime` where
                              the exchange has one speed)
    snapshot_interval_seconds a snapshot record at least this often, so a consumer can join mid-stream
                              (irrelevant where every record is a snapshot: Upbit, Bithumb)
    snapshot_limit            levels asked of the REST snapshot (and kept per side in the book): the
                              most the exchange gives for the weight that covers `levels`, so the book
                              has room below the published levels before it runs short
    """

    levels: int
    speed: str
    snapshot_interval_seconds: float
    snapshot_limit: int
