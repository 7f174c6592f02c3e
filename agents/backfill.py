"""The REST side of a connection slot: polling while its WebSocket is down, backfill on recovery.

REST responses are written to `raw.<exchange>` under the group's key, like WebSocket frames, with
`source = "rest:<tag>"`; the normalize agent parses them with the same adapter. Trades are fetched by
id from the last id seen, so backfill and the live stream share one id sequence per symbol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field

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
