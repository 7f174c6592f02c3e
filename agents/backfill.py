"""The REST side of a connection slot: polling while its WebSocket is down, backfill on recovery.

REST responses are written to `raw.<exchange>` under the group's key, like WebSocket frames, with
`source = "rest:<tag>"`; the normalize agent parses them with the same adapter. Trades are fetched by
id from the last id seen, so backfill and the live stream share one id sequence per symbol; exchanges
whose history only pages backwards from the newest trade (`PagesTradesBackwards`) are read newest page
first, back to the last trade seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from agents.connection import SendRaw, now_ms
from agents.rest import RestClient
from streams.exchanges.base import DataType, ExchangeAdapter, FrameError, Instrument
from streams.raw import RawBatch, RawFrame, encode_batch
from streams.records import Trade
from streams.rest import TRADES_PAGE, RestRequest, backfill_complete, kline_backfill_start

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between fallback rounds (the weight budget may stretch them)
TICKER_POLL = 5.0
KLINE_POLL = 10.0
RETRY_PAUSE = 1.0
MAX_BACKWARD_PAGES = 20  # per symbol and call: bounds what one backfill holds before writing it


@runtime_checkable
class PagesTradesBackwards(Protocol):
    """Trade history that answers newest first and pages back from a trade (Upbit's `cursor`).

    Positions (`trade_position`, the same numbers as the adapter's `trade_marker`) order trades in
    time; ids need not be ordered, only unique: the normalize agent drops repeats by id.
    """

    def older_trades_request(self, instrument: Instrument, cursor: str, limit: int) -> RestRequest: ...

    def trade_position(self, trade: Trade) -> int: ...


@dataclass(frozen=True)
class StreamInfo:
    name: str
    instrument: Instrument
    data_type: DataType


@dataclass
class TradeFetch:
    fetched: int = 0
    requests: int = 0
    complete: bool = False


@dataclass
class FallbackCounts:
    trades: dict[str, int] = field(default_factory=dict)
    requests: int = 0


class RestFiller:
    """Writes REST history of one slot's streams into the raw topic."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        rest: RestClient,
        group_key: str,
        connection_id: str,
        send_raw: SendRaw,
        last_seen: MutableMapping[str, int],
    ) -> None:
        self.adapter = adapter
        self.rest = rest
        self.group_key = group_key
        self.connection_id = connection_id
        self._send_raw = send_raw
        self.last_seen = last_seen
        self._sequence = 0

    async def _write(self, request: RestRequest, body: bytes, received_at: int) -> None:
        frame = RawFrame(self._sequence, received_at, body)
        self._sequence += 1
        batch = RawBatch(
            exchange=self.adapter.name,
            connection_id=self.connection_id,
            frames=[frame],
            source=f"rest:{request.tag}",
        )
        await self._send_raw(self.group_key, encode_batch(batch))

    async def fetch(self, request: RestRequest) -> tuple[bytes, int] | None:
        body = await self.rest.fetch(request)
        if body is None:
            return None
        received_at = now_ms()
        await self._write(request, body, received_at)
        return body, received_at

    async def trades(
        self, instrument: Instrument, first_live: int | None, deadline: float | None
    ) -> TradeFetch:
        """Trades from last seen + 1 until the live stream's first id (or the newest, when None).

        Without a deadline a failed request ends the call (the fallback poller comes back); with one,
        it retries until the deadline.
        """
        if isinstance(self.adapter, PagesTradesBackwards):
            return await self._trades_backwards(self.adapter, instrument, first_live, deadline)
        result = TradeFetch()
        symbol = instrument.symbol
        while True:
            last = self.last_seen.get(symbol)
            if last is None:
                result.complete = True  # nothing seen before: nothing to continue from
                return result
            request = self.adapter.trades_request(instrument, last + 1, TRADES_PAGE)
            result.requests += 1
            answer = await self.fetch(request)
            if answer is None:
                if deadline is None or time.monotonic() >= deadline:
                    return result
                await asyncio.sleep(RETRY_PAUSE)
                continue
            body, received_at = answer
            try:
                records = self.adapter.parse_rest(request.described, body, received_at)
            except FrameError as exc:  # written anyway: the normalize agent dead-letters it
                log.error("%s: unreadable REST trades for %s: %s", self.group_key, symbol, exc)
                return result
            ids = [int(r.data.trade_id) for r in records if isinstance(r.data, Trade)]
            if ids:
                self.last_seen[symbol] = max(last, ids[-1])
                new = [i for i in ids if i > last and (first_live is None or i < first_live)]
                result.fetched += len(new)
            next_id = self.last_seen[symbol] + 1
            if backfill_complete(next_id, first_live, len(ids), TRADES_PAGE):
                result.complete = True
                return result

    async def _trades_backwards(
        self,
        pager: PagesTradesBackwards,
        instrument: Instrument,
        first_live: int | None,
        deadline: float | None,
    ) -> TradeFetch:
        """The newest page, then older ones until a page starts before the last trade seen.

        Pages are written oldest first, so the backfill reaches the topic in time order. The page that
        reaches back also repeats trades already published: the normalize agent drops them by id (its
        window holds more than a page). A trade of the same position as the last one seen may be new,
        so paging stops only at an older one.
        """
        result = TradeFetch()
        symbol = instrument.symbol
        last = self.last_seen.get(symbol)
        if last is None:
            result.complete = True  # nothing seen before: nothing to continue from
            return result
        pages: list[tuple[RestRequest, bytes, int]] = []
        positions: list[int] = []
        request = self.adapter.trades_request(instrument, None, TRADES_PAGE)
        while len(pages) < MAX_BACKWARD_PAGES:
            result.requests += 1
            body = await self.rest.fetch(request)
            if body is None:
                if deadline is None or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(RETRY_PAUSE)
                continue
            received_at = now_ms()
            pages.append((request, body, received_at))
            try:
                records = self.adapter.parse_rest(request.described, body, received_at)
            except FrameError as exc:  # written anyway: the normalize agent dead-letters it
                log.error("%s: unreadable REST trades for %s: %s", self.group_key, symbol, exc)
                break
            trades = [r.data for r in records if isinstance(r.data, Trade)]  # oldest first
            positions += [pager.trade_position(trade) for trade in trades]
            if not trades or pager.trade_position(trades[0]) < last:
                result.complete = True  # reached back past the last trade seen, or history ends
                break
            request = pager.older_trades_request(instrument, trades[0].trade_id, TRADES_PAGE)
        for request, body, received_at in reversed(pages):
            await self._write(request, body, received_at)
        if positions:
            self.last_seen[symbol] = max(last, *positions)
        result.fetched = sum(1 for p in positions if p > last and (first_live is None or p < first_live))
        return result

    async def klines(self, instrument: Instrument, interval: str, since_ms: int) -> None:
        start = kline_backfill_start(since_ms, interval)
        await self.fetch(self.adapter.klines_request(instrument, interval, start, 1000))

    async def ticker(self, instrument: Instrument) -> None:
        await self.fetch(self.adapter.ticker_request(instrument))


async def poll_while_down(
    filler: RestFiller,
    streams: Iterable[StreamInfo],
    down_since_ms: int,
    stop: asyncio.Event,
    counts: FallbackCounts,
) -> None:
    """REST fallback: trades by id, tickers and klines for the slot's streams until `stop` is set."""
    infos = list(streams)
    next_ticker = next_kline = 0.0
    while not stop.is_set():
        for info in infos:
            if stop.is_set():
                return
            if info.data_type.kind == "trade":
                fetched = await filler.trades(info.instrument, None, None)
                symbol = info.instrument.symbol
                counts.trades[symbol] = counts.trades.get(symbol, 0) + fetched.fetched
                counts.requests += fetched.requests
        now = time.monotonic()
        if now >= next_ticker:
            next_ticker = now + TICKER_POLL
            for info in infos:
                if info.data_type.kind == "ticker" and not stop.is_set():
                    await filler.ticker(info.instrument)
                    counts.requests += 1
        if now >= next_kline:
            next_kline = now + KLINE_POLL
            for info in infos:
                if info.data_type.kind == "kline" and info.data_type.interval and not stop.is_set():
                    await filler.klines(info.instrument, info.data_type.interval, down_since_ms)
                    counts.requests += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
