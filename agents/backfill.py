"""The REST side of a connection group: it carries out history requests and polls what has no stream.

REST answers are written to `raw.<exchange>` under the group's key, like WebSocket frames, with
`source = "rest:<tag>"` (and `request`, the continuity engine's request id, for trade history); the
normalize agent parses them with the same adapter, and the continuity engine decides what they fill.
Trades are the engine's business (it asks, through `FetchTrades`, and polls while a stream is down);
what is polled here while a slot is down are the tickers and klines, and the klines it missed are
fetched once when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from agents.connection import SendRaw, now_ms
from agents.rest import RestAnswer, RestClient
from streams.exchanges.base import DataType, ExchangeAdapter, Instrument
from streams.raw import RawBatch, RawFrame, encode_batch
from streams.rest import RestRequest, kline_backfill_start

TICKER_POLL = 5.0
KLINE_POLL = 10.0


@dataclass(frozen=True)
class StreamInfo:
    name: str
    instrument: Instrument
    data_type: DataType


class RestWriter:
    """Fetches REST history of one connection group and writes each answer into the raw topic."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        rest: RestClient,
        group_key: str,
        connection_id: str,
        send_raw: SendRaw,
    ) -> None:
        self.adapter = adapter
        self.rest = rest
        self.group_key = group_key
        self.connection_id = connection_id
        self._send_raw = send_raw
        self._sequence = 0

    async def fetch(self, request: RestRequest, request_id: str | None = None) -> RestAnswer:
        answer = await self.rest.attempt(request)
        if answer.body is not None:
            frame = RawFrame(self._sequence, now_ms(), answer.body)
            self._sequence += 1
            batch = RawBatch(
                exchange=self.adapter.name,
                connection_id=self.connection_id,
                frames=[frame],
                source=f"rest:{request.tag}",
                request=request_id,
            )
            await self._send_raw(self.group_key, encode_batch(batch))
        return answer

    async def klines(self, instrument: Instrument, interval: str, since_ms: int) -> None:
        start = kline_backfill_start(since_ms, interval)
        await self.fetch(self.adapter.klines_request(instrument, interval, start, 1000))

    async def ticker(self, instrument: Instrument) -> None:
        await self.fetch(self.adapter.ticker_request(instrument))


async def poll_while_down(
    writer: RestWriter, streams: Iterable[StreamInfo], down_since_ms: int, stop: asyncio.Event
) -> None:
    """REST fallback for tickers and klines until `stop` is set (trades: the continuity engine polls)."""
    infos = list(streams)
    next_ticker = next_kline = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_ticker:
            next_ticker = now + TICKER_POLL
            for info in infos:
                if info.data_type.kind == "ticker" and not stop.is_set():
                    await writer.ticker(info.instrument)
        if now >= next_kline:
            next_kline = now + KLINE_POLL
            for info in infos:
                if info.data_type.kind == "kline" and info.data_type.interval and not stop.is_set():
                    await writer.klines(info.instrument, info.data_type.interval, down_since_ms)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(TICKER_POLL, KLINE_POLL))
