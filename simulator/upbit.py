"""The Upbit dialect, and Bithumb's (its gen-2 API is Upbit's protocol with other types and limits).

WebSocket `<prefix>/websocket/v1` (exchange-protocols.md §3.1, §4.1):
- A request is a JSON array `[{ticket}, {type, codes, is_only_snapshot?, is_only_realtime?}...,
  {format}]`; it **replaces** the connection's whole subscription set (the simulator's answer to the
  documentation's silence) and is never acknowledged. Types: trade, ticker, orderbook (codes may carry
  a `.N` level count: 1, 5, 15 or 30 on Upbit, 1 to 30 on Bithumb, else 30), candle.1s …
  candle.240m (not candle.10m). Format DEFAULT or SIMPLE.
- Errors are `{"error": {"name": "NO_TICKET" | "NO_TYPE" | "NO_CODES" | "WRONG_FORMAT" |
  "INVALID_PARAM", "message": ...}}`; more than 5 requests in a second closes the connection (1008).
- Every server frame is a **binary** frame of UTF-8 JSON; numbers are JSON numbers.
- A connection with no frame in either direction for 120 s is closed. The text `PING` is answered
  with `{"status":"UP"}`, which then repeats every 10 s. WebSocket pings are answered with pongs.
- Connects: Upbit 5/s per client, then HTTP 429. Bithumb 10/s, then 429 with an empty body; a client
  that keeps going after `block_after` rejections is blocked for 10 minutes.

REST `<prefix>/v1/`: `market/all`, `trades/ticks` (market, count ≤ 500, cursor = sequential_id: the
page of trades before it; newest first), `ticker` (markets=A,B), `orderbook` (markets=A,B, count ≤ 30,
default 15). Upbit: 10 requests/s per IP in each
group (market, candle, trade, ticker, orderbook), `Remaining-Req: group=<g>; min=1800; sec=<left>` on
every answer (`sec=0` on a 429), 429 without Retry-After over the limit, and after 10 such 429s within a
minute a 30 s ban answered 418 (simulator/limits.py; `/_sim/faults/limits` changes the numbers).

Order books are the market's ground-truth books (simulator/book.py): every orderbook message is the
top N levels of the symbol's book after a tick that changed it, its `timestamp` that tick's time.

Faults (simulator/faults.py) work here as on Binance: drop, stall, skip, invent, refuse, rest
(answered in this dialect's 429/418 shape, without Retry-After), shutdown (no announcement: a 1001
close after the grace).

Bithumb's differences: `sequential_id` is a string of 18 digits that is unique but neither
time-based nor ordered (the cursor still names a trade, and the page before it is the same as Upbit's),
the orderbook `timestamp` a microsecond string, no candles, 150 REST requests/s per category (candle,
orderbook, ticker, trade, other: `market/all` counts as other), every 429 with an empty body and no
`Remaining-Req` header (Bithumb documents none), and a client that keeps going "temporarily restricted":
banned, answered 429 with an empty body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from simulator.book import DepthFeed, Levels
from simulator.connections import PONG, Connection, StreamHub
from simulator.faults import Faults
from simulator.invented import InventError, make_trade, odd_size, real_trade_below_newest, unit_price_trade
from simulator.limits import GroupRateLimit
from simulator.market import Instrument, Market, Tick, Trade, TradeHistory, bar_open_time, format_units

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
POLICY_VIOLATION = 1008
GOING_AWAY = 1001
IDLE_TIMEOUT = 120.0
STATUS_INTERVAL = 10.0
CANDLE_PUSH_MS = 1000
DEFAULT_BOOK_LEVELS = 15
_CANDLE_INTERVALS = {
    "1s": "1s",
    "1m": "1m",
    "3m": "3m",
    "5m": "5m",
    "15m": "15m",
    "30m": "30m",
    "60m": "1h",
    "240m": "4h",
}  # fmt: skip  Upbit unit → market interval
_TYPES = ("trade", "ticker", "orderbook")
_SIMPLE = {
    "type": "ty", "code": "cd", "trade_price": "tp", "trade_volume": "tv", "ask_bid": "ab",
    "prev_closing_price": "pcp", "change": "c", "change_price": "cp", "trade_date": "td",
    "trade_time": "ttm", "trade_timestamp": "ttms", "timestamp": "tms", "sequential_id": "sid",
    "stream_type": "st", "total_ask_size": "tas", "total_bid_size": "tbs", "orderbook_units": "obu",
    "ask_price": "ap", "bid_price": "bp", "ask_size": "as", "bid_size": "bs", "level": "lv",
}  # fmt: skip
_encode = msgspec.json.encode


def binary_frame(payload: bytes) -> bytes:
    """A complete server-to-client binary frame: unmasked, unfragmented (RFC 6455 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x82, length)) + payload
    if length < 65536:
        return b"\x82\x7e" + length.to_bytes(2, "big") + payload
    return b"\x82\x7f" + length.to_bytes(8, "big") + payload


def _number(text: str) -> msgspec.Raw:
    """A decimal string written as a JSON number literal, digit for digit."""
    return msgspec.Raw(text.encode())


@dataclass(frozen=True)
class Flavor:
    """What Upbit and Bithumb do differently."""

    name: str
    prefix: str
    string_sequential_id: bool
    microsecond_book_time: bool
    candles: bool
    connects_per_second: int
    rest_per_second: int
    empty_429: bool
    block_after: int | None  # 429 rejections after which a client is blocked, None: never blocked
    block_seconds: float = 600.0
    remaining_req_header: bool = True  # `Remaining-Req` on REST answers
    rest_ban_status: int = 418  # what a client banned for REST abuse gets
    rest_ban_after: int | None = 10  # REST 429s within a minute that get a client banned
    rest_ban_seconds: float = 30.0
    rest_groups: tuple[tuple[str, str], ...] = ()  # renamed REST groups (Bithumb's "other" category)
    # Orderbook counts served as asked (`KRW-BTC.15`); any other count gets 30 levels.
    book_counts: frozenset[str] = frozenset({"1", "5", "15", "30"})


UPBIT = Flavor("upbit", "/upbit", False, False, True, 5, 10, False, None)
BITHUMB = Flavor("bithumb", "/bithumb", True, True, False, 10, 150, True, 10, remaining_req_header=False,
                 rest_ban_status=429, rest_groups=(("market", "other"),),
                 book_counts=frozenset(str(count) for count in range(1, 31)))  # fmt: skip
# Invented `sequential_id`s far outside the real ones: a trade time in the 23rd century (Upbit), an
# 18-digit value (Bithumb) checked against the issued ones.
FAR_UPBIT_SEQUENTIAL_ID = 90_000_000_000_000_425
FAR_BITHUMB_SEQUENTIAL_ID = 900_000_000_000_000_425


class UpbitConnection(Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.simple = False
        self.last_activity = self.opened_at
        self.status_up = False
        self.next_status_at = 0.0
        self.book_levels: dict[str, int] = {}  # orderbook code → levels asked for
        self.requests: deque[float] = deque(maxlen=100)

    def push(self, kind: str, payload: bytes, now: float) -> None:
        self.last_activity = now
        self.send(kind, binary_frame(payload))


class UpbitStyle:
    """Serves one `Market` the way Upbit (or, with BITHUMB, Bithumb) does."""

    def __init__(self, market: Market, flavor: Flavor, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.market = market
        self.flavor = flavor
        self.name = flavor.name
        self.idle_timeout = idle_timeout
        self._codes = {f"{i.quote}-{i.base}": i for i in market.instruments.values()}
        self._hub: StreamHub[UpbitConnection] = StreamHub()
        self._connections: dict[str, UpbitConnection] = {}
        self._ids = itertools.count(1)
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._stopping = False
        self._connects: dict[str, deque[float]] = {}
        self._rejections: dict[str, int] = {}
        self._blocked_until: dict[str, float] = {}
        self.rest_limit = GroupRateLimit(
            flavor.rest_per_second, ban_after=flavor.rest_ban_after, ban_seconds=flavor.rest_ban_seconds
        )
        # candle stream → (open time, trade count, time) of the bar it last pushed
        self._candle_pushed: dict[str, tuple[int, int, int]] = {}
        self._next_housekeeping = 0.0
        self.frames_sent: dict[str, int] = {}
        self.connections_total = 0
        self.violations = {"messageRate": 0, "connectRate": 0, "restRate": 0, "restDuringBan": 0}
        self.idle_closes = 0
        self.rest_requests = 0
        self.rest_rejected = 0
        # Test-triggered faults; the exchange's own connect limit is per second, so none per 5 minutes.
        self.faults = Faults(connect_attempts=None, retry_after_header=False)
        names = {code: instrument.symbol for code, instrument in self._codes.items()}
        names |= {symbol: symbol for symbol in market.instruments}
        self.depth = DepthFeed(market, names, Instrument.price, Instrument.quantity, self._book_id)

    # -- routes -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        prefix = self.flavor.prefix
        app.router.add_get(f"{prefix}/websocket/v1", self._handle_ws)
        app.router.add_get(f"{prefix}/v1/market/all", self._rest("market", self._markets))
        app.router.add_get(f"{prefix}/v1/trades/ticks", self._rest("trade", self._ticks))
        app.router.add_get(f"{prefix}/v1/ticker", self._rest("ticker", self._tickers))
        app.router.add_get(f"{prefix}/v1/orderbook", self._rest("orderbook", self._orderbooks))
        if self.flavor.candles:
            app.router.add_get(f"{prefix}/v1/candles/seconds", self._rest("candle", self._candles("1s")))
            for minutes in ("1", "3", "5", "15", "30", "60", "240"):
                app.router.add_get(f"{prefix}/v1/candles/minutes/{minutes}",
                                   self._rest("candle", self._candles(f"{minutes}m")))  # fmt: skip

    # -- WebSocket ----------------------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            raise web.HTTPServiceUnavailable()
        client, now = request.remote or "unknown", time.monotonic()
        if self.faults.handshake_refusal(client, now) is not None:
            return web.Response(status=503, text="Service Unavailable")
        refused = self._refuse_connect(client, now)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=CLOSE_TIMEOUT)
        await ws.prepare(request)
        connection = UpbitConnection(
            f"{self.name}-{next(self._ids)}", ws, request, self.frames_sent, now=time.monotonic(),
            max_messages_per_second=5,
        )  # fmt: skip
        self._connections[connection.id] = connection
        self._all_closed.clear()
        self.connections_total += 1
        try:
            async for message in ws:
                now = time.monotonic()
                connection.last_activity = now
                if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
                    data = (
                        message.data
                        if isinstance(message.data, str)
                        else message.data.decode("utf-8", "replace")
                    )
                    self._on_text(connection, data, now)
                elif message.type is WSMsgType.PING:
                    connection.send(PONG, message.data)
                elif message.type is not WSMsgType.PONG:
                    break
                if connection.closing:
                    break
        finally:
            del self._connections[connection.id]
            self._hub.drop(connection)
            await connection.finished(CLOSE_TIMEOUT)
            if not self._connections:
                self._all_closed.set()
        return ws

    def _refuse_connect(self, client: str, now: float) -> web.Response | None:
        flavor = self.flavor
        if self._blocked_until.get(client, 0.0) > now:
            return self._too_many()
        recent = self._connects.setdefault(client, deque())
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) < flavor.connects_per_second:
            recent.append(now)
            return None
        self.violations["connectRate"] += 1
        rejections = self._rejections[client] = self._rejections.get(client, 0) + 1
        if flavor.block_after is not None and rejections >= flavor.block_after:
            self._blocked_until[client] = now + flavor.block_seconds
            log.info("%s: blocking %s for %.0f s", self.name, client, flavor.block_seconds)
        return self._too_many()

    def _too_many(self) -> web.Response:
        if self.flavor.empty_429:
            return web.Response(status=429)
        body = {"error": {"name": "too_many_requests", "message": "Too many requests"}}
        return web.Response(status=429, body=_encode(body), content_type="application/json")

    def _on_text(self, connection: UpbitConnection, text: str, now: float) -> None:
        if text == "PING":
            connection.status_up = True
            connection.next_status_at = now + STATUS_INTERVAL
            connection.push("status", b'{"status":"UP"}', now)
            return
        recent = connection.requests
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        per_second = sum(1 for at in recent if at > now - 1.0)
        if per_second >= 5 or len(recent) >= 100:
            self.violations["messageRate"] += 1
            connection.close(POLICY_VIOLATION, discard_queued=True)
            return
        recent.append(now)
        try:
            streams, snapshots, simple = self._read_request(text)
        except _RequestError as error:
            connection.push("error", _encode({"error": {"name": error.name, "message": error.message}}), now)
            return
        for stream in list(connection.streams):
            self._hub.unsubscribe(connection, stream)
        connection.book_levels = {}
        connection.simple = simple
        for stream, levels in streams.items():
            self._hub.subscribe(connection, stream)
            if levels is not None:
                connection.book_levels[stream] = levels
        for stream in snapshots:
            self._send_snapshot(connection, stream, now)

    def _read_request(self, text: str) -> tuple[dict[str, int | None], list[str], bool]:
        try:
            request = json.loads(text)
        except ValueError:
            raise _RequestError("WRONG_FORMAT", "the request is not JSON") from None
        if not isinstance(request, list) or not all(isinstance(item, dict) for item in request):
            raise _RequestError("WRONG_FORMAT", "the request must be an array of objects")
        if not any(isinstance(item.get("ticket"), str) and item["ticket"] for item in request):
            raise _RequestError("NO_TICKET", "a ticket is required")
        simple = False
        for item in request:
            if "format" in item:
                if item["format"] not in ("DEFAULT", "SIMPLE"):
                    raise _RequestError("INVALID_PARAM", f"format {item['format']!r}")
                simple = item["format"] == "SIMPLE"
        typed = [item for item in request if "type" in item]
        if not typed:
            raise _RequestError("NO_TYPE", "a type is required")
        streams: dict[str, int | None] = {}
        snapshots: list[str] = []
        for item in typed:
            kind = item["type"]
            known = kind in _TYPES or (self.flavor.candles and kind.startswith("candle.")
                                       and kind[7:] in _CANDLE_INTERVALS)  # fmt: skip
            if not isinstance(kind, str) or not known:
                raise _RequestError("INVALID_PARAM", f"type {kind!r}")
            codes = item.get("codes")
            if not isinstance(codes, list) or not codes:
                raise _RequestError("NO_CODES", "codes are required")
            realtime_only = bool(item.get("is_only_realtime") or item.get("isOnlyRealtime"))
            for code in codes:
                if not isinstance(code, str):
                    raise _RequestError("INVALID_PARAM", f"code {code!r}")
                code, _, count = code.partition(".")
                if code not in self._codes:
                    raise _RequestError("INVALID_PARAM", f"code {code!r}")
                levels = None
                if kind == "orderbook":
                    levels = (
                        int(count)
                        if count in self.flavor.book_counts
                        else 30
                        if count
                        else DEFAULT_BOOK_LEVELS
                    )
                stream = f"{kind}:{code}"
                streams[stream] = levels
                if not realtime_only:
                    snapshots.append(stream)
        return streams, snapshots, simple

    # -- frames -------------------------------------------------------------------------------------

    def _frame(self, connection: UpbitConnection, body: dict[str, Any]) -> bytes:
        if connection.simple:
            body = {_SIMPLE.get(key, key): value for key, value in body.items()}
            if "obu" in body:
                body["obu"] = [{_SIMPLE.get(k, k): v for k, v in unit.items()} for unit in body["obu"]]
        return _encode(body)

    def _sequential_id(self, trade: Trade) -> int | str:
        if self.flavor.string_sequential_id:
            return str(bithumb_sequential_id(trade.id))
        return upbit_sequential_id(trade)

    def _trade_body(
        self, instrument: Instrument, trade: Trade, now_ms: int, stream_type: str,
        sequential_id: int | str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        if sequential_id is None:
            sequential_id = self._sequential_id(trade)
        moment = datetime.fromtimestamp(trade.time / 1000, UTC)
        return {
            "type": "trade", "code": f"{instrument.quote}-{instrument.base}", "timestamp": now_ms,
            "trade_date": moment.strftime("%Y-%m-%d"), "trade_time": moment.strftime("%H:%M:%S"),
            "trade_timestamp": trade.time, "trade_price": _number(trade.price),
            "trade_volume": _number(trade.quantity), "ask_bid": "BID" if trade.taker_side == "buy" else "ASK",
            "sequential_id": sequential_id, "stream_type": stream_type,
        }  # fmt: skip

    def _book_body(self, instrument: Instrument, levels: int, stream_type: str) -> dict[str, Any]:
        """The symbol's book as it stands: its top `levels` levels, at the time of its last change."""
        book = self.depth.book(instrument.symbol)
        body = self._book_fields(instrument, *book.top(levels), book.update_id, book.time)
        return {"type": "orderbook", "code": f"{instrument.quote}-{instrument.base}", **body,
                "stream_type": stream_type}  # fmt: skip

    def _book_fields(
        self, instrument: Instrument, bids: Levels, asks: Levels, update_id: int, time_ms: int
    ) -> dict[str, Any]:
        price, quantity = instrument.price, instrument.quantity
        units = [
            {"ask_price": _number(price(ask)), "bid_price": _number(price(bid)),
             "ask_size": _number(quantity(ask_lots)), "bid_size": _number(quantity(bid_lots))}
            for (bid, bid_lots), (ask, ask_lots) in zip(bids, asks, strict=False)
        ]  # fmt: skip
        timestamp = self._book_id(update_id, time_ms)
        return {
            "total_ask_size": _number(quantity(sum(lots for _, lots in asks))),
            "total_bid_size": _number(quantity(sum(lots for _, lots in bids))),
            "orderbook_units": units,
            "timestamp": timestamp if self.flavor.microsecond_book_time else int(timestamp),
            "level": 1 if self.flavor.name == "bithumb" else 0,
        }

    def _book_id(self, update_id: int, time_ms: int) -> str:
        """The orderbook timestamp as sent: Upbit's ms; Bithumb's µs string, made unique per update."""
        if self.flavor.microsecond_book_time:
            return str(time_ms * 1000 + update_id % 1000)
        return str(time_ms)

    def _ticker_body(self, instrument: Instrument, now_ms: int, stream_type: str) -> dict[str, Any]:
        day_start = now_ms - now_ms % 86_400_000
        stats = self.market.rolling_stats(instrument.symbol, now_ms, now_ms - day_start)
        change = stats.last - stats.previous_close
        rate = "0" if stats.previous_close == 0 else format_ratio_plain(change, stats.previous_close)
        return {
            "type": "ticker", "code": f"{instrument.quote}-{instrument.base}",
            "opening_price": _number(instrument.price(stats.open)),
            "high_price": _number(instrument.price(stats.high)),
            "low_price": _number(instrument.price(stats.low)),
            "trade_price": _number(instrument.price(stats.last)),
            "prev_closing_price": _number(instrument.price(stats.previous_close)),
            "change": "RISE" if change > 0 else "FALL" if change < 0 else "EVEN",
            "change_price": _number(instrument.price(abs(change))),
            "signed_change_price": _number(instrument.price(change)),
            "change_rate": _number(rate.lstrip("-")), "signed_change_rate": _number(rate),
            "trade_volume": _number(instrument.quantity(stats.last_quantity)),
            "acc_trade_volume": _number(instrument.quantity(stats.volume)),
            "acc_trade_price": _number(instrument.notional(stats.quote_volume)),
            "acc_trade_volume_24h": _number(instrument.quantity(stats.volume)),
            "acc_trade_price_24h": _number(instrument.notional(stats.quote_volume)),
            "market_state": "ACTIVE", "is_trading_suspended": False, "timestamp": now_ms,
            "stream_type": stream_type,
        }  # fmt: skip

    def _candle_body(
        self, instrument: Instrument, unit: str, now_ms: int, stream_type: str, open_time: int | None = None
    ) -> dict[str, Any]:
        interval = _CANDLE_INTERVALS[unit]
        if open_time is None:
            open_time = bar_open_time(interval, now_ms)
        bar = self.market.kline(instrument.symbol, interval, open_time)
        start = datetime.fromtimestamp(bar.open_time / 1000, UTC)
        return {
            "type": f"candle.{unit}", "code": f"{instrument.quote}-{instrument.base}",
            "candle_date_time_utc": start.strftime("%Y-%m-%dT%H:%M:%S"),
            "candle_date_time_kst": datetime.fromtimestamp(bar.open_time / 1000 + 9 * 3600, UTC)
            .strftime("%Y-%m-%dT%H:%M:%S"),
            "opening_price": _number(instrument.price(bar.open)),
            "high_price": _number(instrument.price(bar.high)),
            "low_price": _number(instrument.price(bar.low)),
            "trade_price": _number(instrument.price(bar.close)),
            "candle_acc_trade_volume": _number(instrument.quantity(bar.volume)),
            "candle_acc_trade_price": _number(instrument.notional(bar.quote_volume)),
            "timestamp": now_ms, "stream_type": stream_type,
        }  # fmt: skip

    def _send_snapshot(self, connection: UpbitConnection, stream: str, now: float) -> None:
        kind, _, code = stream.partition(":")
        instrument = self._codes[code]
        now_ms = self._now_ms()
        if kind == "trade":
            last = self.market.history(instrument.symbol).last()
            if last is None:
                return
            body = self._trade_body(instrument, last, now_ms, "SNAPSHOT")
        elif kind == "orderbook":
            levels = connection.book_levels.get(stream, DEFAULT_BOOK_LEVELS)
            body = self._book_body(instrument, levels, "SNAPSHOT")
        elif kind == "ticker":
            body = self._ticker_body(instrument, now_ms, "SNAPSHOT")
        else:
            interval = _CANDLE_INTERVALS[kind[7:]]
            if not self.market.kline(instrument.symbol, interval, bar_open_time(interval, now_ms)).count:
                return  # candles exist only once a trade happened in them
            body = self._candle_body(instrument, kind[7:], now_ms, "SNAPSHOT")
        connection.push(kind, self._frame(connection, body), now)

    def _fan_out(self, stream: str, kind: str, body: dict[str, Any], now: float) -> None:
        listeners = self._hub.subscribers.get(stream)
        if not listeners:
            return
        encoded: dict[bool, bytes] = {}
        for connection in listeners:
            payload = encoded.get(connection.simple)
            if payload is None:
                payload = encoded[connection.simple] = self._frame(connection, body)
            connection.push(kind, payload, now)

    def publish(self, tick: Tick, monotonic_now: float) -> None:
        self.depth.advance(tick)
        subscribers = self._hub.subscribers
        if subscribers:
            now_ms = tick.time
            traded: dict[str, Instrument] = {}
            skipping = self.faults.skipping
            for trade in tick.trades:
                instrument = self.market.instruments[trade.symbol]
                code = f"{instrument.quote}-{instrument.base}"
                traded[code] = instrument
                if skipping and self.faults.skips(trade.symbol, trade.id, monotonic_now):
                    continue
                if f"trade:{code}" in subscribers:
                    body = self._trade_body(instrument, trade, now_ms, "REALTIME")
                    self._fan_out(f"trade:{code}", "trade", body, monotonic_now)
            for quote in tick.quotes:
                instrument = self.market.instruments[quote.symbol]
                stream = f"orderbook:{instrument.quote}-{instrument.base}"
                for connection in list(subscribers.get(stream, ())):
                    body = self._book_body(instrument, connection.book_levels.get(stream, 1), "REALTIME")
                    connection.push("orderbook", self._frame(connection, body), monotonic_now)
            for code, instrument in traded.items():
                if f"ticker:{code}" in subscribers:
                    body = self._ticker_body(instrument, now_ms, "REALTIME")
                    self._fan_out(f"ticker:{code}", "ticker", body, monotonic_now)
            if self.flavor.candles:
                self._push_candles(now_ms, monotonic_now)
        if monotonic_now >= self._next_housekeeping:
            self._housekeeping(monotonic_now)

    def _push_candles(self, now_ms: int, now: float) -> None:
        # Only bars a trade changed, at most once a second per stream; a bar that ends with changes not
        # yet pushed gets its final state pushed as the next one starts, so no bar's end is lost.
        for stream in [s for s in self._hub.subscribers if s.startswith("candle.")]:
            kind, _, code = stream.partition(":")
            unit = kind[7:]
            instrument = self._codes[code]
            interval = _CANDLE_INTERVALS[unit]
            open_time = bar_open_time(interval, now_ms)
            pushed = self._candle_pushed.get(stream)
            if pushed is not None and pushed[0] != open_time:
                if self.market.kline(instrument.symbol, interval, pushed[0]).count != pushed[1]:
                    body = self._candle_body(instrument, unit, now_ms, "REALTIME", pushed[0])
                    self._fan_out(stream, "candle", body, now)
                pushed = None
                del self._candle_pushed[stream]
            count = self.market.kline(instrument.symbol, interval, open_time).count
            if count and (pushed is None or (count != pushed[1] and now_ms - pushed[2] >= CANDLE_PUSH_MS)):
                self._candle_pushed[stream] = (open_time, count, now_ms)
                self._fan_out(stream, "candle", self._candle_body(instrument, unit, now_ms, "REALTIME"), now)

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + min(1.0, self.idle_timeout / 4)
        for connection in list(self._connections.values()):
            if connection.closing:
                continue
            if now - connection.last_activity > self.idle_timeout:
                self.idle_closes += 1
                connection.close(GOING_AWAY, discard_queued=True)
            elif connection.status_up and now >= connection.next_status_at:
                connection.next_status_at = now + STATUS_INTERVAL
                connection.push("status", b'{"status":"UP"}', now)

    # -- REST -------------------------------------------------------------------------------------

    def _rest(self, group: str, answer: Any) -> Any:
        group = dict(self.flavor.rest_groups).get(group, group)

        async def handle(request: web.Request) -> web.Response:
            self.rest_requests += 1
            client = request.remote or "unknown"
            now = time.monotonic()
            fault = self.faults.rest_refusal(client, now)
            if fault is not None:
                self.rest_rejected += 1
                return self._rest_refused(fault[0], group, 0.0)
            verdict = self.rest_limit.check(client, group, now)
            if verdict.outcome != "ok":
                self.rest_rejected += 1
                if verdict.outcome == "banned":
                    self.violations["restDuringBan"] += 1
                    return self._rest_refused(self.flavor.rest_ban_status, group, verdict.ban_left)
                self.violations["restRate"] += 1
                return self._rest_refused(429, group, 0.0)
            headers = self._remaining(group, verdict.remaining)
            try:
                body = answer(request.query)
            except _RequestError as error:
                body = {"error": {"name": 400, "message": f"{error.name}: {error.message}"}}
                return web.Response(status=400, body=_encode(body), content_type="application/json",
                                    headers=headers)  # fmt: skip
            return web.Response(body=_encode(body), content_type="application/json", headers=headers)

        return handle

    def _remaining(self, group: str, left: int) -> dict[str, str]:
        if not self.flavor.remaining_req_header:
            return {}
        return {"Remaining-Req": f"group={group}; min=1800; sec={left}"}

    def _rest_refused(self, status: int, group: str, ban_left: float) -> web.Response:
        """A refused REST request in the exchange's shape: never a Retry-After, Bithumb's body empty."""
        headers = self._remaining(group, 0)
        if self.flavor.empty_429:
            return web.Response(status=status, headers=headers)
        if status == 418:
            seconds = max(1, round(ban_left))
            message = f"Too many requests. Your IP is blocked for {seconds} seconds."
        else:
            message = "Too many requests"
        body = {"error": {"name": "too_many_requests", "message": message}}
        return web.Response(
            status=status, body=_encode(body), content_type="application/json", headers=headers
        )

    def _markets(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        return [{"market": code, "korean_name": instrument.base, "english_name": instrument.base}
                for code, instrument in self._codes.items()]  # fmt: skip

    def _ticks(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        instrument = self._codes.get(params.get("market", ""))
        if instrument is None:
            raise _RequestError("INVALID_PARAM", "market")
        count = params.get("count", "1")
        if not count.isdigit() or not 1 <= int(count) <= 500:
            raise _RequestError("INVALID_PARAM", "count")
        history = self.market.history(instrument.symbol)
        stop = history.end
        cursor = params.get("cursor")
        if cursor:
            found = self.index_of_sequential_id(instrument, cursor)
            if found is None:
                return []
            stop = found
        trades = history.slice(stop - int(count), stop)
        return [self.truth_row(instrument, trade) for trade in reversed(trades)]

    def index_of_sequential_id(self, instrument: Instrument, sequential_id: str) -> int | None:
        if not sequential_id.isdigit() or not sequential_id.isascii():
            return None
        value = int(sequential_id)
        history = self.market.history(instrument.symbol)
        if self.flavor.string_sequential_id:
            trade_id = bithumb_trade_id(value)
            if trade_id is None:
                return None
            index = history.index_of_id(trade_id)
            return index if history.begin <= index < history.end else None
        index = history.first_index_at_or_after(value // 10_000)
        while index < history.end:
            trade = history.at(index)
            if trade.time > value // 10_000:
                return None
            if trade.id % 10_000 == value % 10_000:
                return index
            index += 1
        return None

    def _candles(self, unit: str) -> Any:
        """Newest first, at most `count` (≤ 200) bars, and only bars that had trades, like Upbit's."""

        def answer(params: Mapping[str, str]) -> list[dict[str, Any]]:
            instrument = self._codes.get(params.get("market", ""))
            if instrument is None:
                raise _RequestError("INVALID_PARAM", "market")
            count = params.get("count", "1")
            if not count.isdigit() or not 1 <= int(count) <= 200:
                raise _RequestError("INVALID_PARAM", "count")
            now_ms = self._now_ms()
            bars = self.market.klines(
                instrument.symbol, _CANDLE_INTERVALS[unit], None, None, int(count), now_ms
            )
            rows = []
            for bar in reversed([bar for bar in bars if bar.count]):
                start = datetime.fromtimestamp(bar.open_time / 1000, UTC)
                rows.append({
                    "market": f"{instrument.quote}-{instrument.base}",
                    "candle_date_time_utc": start.strftime("%Y-%m-%dT%H:%M:%S"),
                    "candle_date_time_kst": datetime.fromtimestamp(bar.open_time / 1000 + 9 * 3600, UTC)
                    .strftime("%Y-%m-%dT%H:%M:%S"),
                    "opening_price": _number(instrument.price(bar.open)),
                    "high_price": _number(instrument.price(bar.high)),
                    "low_price": _number(instrument.price(bar.low)),
                    "trade_price": _number(instrument.price(bar.close)),
                    "timestamp": min(bar.close_time, now_ms),
                    "candle_acc_trade_price": _number(instrument.notional(bar.quote_volume)),
                    "candle_acc_trade_volume": _number(instrument.quantity(bar.volume)),
                    "unit": int(unit[:-1]),
                })  # fmt: skip
            return rows

        return answer

    def _orderbooks(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        codes = [code for code in params.get("markets", "").split(",") if code]
        if not codes or any(code not in self._codes for code in codes):
            raise _RequestError("INVALID_PARAM", "markets")
        count = params.get("count", str(DEFAULT_BOOK_LEVELS))
        if not count.isdigit() or not 1 <= int(count) <= 30:
            raise _RequestError("INVALID_PARAM", "count")
        rows = []
        for code in codes:
            instrument = self._codes[code]
            update_id, time_ms, bids, asks = self.depth.snapshot_levels(instrument.symbol, int(count))
            rows.append({"market": code, **self._book_fields(instrument, bids, asks, update_id, time_ms)})
        return rows

    def _tickers(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        codes = [code for code in params.get("markets", "").split(",") if code]
        if not codes or any(code not in self._codes for code in codes):
            raise _RequestError("INVALID_PARAM", "markets")
        now_ms = self._now_ms()
        rows = []
        for code in codes:
            body = self._ticker_body(self._codes[code], now_ms, "REALTIME")
            body["market"] = body.pop("code")
            del body["type"], body["stream_type"]
            rows.append(body)
        return rows

    # -- ground truth and lifecycle -----------------------------------------------------------------

    def find_instrument(self, wanted: str) -> Instrument | None:
        return self._codes.get(wanted) or self.market.instruments.get(wanted)

    def truth_row(
        self, instrument: Instrument, trade: Trade, sequential_id: int | str | None = None
    ) -> dict[str, Any]:
        if sequential_id is None:
            sequential_id = self._sequential_id(trade)
        moment = datetime.fromtimestamp(trade.time / 1000, UTC)
        return {
            "market": f"{instrument.quote}-{instrument.base}", "trade_date_utc": moment.strftime("%Y-%m-%d"),
            "trade_time_utc": moment.strftime("%H:%M:%S"), "timestamp": trade.time,
            "trade_price": _number(trade.price), "trade_volume": _number(trade.quantity),
            "ask_bid": "BID" if trade.taker_side == "buy" else "ASK",
            "sequential_id": sequential_id,
        }  # fmt: skip

    async def close_all(self) -> None:
        self._stopping = True
        for connection in list(self._connections.values()):
            connection.close(GOING_AWAY)
        try:
            await asyncio.wait_for(self._all_closed.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            self.disconnect_all()
            await asyncio.wait_for(self._all_closed.wait(), CLOSE_TIMEOUT)

    # -- faults -------------------------------------------------------------------------------------

    def invent(
        self, instrument: Instrument, ids: str, count: int, event_type: str | None
    ) -> list[dict[str, Any]]:
        """Send `count` invented trades to the symbol's trade subscribers; their ground-truth-shaped rows."""
        history = self.market.history(instrument.symbol)
        now_ms = self._now_ms()
        serial = len(self.faults.invented.get(instrument.symbol, ()))
        rows = []
        for index in range(count):
            trade, value = self._invented(instrument, history, ids, serial + index, now_ms)
            sequential_id = str(value) if self.flavor.string_sequential_id else value
            sent = self._send_invented(instrument, trade, sequential_id, event_type, now_ms)
            rows.append({**self.truth_row(instrument, trade, sequential_id), "ids": ids,
                         "eventType": event_type, "sentTo": sent, "at": now_ms})  # fmt: skip
        return rows

    def _invented(
        self, instrument: Instrument, history: TradeHistory, ids: str, serial: int, now_ms: int
    ) -> tuple[Trade, int]:
        """An invented trade and its never-issued sequential_id (see simulator/invented.py)."""
        bithumb = self.flavor.string_sequential_id

        def issued(value: int) -> bool:
            return self.index_of_sequential_id(instrument, str(value)) is not None

        newest = history.last()
        if ids == "far":
            value = (FAR_BITHUMB_SEQUENTIAL_ID if bithumb else FAR_UPBIT_SEQUENTIAL_ID) + serial
            while issued(value):
                value += 1
            return unit_price_trade(instrument, -1, now_ms), value
        if ids == "next":
            price = newest.price_ticks if newest is not None else instrument.opening_price
            upcoming = history.first_id + history.total
            if bithumb:  # the id a trade a billion trades from now would get
                value = bithumb_sequential_id(upcoming + 10**9 + serial)
            else:  # this millisecond, with a counter the next thousands of trades will not reach
                value = now_ms * 10_000 + (upcoming + 5_000 + serial) % 10_000
            while issued(value):
                value += 1
            return make_trade(instrument, -1, price, odd_size(instrument, serial), now_ms), value
        real = real_trade_below_newest(history, serial)
        assert newest is not None
        newest_value = int(self._sequential_id(newest))
        if bithumb:
            value = newest_value - 1 - serial
        else:  # the real trade's millisecond, a counter none of that millisecond's trades has
            value = min(real.time * 10_000 + (real.id + 5_000) % 10_000, newest_value - 1)
        floor = _ID_BASE if bithumb else 0
        while value >= floor and issued(value):
            value -= 1
        if value < floor:
            raise InventError("no unissued sequential_id below the newest one")
        lots = real.quantity_lots + 1
        return make_trade(instrument, -1, real.price_ticks + 1, lots, real.time, real.taker_side), value

    def _send_invented(
        self,
        instrument: Instrument,
        trade: Trade,
        sequential_id: int | str,
        event_type: str | None,
        now_ms: int,
    ) -> int:
        stream = f"trade:{instrument.quote}-{instrument.base}"
        listeners = self._hub.subscribers.get(stream)
        if not listeners:
            return 0
        body = self._trade_body(instrument, trade, now_ms, "REALTIME", sequential_id)
        if event_type is not None:
            body["type"] = event_type
        self._fan_out(stream, "invented", body, time.monotonic())
        return len(listeners)

    def open_connections(self) -> list[UpbitConnection]:
        return [c for c in self._connections.values() if not c.closing]

    def send_server_shutdown(self) -> int:
        """Upbit and Bithumb announce nothing before closing; the shutdown fault just closes later."""
        return 0

    def configure_limits(self, settings: dict[str, float]) -> None:
        limit = self.rest_limit
        if "restPerSecond" in settings:
            limit.per_second = max(1, int(settings["restPerSecond"]))
        if "restBanAfter" in settings:
            limit.ban_after = max(1, int(settings["restBanAfter"]))
        if "restBanSeconds" in settings:
            limit.ban_seconds = settings["restBanSeconds"]

    def limits_state(self) -> dict[str, Any]:
        limit = self.rest_limit
        return {"restPerSecond": limit.per_second, "restBanAfter": limit.ban_after,
                "restBanSeconds": limit.ban_seconds, "banned": limit.banned(time.monotonic())}  # fmt: skip

    def clear_bans(self) -> None:
        self.rest_limit.clear()

    def disconnect_all(self) -> int:
        connections = list(self._connections.values())
        for connection in connections:
            connection.abort()
        return len(connections)

    def stats(self) -> dict[str, Any]:
        return {
            "connections": {"open": len(self._connections), "total": self.connections_total},
            "subscriptions": {cid: list(c.streams) for cid, c in self._connections.items()},
            "framesSent": dict(self.frames_sent),
            "violations": sum(self.violations.values()) + sum(self.faults.violations.values()),
            "violationsByReason": dict(self.violations),
            "faults": self.faults.state(),
            "idleCloses": self.idle_closes,
            "rest": {"requests": self.rest_requests, "rejected": self.rest_rejected},
        }

    def _now_ms(self) -> int:
        return int(self.market.clock() * 1000)


# Bithumb's sequential_ids are 18-digit numbers unrelated to time or order (`862683813820523888`): the
# trade id scrambled by a multiplication modulo _ID_SPAN, a bijection the cursor lookup inverts.
_ID_BASE = 10**17
_ID_SPAN = 9 * 10**17
_ID_FACTOR = 614_889_782_588_491_411  # coprime with _ID_SPAN (2^17 · 3^2 · 5^17): invertible
_ID_INVERSE = pow(_ID_FACTOR, -1, _ID_SPAN)


def upbit_sequential_id(trade: Trade) -> int:
    """Upbit's shape: the trade time in ms followed by a 4-digit counter. Unique, and only roughly
    ordered, like the real one."""
    return trade.time * 10_000 + trade.id % 10_000


def bithumb_sequential_id(trade_id: int) -> int:
    return _ID_BASE + trade_id * _ID_FACTOR % _ID_SPAN


def bithumb_trade_id(sequential_id: int) -> int | None:
    if not _ID_BASE <= sequential_id < _ID_BASE + _ID_SPAN:
        return None
    return (sequential_id - _ID_BASE) * _ID_INVERSE % _ID_SPAN


class _RequestError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def format_ratio_plain(numerator: int, denominator: int) -> str:
    """numerator / denominator with 8 decimals, sign kept (Upbit's change rates)."""
    negative = (numerator < 0) != (denominator < 0) and numerator != 0
    scaled = (abs(numerator) * 10**8 * 2 // abs(denominator) + 1) // 2
    return format_units(-scaled if negative else scaled, 8)


class Upbit(UpbitStyle):
    def __init__(self, market: Market, **kwargs: Any) -> None:
        super().__init__(market, UPBIT, **kwargs)


class Bithumb(UpbitStyle):
    def __init__(self, market: Market, **kwargs: Any) -> None:
        super().__init__(market, BITHUMB, **kwargs)
