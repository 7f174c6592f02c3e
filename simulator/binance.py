"""The Binance spot dialect: WebSocket market streams and the public REST API over a `Market`.

WebSocket: raw `/ws`, `/ws/<stream>[/<stream>...]` and combined `/stream?streams=a/b`, live
SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS / SET_PROPERTY / GET_PROPERTY, server pings, the
5 messages/s and 1024 streams limits, and a `serverShutdown` event when the simulator stops.
Diff depth streams (`<s>@depth@100ms`, `<s>@depth`) and the depth snapshot come from the market's
ground-truth books (simulator/book.py).
REST: `/api/v3/` ping, time, exchangeInfo, trades, historicalTrades, aggTrades, klines, ticker/24hr and
depth, with request weights reported in `X-MBX-USED-WEIGHT-1M` and enforced per minute.

Error replies to control messages use the shape the live exchange sends,
`{"error": {"code": 2, "msg": "Invalid request: ..."}, "id": 1}`; the documentation lists only the
inner object.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from simulator import binance_format as fmt
from simulator import invented
from simulator.book import DepthFeed, DiffEvent
from simulator.connections import PONG, Connection, StreamHub, text_frame
from simulator.faults import Faults
from simulator.market import KLINE_INTERVALS, Instrument, Market, Tick, Trade, bar_open_time

log = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION = 1024
MAX_MESSAGES_PER_SECOND = 5
CLOSE_TIMEOUT = 2.0  # how long a closing handshake may take before the socket is dropped
POLICY_VIOLATION = 1008
GOING_AWAY = 1001

_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_UNKNOWN_METHOD = "expected one of " + ", ".join(f"`{method}`" for method in _METHODS)
_STRING_ID = re.compile(r"^[A-Za-z0-9]{1,36}$")
_UNSIGNED = re.compile(r"^[0-9]{1,20}$")
_SYMBOL_LIST = re.compile(r'^\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\]$')
_SIMPLE_STREAMS = ("trade", "aggTrade", "ticker", "bookTicker")

_encode = msgspec.json.encode
_Weigher = Callable[[Mapping[str, str]], int]  # a REST endpoint's request weight, from its parameters
_Answerer = Callable[[Mapping[str, str]], Any]  # a REST endpoint's body; raises BinanceError


@dataclass(frozen=True, slots=True)
class Stream:
    name: str  # "btcusdt@kline_1m"
    kind: str  # trade, aggTrade, kline, ticker, bookTicker or depth: also the frame counter's key
    symbol: str  # the market's "BTC/USDT"
    interval: str | None = None
    speed_ms: int = 0  # depth: the time between a diff stream's events


@dataclass(frozen=True, slots=True)
class _SymbolStreams:
    """Precomputed names, so publishing a trade costs dictionary lookups and no string building."""

    instrument: Instrument
    exchange_symbol: str
    trade: str
    agg_trade: str
    book_ticker: str


class BinanceConnection(Connection):
    combined = False  # wrap frames as {"stream": ..., "data": ...}
    route = ""  # the futures entry point it came through (public, market); spot has a single one


class BinanceError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


class RequestWeights:
    """REST request weight used per client IP over a rolling minute."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._used: dict[str, int] = {}

    def used(self, client: str, now: float) -> int:
        spent = self._spent.get(client)
        if spent is None:
            return 0
        used = self._used[client]
        while spent and spent[0][0] <= now - self.window:
            used -= spent.popleft()[1]
        self._used[client] = used
        return used

    def charge(self, client: str, weight: int, now: float) -> int | None:
        """Add a request's weight; None (and nothing added) when it would exceed the limit."""
        used = self.used(client, now) + weight
        if used > self.limit:
            return None
        self._spent.setdefault(client, deque()).append((now, weight))
        self._used[client] = used
        return used

    def retry_after(self, client: str, now: float) -> int:
        spent = self._spent.get(client)
        if not spent:
            return 1
        return max(1, int(spent[0][0] + self.window - now) + 1)

    def snapshot(self, now: float) -> dict[str, int]:
        return {client: self.used(client, now) for client in list(self._spent)}


class BinanceSpot:
    """Serves one `Market` the way Binance spot does."""

    name = "binance"
    # Diff depth channels and their speeds (`@depth` is one second on spot).
    depth_channels: dict[str, int] = {"depth": 1000, "depth@100ms": 100}

    def __init__(
        self,
        market: Market,
        *,
        ping_interval: float = 20.0,
        pong_timeout: float = 60.0,
        weight_limit: int = fmt.WEIGHT_LIMIT_PER_MINUTE,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        max_messages_per_second: int = MAX_MESSAGES_PER_SECOND,
    ) -> None:
        self.market = market
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.max_streams = max_streams
        self.max_messages_per_second = max_messages_per_second
        self.weights = RequestWeights(weight_limit)
        self._symbols = {
            symbol: _symbol_streams(instrument) for symbol, instrument in market.instruments.items()
        }
        self._by_exchange_symbol = {names.exchange_symbol: names for names in self._symbols.values()}
        self._by_stream_symbol = {names.exchange_symbol.lower(): names for names in self._symbols.values()}
        self._hub: StreamHub[BinanceConnection] = StreamHub()
        self._streams: dict[str, Stream] = {}  # parsed stream names
        self._combined_prefixes: dict[str, bytes] = {}
        self._connections: dict[str, BinanceConnection] = {}
        self._connection_ids = itertools.count(1)
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._stopping = False
        # Periodic streams with at least one subscriber, and the bar each kline interval is in.
        self._tickers: dict[str, Stream] = {}
        self._klines: dict[str, dict[str, Stream]] = {}
        self._bar_open: dict[str, int] = {}
        self._next_second_ms = 0
        self._next_two_seconds_ms = 0
        self._next_housekeeping = 0.0
        self._housekeeping_period = min(1.0, ping_interval / 4, pong_timeout / 4)
        # Statistics.
        self.frames_sent: dict[str, int] = {}
        self.connections_total = 0
        self.violations: dict[str, int] = {"messageRate": 0, "streamLimit": 0}
        self.pong_timeouts = 0
        self.slow_consumers = 0
        self.rest_requests = 0
        self.rest_rejected = 0
        self.faults = Faults()  # test-triggered faults, and the per-IP handshake limit
        self.depth = self._depth_feed()

    # -- routes -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ws", self._handle_ws)
        app.router.add_get("/ws/{streams:.+}", self._handle_ws)
        app.router.add_get("/stream", self._handle_ws)
        endpoints: dict[str, tuple[_Weigher, _Answerer]] = {
            "ping": (lambda _: 1, lambda _: {}),
            "time": (lambda _: 1, lambda _: {"serverTime": self._now_ms()}),
            "exchangeInfo": (lambda _: 20, self._exchange_info),
            "trades": (lambda _: 25, self._trades),
            "historicalTrades": (lambda _: 25, self._historical_trades),
            "aggTrades": (lambda _: 4, self._agg_trades),
            "klines": (lambda _: 2, self._klines_rest),
            "ticker/24hr": (_ticker_weight, self._ticker_24hr),
            "depth": (_depth_weight, self._depth),
        }
        for path, (weigh, answer) in endpoints.items():
            app.router.add_get(f"/api/v3/{path}", self._rest_handler(weigh, answer))

    # -- WebSocket ----------------------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            raise web.HTTPServiceUnavailable()
        refusal = self.faults.handshake_refusal(request.remote or "unknown", time.monotonic())
        if refusal is not None:
            return _json_response({"code": -1003, "msg": "Connection refused."}, refusal)
        combined = self._is_combined(request)
        listed = request.query.get("streams", "") if combined else request.match_info.get("streams", "")
        names = [name for name in listed.split("/") if name]
        streams = [self._parse_stream(name) for name in names]
        if any(stream is None for stream in streams):
            return _json_response({"code": 2, "msg": "Invalid request: invalid stream"}, 400)
        if len(set(names)) > self.max_streams:
            self.violations["streamLimit"] += 1
            return _json_response({"code": 2, "msg": "Invalid request: too many streams"}, 400)

        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=CLOSE_TIMEOUT)
        await ws.prepare(request)
        connection = self._new_connection(ws, request)
        connection.combined = combined
        self._connections[connection.id] = connection
        self._all_closed.clear()
        self.connections_total += 1
        for stream in streams:
            assert stream is not None
            self._subscribe(connection, stream)
        try:
            await self._read(connection, ws)
        finally:
            log.debug("%s closed: code %s, error %r", connection.id, ws.close_code, ws.exception())
            del self._connections[connection.id]
            for name in self._hub.drop(connection):
                self._forget(name)
            if connection.slow_consumer:
                self.slow_consumers += 1
            await connection.finished(CLOSE_TIMEOUT)
            if not self._connections:
                self._all_closed.set()
        return ws

    def _is_combined(self, request: web.Request) -> bool:
        """Whether the URL asks for the combined envelope (`/stream`) rather than raw frames (`/ws`)."""
        return request.path.startswith("/stream")

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> BinanceConnection:
        return BinanceConnection(
            f"{self.name}-{next(self._connection_ids)}",
            ws,
            request,
            self.frames_sent,
            now=time.monotonic(),
            max_messages_per_second=self.max_messages_per_second,
        )

    async def _read(self, connection: BinanceConnection, ws: web.WebSocketResponse) -> None:
        async for message in ws:
            # Binance counts every incoming frame against the limit, pings and pongs included.
            if not connection.note_incoming(time.monotonic()):
                self.violations["messageRate"] += 1
                log.info(
                    "%s sent more than %d messages in a second", connection.id, self.max_messages_per_second
                )
                connection.close(POLICY_VIOLATION, discard_queued=True)
            elif message.type is WSMsgType.TEXT:
                reply = self._control(connection, message.data)
                if reply is not None:
                    connection.send("control", text_frame(_encode(reply)))
            elif message.type is WSMsgType.PING:
                connection.send(PONG, message.data)
            elif message.type is WSMsgType.PONG:
                connection.pong_received(message.data)
            elif message.type is WSMsgType.BINARY:
                reply = self._control(connection, message.data.decode("utf-8", "replace"))
                if reply is not None:
                    connection.send("control", text_frame(_encode(reply)))
            else:  # ERROR
                break
            if connection.closing:
                break

    def _control(self, connection: BinanceConnection, text: str) -> dict[str, Any] | None:
        """Answer one control message; None when the connection is being dropped instead."""
        try:
            request = json.loads(text)
        except ValueError as error:
            return _error(3, f"Invalid JSON: {_json_reason(error)}")
        if not isinstance(request, dict):
            return _error(2, "Invalid request: invalid type, expected a JSON object")
        request_id = request.get("id")
        if not _valid_request_id(request_id):
            return _error(2, "Invalid request: request ID must be an unsigned integer")
        if "method" not in request:
            return _error(2, "Invalid request: missing field `method`", request_id)
        method = request["method"]
        if method not in _METHODS:
            return _error(2, f"Invalid request: unknown variant `{method}`, {_UNKNOWN_METHOD}", request_id)
        params = request.get("params", [])
        if not isinstance(params, list):
            return _error(2, "Invalid request: invalid type for `params`, expected a sequence", request_id)

        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            streams = [self._parse_stream(name) if isinstance(name, str) else None for name in params]
            if any(stream is None for stream in streams):
                return _error(2, "Invalid request: invalid stream", request_id)
            if method == "UNSUBSCRIBE":
                for stream in streams:
                    assert stream is not None
                    if self._hub.unsubscribe(connection, stream.name):
                        self._forget(stream.name)
                return {"result": None, "id": request_id}
            if len(connection.streams.keys() | {s.name for s in streams if s}) > self.max_streams:
                self.violations["streamLimit"] += 1
                connection.close(POLICY_VIOLATION, discard_queued=True)
                return None
            for stream in streams:
                assert stream is not None
                self._subscribe(connection, stream)
            return {"result": None, "id": request_id}
        if method == "LIST_SUBSCRIPTIONS":
            if params:
                return _error(2, "Invalid request: too many parameters", request_id)
            return {"result": list(connection.streams), "id": request_id}
        expected = 2 if method == "SET_PROPERTY" else 1
        if len(params) > expected:
            return _error(2, "Invalid request: too many parameters", request_id)
        if len(params) < expected:
            return _error(2, "Invalid request: missing parameters", request_id)
        if params[0] != "combined":
            return _error(0, "Unknown property", request_id)
        if method == "GET_PROPERTY":
            return {"result": connection.combined, "id": request_id}
        if not isinstance(params[1], bool):
            return _error(1, "Invalid value type: expected Boolean", request_id)
        connection.combined = params[1]
        return {"result": None, "id": request_id}

    def _parse_stream(self, name: str) -> Stream | None:
        stream = self._streams.get(name)
        if stream is not None:
            return stream
        symbol, _, kind = name.partition("@")
        names = self._by_stream_symbol.get(symbol)
        if names is None:
            return None
        if kind in _SIMPLE_STREAMS:
            stream = Stream(name, kind, names.instrument.symbol)
        elif kind.startswith("kline_") and kind[6:] in KLINE_INTERVALS:
            stream = Stream(name, "kline", names.instrument.symbol, kind[6:])
        elif kind in self.depth_channels:
            stream = Stream(name, "depth", names.instrument.symbol, speed_ms=self.depth_channels[kind])
        else:
            return None
        self._streams[name] = stream
        return stream

    def _subscribe(self, connection: BinanceConnection, stream: Stream) -> None:
        if not self._hub.subscribe(connection, stream.name):
            return
        if stream.kind == "ticker":
            self._tickers[stream.name] = stream
        elif stream.kind == "kline":
            assert stream.interval is not None
            if stream.interval not in self._klines:
                self._klines[stream.interval] = {}
                self._bar_open[stream.interval] = bar_open_time(stream.interval, self._now_ms())
            self._klines[stream.interval][stream.name] = stream
        elif stream.kind == "depth":
            self.depth.open_stream(stream.name, stream.symbol, stream.speed_ms)

    def _forget(self, name: str) -> None:
        """The stream lost its last subscriber: stop producing its periodic frames."""
        stream = self._streams[name]
        if stream.kind == "ticker":
            self._tickers.pop(name, None)
        elif stream.kind == "depth":
            self.depth.close_stream(name)
        elif stream.kind == "kline" and stream.interval in self._klines:
            streams = self._klines[stream.interval]
            streams.pop(name, None)
            if not streams:
                del self._klines[stream.interval]
                del self._bar_open[stream.interval]

    # -- publishing ---------------------------------------------------------------------------------

    def publish(self, tick: Tick, monotonic_now: float) -> None:
        """Fan a market tick out to subscribers, then the periodic streams, then keepalive."""
        subscribers = self._hub.subscribers
        if subscribers:
            event_time = tick.time
            skipping = self.faults.skipping
            for trade in tick.trades:
                if skipping and self.faults.skips(trade.symbol, trade.id, monotonic_now):
                    continue
                names = self._symbols[trade.symbol]
                listeners = subscribers.get(names.trade)
                if listeners:
                    payload = fmt.trade_event(names.exchange_symbol, names.instrument, trade, event_time)
                    self._fan_out(names.trade, "trade", listeners, _encode(payload))
                listeners = subscribers.get(names.agg_trade)
                if listeners:
                    payload = fmt.agg_trade_event(names.exchange_symbol, names.instrument, trade, event_time)
                    self._fan_out(names.agg_trade, "aggTrade", listeners, _encode(payload))
            for quote in tick.quotes:
                names = self._symbols[quote.symbol]
                listeners = subscribers.get(names.book_ticker)
                if listeners:
                    payload = fmt.book_ticker_event(names.exchange_symbol, names.instrument, quote)
                    self._fan_out(names.book_ticker, "bookTicker", listeners, _encode(payload))
        # A paused market is silent: no klines or tickers either, only keepalive.
        # Diff depth after the bookTickers of the tick: Binance batches it, bookTicker is real-time.
        self._publish_depth(tick)
        if not self.market.paused and (self._klines or self._tickers):
            self._publish_periodic(tick.time)
        if monotonic_now >= self._next_housekeeping:
            self._housekeeping(monotonic_now)

    def _publish_depth(self, tick: Tick) -> None:
        """Advance the books in use to the tick; send the diff events that are due."""
        depth = self.depth
        depth.advance(tick)
        if not depth.streams:
            return
        subscribers = self._hub.subscribers
        for event in depth.due_events(tick.time):
            listeners = subscribers.get(event.stream)
            if listeners:
                payload = self._depth_event(event, tick.time)
                self._fan_out(event.stream, "depth", listeners, _encode(payload))

    def _depth_feed(self) -> DepthFeed:
        names = {
            spelling: symbol
            for symbol, n in self._symbols.items()
            for spelling in (symbol, n.exchange_symbol)
        }
        return DepthFeed(self.market, names, fmt._price, fmt._quantity)

    def _depth_event(self, event: DiffEvent, event_time: int) -> dict[str, Any]:
        instrument = self.market.instruments[event.symbol]
        return {
            "e": "depthUpdate", "E": event_time, "s": self._symbols[event.symbol].exchange_symbol,
            "U": event.first_update_id, "u": event.last_update_id,
            "b": self.depth.format(instrument, event.bids), "a": self.depth.format(instrument, event.asks),
        }  # fmt: skip

    def _publish_periodic(self, now_ms: int) -> None:
        # Bars that closed since the previous tick get their final (x=true) update right away.
        for interval, streams in self._klines.items():
            open_time = bar_open_time(interval, now_ms)
            previous = self._bar_open[interval]
            if open_time != previous:
                self._bar_open[interval] = open_time
                for stream in streams.values():
                    self._send_kline(stream, previous, now_ms, closed=True)
        # The current bar every 2 s (every 1 s for `1s` bars), tickers every 1 s.
        every_second = now_ms >= self._next_second_ms
        every_two_seconds = now_ms >= self._next_two_seconds_ms
        if every_second:
            self._next_second_ms = (now_ms // 1000 + 1) * 1000
            for stream in self._tickers.values():
                self._send_ticker(stream, now_ms)
        if every_two_seconds:
            self._next_two_seconds_ms = (now_ms // 2000 + 1) * 2000
        if every_second or every_two_seconds:
            for interval, streams in self._klines.items():
                if every_two_seconds or (interval == "1s" and every_second):
                    for stream in streams.values():
                        self._send_kline(stream, self._bar_open[interval], now_ms, closed=False)

    def _send_kline(self, stream: Stream, open_time: int, now_ms: int, closed: bool) -> None:
        listeners = self._hub.subscribers.get(stream.name)
        if not listeners:
            return
        assert stream.interval is not None
        names = self._symbols[stream.symbol]
        bar = self.market.kline(stream.symbol, stream.interval, open_time)
        payload = fmt.kline_event(names.exchange_symbol, names.instrument, bar, now_ms, closed)
        self._fan_out(stream.name, "kline", listeners, _encode(payload))

    def _send_ticker(self, stream: Stream, now_ms: int) -> None:
        listeners = self._hub.subscribers.get(stream.name)
        if not listeners:
            return
        names = self._symbols[stream.symbol]
        stats = self.market.rolling_stats(stream.symbol, now_ms)
        quote = self.market.quote(stream.symbol)
        payload = fmt.ticker_event(names.exchange_symbol, names.instrument, stats, quote, now_ms)
        self._fan_out(stream.name, "ticker", listeners, _encode(payload))

    def _fan_out(
        self, stream: str, kind: str, listeners: Mapping[BinanceConnection, None], raw: bytes
    ) -> None:
        # Encoded once; each form (raw, combined) is framed at most once, and only if someone needs it.
        raw_frame: bytes | None = None
        combined_frame: bytes | None = None
        for connection in listeners:
            if connection.combined:
                if combined_frame is None:
                    combined_frame = text_frame(self._wrap(stream, raw))
                connection.send(kind, combined_frame)
            else:
                if raw_frame is None:
                    raw_frame = text_frame(raw)
                connection.send(kind, raw_frame)

    def _wrap(self, stream: str, raw: bytes) -> bytes:
        prefix = self._combined_prefixes.get(stream)
        if prefix is None:
            prefix = self._combined_prefixes[stream] = b'{"stream":' + _encode(stream) + b',"data":'
        return prefix + raw + b"}"

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + self._housekeeping_period
        payload = str(self._now_ms()).encode()
        for connection in list(self._connections.values()):
            if connection.closing:
                continue
            if connection.pong_overdue(now, self.pong_timeout):
                self.pong_timeouts += 1
                log.info("%s did not answer a ping within %.1f s", connection.id, self.pong_timeout)
                connection.close(POLICY_VIOLATION, discard_queued=True)
            elif now - connection.last_ping_at >= self.ping_interval:
                connection.send_ping(payload, now)

    # -- lifecycle --------------------------------------------------------------------------------

    async def close_all(self) -> None:
        """Tell every client the server is going away, close them, wait for the handlers."""
        self._stopping = True
        event = _encode(fmt.server_shutdown_event(self._now_ms()))
        raw, combined = text_frame(event), text_frame(self._wrap("!serverShutdown", event))
        for connection in list(self._connections.values()):
            connection.send("serverShutdown", combined if connection.combined else raw)
            connection.close(GOING_AWAY)
        try:
            await asyncio.wait_for(self._all_closed.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            self.disconnect_all()
            await asyncio.wait_for(self._all_closed.wait(), CLOSE_TIMEOUT)

    def inject(self, payload: bytes, *, binary: bool = False, stream: str | None = None) -> int:
        """Queue `payload`, untouched, as one frame to every open connection or to a stream's subscribers.

        The frame joins each connection's queue behind the market frames already there.
        """
        frame = text_frame(payload)
        if binary:
            frame = b"\x82" + frame[1:]  # same framing, binary opcode
        targets = self._connections.values() if stream is None else self._hub.subscribers.get(stream, {})
        sent = 0
        for connection in list(targets):
            if not connection.closing:
                connection.send("injected", frame)
                sent += 1
        return sent

    def invent(
        self, instrument: Instrument, ids: str, count: int, event_type: str | None
    ) -> list[dict[str, Any]]:
        """Send `count` invented trades to the symbol's trade streams; their ground-truth-shaped rows."""
        names = self._symbols[instrument.symbol]
        history = self.market.history(instrument.symbol)
        now_ms = self._now_ms()
        serial = len(self.faults.invented.get(instrument.symbol, ()))
        rows = []
        for index in range(count):
            trade = invented.binance_trade(instrument, history, ids, index, serial + index, now_ms)
            sent = self._send_invented(names, trade, event_type, now_ms)
            rows.append({**self.truth_row(instrument, trade), "ids": ids, "eventType": event_type,
                         "sentTo": sent, "at": now_ms})  # fmt: skip
        return rows

    def _send_invented(self, names: _SymbolStreams, trade: Trade, event_type: str | None, now_ms: int) -> int:
        sent = 0
        for stream, event in ((names.trade, fmt.trade_event), (names.agg_trade, fmt.agg_trade_event)):
            listeners = self._hub.subscribers.get(stream)
            if listeners:
                payload = event(names.exchange_symbol, names.instrument, trade, now_ms)
                if event_type is not None:
                    payload["e"] = event_type
                self._fan_out(stream, "invented", listeners, _encode(payload))
                sent += len(listeners)
        return sent

    def find_instrument(self, wanted: str) -> Instrument | None:
        """An instrument by exchange symbol (BTCUSDT) or market symbol (BTC/USDT)."""
        names = self._by_exchange_symbol.get(wanted)
        if names is not None:
            return names.instrument
        return self.market.instruments.get(wanted)

    def truth_row(self, instrument: Instrument, trade: Trade) -> dict[str, Any]:
        return fmt.rest_trade(instrument, trade)

    def configure_limits(self, settings: dict[str, float]) -> None:
        raise ValueError(f"{self.name} limits REST by request weight, not by requests per second")

    def limits_state(self) -> dict[str, Any]:
        return {"weightPerMinute": self.weights.limit}

    def clear_bans(self) -> None:
        """Binance's bans are the faults' Retry-After blocks, which the faults clear themselves."""

    def open_connections(self) -> list[BinanceConnection]:
        return [c for c in self._connections.values() if not c.closing]

    def send_server_shutdown(self) -> int:
        """Announce a shutdown on every open connection without closing them (the fault does, later)."""
        event = _encode(fmt.server_shutdown_event(self._now_ms()))
        raw, combined = text_frame(event), text_frame(self._wrap("!serverShutdown", event))
        connections = self.open_connections()
        for connection in connections:
            connection.send("serverShutdown", combined if connection.combined else raw)
        return len(connections)

    def disconnect_all(self) -> int:
        """Drop every connection at the TCP level, without close frames."""
        connections = list(self._connections.values())
        for connection in connections:
            connection.abort()
        return len(connections)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "connections": {"open": len(self._connections), "total": self.connections_total},
            "subscriptions": {cid: list(c.streams) for cid, c in self._connections.items()},
            "framesSent": dict(self.frames_sent),
            "violations": sum(self.violations.values()) + sum(self.faults.violations.values()),
            "violationsByReason": dict(self.violations),
            "faults": self.faults.state(),
            "pongTimeouts": self.pong_timeouts,
            "slowConsumers": self.slow_consumers,
            "rest": {
                "requests": self.rest_requests,
                "rejected": self.rest_rejected,
                "usedWeight1m": self.weights.snapshot(now),
            },
        }

    # -- REST -------------------------------------------------------------------------------------

    def _rest_handler(
        self, weigh: _Weigher, answer: _Answerer
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            self.rest_requests += 1
            client = request.remote or "unknown"
            now = time.monotonic()
            refused = self.faults.rest_refusal(client, now)
            if refused is not None:
                self.rest_rejected += 1
                status, retry_after = refused
                body = {"code": -1003, "msg": "Way too many requests; IP banned until later."}
                return _json_response(body, status, {"Retry-After": str(retry_after)})
            used = self.weights.charge(client, weigh(request.query), now)
            if used is None:
                self.rest_rejected += 1
                body = {
                    "code": -1003,
                    "msg": (
                        f"Too much request weight used; current limit is {self.weights.limit} request "
                        "weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling "
                        "the API."
                    ),
                }
                retry_after = self.weights.retry_after(client, now)
                self.faults.note_throttled(client, now, retry_after)
                headers = {
                    "X-MBX-USED-WEIGHT-1M": str(self.weights.used(client, now)),
                    "Retry-After": str(retry_after),
                }
                return _json_response(body, 429, headers)
            try:
                body, status = answer(request.query), 200
            except BinanceError as error:
                body, status = {"code": error.code, "msg": error.msg}, error.status
            return _json_response(body, status, {"X-MBX-USED-WEIGHT-1M": str(used)})

        return handle

    def _exchange_info(self, params: Mapping[str, str]) -> dict[str, Any]:
        selected = self._selected_symbols(params)
        names = selected if selected is not None else list(self._symbols.values())
        return fmt.exchange_info([n.instrument for n in names], self._now_ms())

    def _trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        names = self._symbol(params)
        limit = _limit(params, default=500, maximum=1000)
        history = self.market.history(names.instrument.symbol)
        trades = history.slice(history.end - limit, history.end)
        return [fmt.rest_trade(names.instrument, trade) for trade in trades]

    def _historical_trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        names = self._symbol(params)
        limit = _limit(params, default=500, maximum=1000)
        from_id = _integer(params, "fromId")
        history = self.market.history(names.instrument.symbol)
        start = history.end - limit if from_id is None else history.index_of_id(from_id)
        trades = history.slice(start, max(start, history.begin) + limit)
        return [fmt.rest_trade(names.instrument, trade) for trade in trades]

    def _agg_trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        names = self._symbol(params)
        limit = _limit(params, default=500, maximum=1000)
        from_id = _integer(params, "fromId")
        start_time, end_time = _time_range(params)
        history = self.market.history(names.instrument.symbol)
        stop = history.end if end_time is None else history.first_index_after(end_time)
        if from_id is None and start_time is None:
            start = stop - limit  # the newest aggregates (up to endTime)
        else:
            start = history.begin
            if from_id is not None:
                start = max(start, history.index_of_id(from_id))
            if start_time is not None:
                start = max(start, history.first_index_at_or_after(start_time))
        start = max(start, history.begin)
        trades = history.slice(start, min(stop, start + limit))
        return [fmt.rest_agg_trade(names.instrument, trade) for trade in trades]

    def _klines_rest(self, params: Mapping[str, str]) -> list[list[Any]]:
        names = self._symbol(params)
        interval = params.get("interval")
        if not interval:
            raise _mandatory("interval")
        if interval not in KLINE_INTERVALS:
            raise BinanceError(-1120, "Invalid interval.")
        if params.get("timeZone", "0") not in ("0", "+0", "-0", "00:00", "+00:00", "-00:00"):
            raise BinanceError(-1130, "Data sent for parameter 'timeZone' is not valid.")
        limit = _limit(params, default=500, maximum=1000)
        start_time, end_time = _time_range(params)
        bars = self.market.klines(
            names.instrument.symbol, interval, start_time, end_time, limit, self._now_ms()
        )
        return [fmt.rest_kline(names.instrument, bar) for bar in bars]

    def _ticker_24hr(self, params: Mapping[str, str]) -> Any:
        kind = params.get("type", "FULL")
        if kind not in ("FULL", "MINI"):
            raise BinanceError(-1130, "Data sent for parameter 'type' is not valid.")
        now_ms = self._now_ms()

        def ticker(names: _SymbolStreams) -> dict[str, Any]:
            symbol = names.instrument.symbol
            stats = self.market.rolling_stats(symbol, now_ms)
            return fmt.rest_ticker(
                names.exchange_symbol, names.instrument, stats, self.market.quote(symbol), kind == "FULL"
            )

        if "symbol" in params:
            return ticker(self._symbol(params))
        selected = self._selected_symbols(params)
        return [ticker(names) for names in (selected if selected is not None else self._symbols.values())]

    def _depth(self, params: Mapping[str, str]) -> dict[str, Any]:
        names = self._symbol(params)
        limit = _limit(params, default=100, maximum=5000)
        update_id, _, bids, asks = self.depth.snapshot(names.instrument.symbol, limit)
        return {"lastUpdateId": update_id, "bids": bids, "asks": asks}

    def _symbol(self, params: Mapping[str, str]) -> _SymbolStreams:
        symbol = params.get("symbol")
        if not symbol:
            raise _mandatory("symbol")
        names = self._by_exchange_symbol.get(symbol)
        if names is None:
            raise BinanceError(-1121, "Invalid symbol.")
        return names

    def _selected_symbols(self, params: Mapping[str, str]) -> list[_SymbolStreams] | None:
        """The `symbol` or `symbols` filter of exchangeInfo and ticker/24hr; None without one."""
        if "symbol" in params and "symbols" in params:
            raise BinanceError(-1128, "Combination of optional parameters invalid.")
        if "symbol" in params:
            return [self._symbol(params)]
        if "symbols" not in params:
            return None
        text = params["symbols"]
        if not _SYMBOL_LIST.match(text):
            raise BinanceError(
                -1100,
                f"Illegal characters found in parameter 'symbols'; legal range is '{_SYMBOL_LIST.pattern}'.",
            )
        symbols = json.loads(text)
        if not symbols:
            raise BinanceError(-1130, "Data sent for parameter 'symbols' is not valid.")
        selected = [self._by_exchange_symbol.get(symbol) for symbol in symbols]
        if any(names is None for names in selected):
            raise BinanceError(-1121, "Invalid symbol.")
        return [names for names in selected if names is not None]

    def _now_ms(self) -> int:
        return int(self.market.clock() * 1000)


def _symbol_streams(instrument: Instrument) -> _SymbolStreams:
    symbol = fmt.exchange_symbol(instrument)
    lower = symbol.lower()
    return _SymbolStreams(instrument, symbol, f"{lower}@trade", f"{lower}@aggTrade", f"{lower}@bookTicker")


def _json_response(body: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json", headers=headers)


def _error(code: int, msg: str, *request_id: Any) -> dict[str, Any]:
    """A control-message error; `id` is echoed only when the request's id could be read."""
    reply: dict[str, Any] = {"error": {"code": code, "msg": msg}}
    if request_id:
        reply["id"] = request_id[0]
    return reply


def _json_reason(error: ValueError) -> str:
    # Binance's parser words it "expected value at line 1 column 1"; Python's says "Expecting value".
    if not isinstance(error, json.JSONDecodeError):
        return str(error)
    reason = error.msg
    if reason.startswith("Expecting "):
        reason = "expected " + reason[len("Expecting ") :]
    return f"{reason[:1].lower()}{reason[1:]} at line {error.lineno} column {error.colno}"


def _valid_request_id(request_id: Any) -> bool:
    if request_id is None:
        return True
    if isinstance(request_id, bool):
        return False
    if isinstance(request_id, int):
        return -(2**63) <= request_id < 2**63
    return isinstance(request_id, str) and _STRING_ID.match(request_id) is not None


def _mandatory(name: str) -> BinanceError:
    return BinanceError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def _integer(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    if text == "":
        raise BinanceError(-1105, f"Parameter '{name}' was empty.")
    if not _UNSIGNED.match(text):
        raise BinanceError(
            -1100, f"Illegal characters found in parameter '{name}'; legal range is '{_UNSIGNED.pattern}'."
        )
    return int(text)


def _limit(params: Mapping[str, str], default: int, maximum: int) -> int:
    limit = _integer(params, "limit")
    if limit is None:
        return default
    if limit < 1:
        raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
    return min(limit, maximum)  # Binance quietly caps an oversized limit


def _time_range(params: Mapping[str, str]) -> tuple[int | None, int | None]:
    start, end = _integer(params, "startTime"), _integer(params, "endTime")
    if start is not None and end is not None and start > end:
        raise BinanceError(-1023, "Start time is greater than end time.")
    return start, end


def _ticker_weight(params: Mapping[str, str]) -> int:
    if "symbol" in params:
        return 2
    text = params.get("symbols")
    if text is None:
        return 80
    count = text.count(",") + 1
    return 2 if count <= 20 else 40 if count <= 100 else 80


def _depth_weight(params: Mapping[str, str]) -> int:
    text = params.get("limit", "100")
    limit = int(text) if _UNSIGNED.match(text) else 100
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
