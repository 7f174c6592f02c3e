"""Binance spot: subscribe messages and frame parsing for the combined-stream WebSocket API.

Frames are decoded once, at the boundary, into typed msgspec structs that mirror Binance's one-letter
field names; anything that does not fit becomes a FrameError with a stable reason slug:

    invalid-json           not JSON: bad syntax, non-UTF-8 text, or nested too deeply to decode
    schema-mismatch        JSON of the wrong shape: a missing field, a wrong type, not an object
    unknown-stream         a combined-stream name whose channel this adapter does not know
    unknown-event          a raw payload that is no known event, reply or bookTicker
    unsupported-data-type  partial depth (`@depth20`), a stream the collector does not read
    unknown-symbol         a symbol missing from the adapter's instrument table
    symbol-mismatch        a combined frame whose payload names another symbol than its stream
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import msgspec
from msgspec import UNSET, Raw, UnsetType, field

from streams.depth import DepthDiff, DepthSettings, DepthSnapshot, Levels
from streams.exchanges.base import (
    Ack,
    ControlEvent,
    DataKind,
    DataType,
    ErrorReply,
    ExchangeAdapter,
    ExchangeLimits,
    FrameError,
    Instrument,
    ParsedItem,
    ServerShutdown,
    SubscriptionList,
)
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.rest import RestRequest, RestTag

SHUTDOWN_STREAM = "!serverShutdown"
# Binance writes the stream name first in every combined frame, and names only its market-wide
# streams (serverShutdown among them) with a leading "!".
_SYMBOL_STREAM_PREFIX = b'{"stream":"'
_MARKET_WIDE_STREAM_PREFIX = b'{"stream":"!'
# Stream names come off the wire, so the name → channel cache must not grow without bound.
_STREAM_CACHE_LIMIT = 100_000
_T = TypeVar("_T")


# Wire schemas. They hold only scalars (or structs of scalars) and so can never be part of a
# reference cycle: gc=False keeps them out of the garbage collector's tracking on the hot path.
class _SymbolEvent(msgspec.Struct, gc=False, kw_only=True):
    symbol: str = field(name="s")
    # Checked against the channel's event type: a frame on a trade stream must be a trade.
    event_type: str | None = field(name="e", default=None)


class _TradeEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    trade_id: int = field(name="t")
    price: str = field(name="p")
    quantity: str = field(name="q")
    trade_time: int = field(name="T")
    buyer_is_maker: bool = field(name="m")


class _AggTradeEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    aggregate_id: int = field(name="a")
    price: str = field(name="p")
    quantity: str = field(name="q")
    trade_time: int = field(name="T")
    buyer_is_maker: bool = field(name="m")


class _KlineBar(msgspec.Struct, gc=False):
    start_time: int = field(name="t")
    end_time: int = field(name="T")
    interval: str = field(name="i")
    open: str = field(name="o")
    high: str = field(name="h")
    low: str = field(name="l")
    close: str = field(name="c")
    volume: str = field(name="v")
    quote_volume: str = field(name="q")
    trades: int = field(name="n")
    closed: bool = field(name="x")


class _KlineEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    bar: _KlineBar = field(name="k")


class _TickerEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    last: str = field(name="c")
    open: str = field(name="o")
    high: str = field(name="h")
    low: str = field(name="l")
    volume: str = field(name="v")
    quote_volume: str = field(name="q")
    change: str = field(name="p")
    change_percent: str = field(name="P")


class _QuotedTickerEvent(_TickerEvent, gc=False):
    """Spot's 24 h ticker, which also carries the best bid and ask."""

    bid_price: str = field(name="b")
    bid_quantity: str = field(name="B")
    ask_price: str = field(name="a")
    ask_quantity: str = field(name="A")


class _BookTickerEvent(_SymbolEvent, gc=False):
    update_id: int = field(name="u")
    bid_price: str = field(name="b")
    bid_quantity: str = field(name="B")
    ask_price: str = field(name="a")
    ask_quantity: str = field(name="A")


class _DepthUpdateEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    first_update_id: int = field(name="U")
    last_update_id: int = field(name="u")
    bids: Levels = field(name="b")
    asks: Levels = field(name="a")


class _ShutdownEvent(msgspec.Struct, gc=False):
    event_time: int = field(name="E")


class _ErrorBody(msgspec.Struct, gc=False):
    code: int
    msg: str


class _Envelope(msgspec.Struct, gc=False):
    """Every top-level shape Binance sends, decoded just far enough to tell them apart."""

    stream: str | UnsetType = UNSET
    data: Raw | UnsetType = UNSET
    event: str | UnsetType = field(name="e", default=UNSET)
    # A raw bookTicker is the one market payload without `e`; its `u` gives it away.
    update_id: Raw | UnsetType = field(name="u", default=UNSET)
    result: Raw | UnsetType = UNSET
    id: int | str | None = None
    code: int | UnsetType = UNSET
    msg: str | UnsetType = UNSET
    # The documented error reply is flat; live servers have also been seen nesting it under `error`.
    error: _ErrorBody | UnsetType = UNSET


class _SymbolInfo(msgspec.Struct, gc=False):
    symbol: str
    status: str
    base_asset: str = field(name="baseAsset")
    quote_asset: str = field(name="quoteAsset")


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_SymbolInfo]


# REST bodies of the history endpoints used for backfill and REST fallback.
class _RestTrade(msgspec.Struct, gc=False):
    id: int
    price: str
    qty: str
    time: int
    is_buyer_maker: bool = field(name="isBuyerMaker")


# openTime, open, high, low, close, volume, closeTime, quoteVolume, trades, takerBase, takerQuote, ignore
_RestKline = tuple[int, str, str, str, str, str, int, str, int, str, str, str]


class _RestTicker(msgspec.Struct, gc=False):
    symbol: str
    last: str = field(name="lastPrice")
    open: str = field(name="openPrice")
    high: str = field(name="highPrice")
    low: str = field(name="lowPrice")
    volume: str
    quote_volume: str = field(name="quoteVolume")
    change: str = field(name="priceChange")
    change_percent: str = field(name="priceChangePercent")
    close_time: int = field(name="closeTime")


class _RestQuotedTicker(_RestTicker, gc=False):
    bid_price: str = field(name="bidPrice")
    bid_quantity: str = field(name="bidQty")
    ask_price: str = field(name="askPrice")
    ask_quantity: str = field(name="askQty")


class _RestDepth(msgspec.Struct, gc=False):
    last_update_id: int = field(name="lastUpdateId")
    bids: Levels
    asks: Levels
    event_time: int | UnsetType = field(name="E", default=UNSET)  # USD-M only


class _TradeIdOnly(msgspec.Struct, gc=False):
    symbol: str = field(name="s")
    trade_id: int = field(name="t")


class _TradeMark(msgspec.Struct, gc=False):
    stream: str
    data: _TradeIdOnly


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_shutdown_decoder = msgspec.json.Decoder(_ShutdownEvent)
_result_decoder = msgspec.json.Decoder(list[str] | None)
_exchange_info_decoder = msgspec.json.Decoder(_ExchangeInfo)
_encoder = msgspec.json.Encoder()
_rest_trades_decoder = msgspec.json.Decoder(list[_RestTrade])
_rest_klines_decoder = msgspec.json.Decoder(list[_RestKline])
_rest_depth_decoder = msgspec.json.Decoder(_RestDepth)
# Spot tickers carry the quote; the declared type is the base every Binance market shares.
_rest_ticker_decoder: msgspec.json.Decoder[_RestTicker] = msgspec.json.Decoder(_RestQuotedTicker)
_trade_mark_decoder = msgspec.json.Decoder(_TradeMark)
_TRADE_CHANNEL_MARK = b'@trade"'
_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"


# Record builders take the exchange name so that Binance's other markets can share them.
def _trade(exchange: str, event: _TradeEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Trade(
        price=event.price,
        quantity=event.quantity,
        side="sell" if event.buyer_is_maker else "buy",  # the buyer made the book, so the taker sold
        trade_id=str(event.trade_id),
        trade_time=event.trade_time,
    )
    return MarketRecord(exchange, instrument.symbol, "trade", event.event_time, received_at, data)


def _agg_trade(
    exchange: str, event: _AggTradeEvent, instrument: Instrument, received_at: int
) -> MarketRecord:
    data = Trade(
        price=event.price,
        quantity=event.quantity,
        side="sell" if event.buyer_is_maker else "buy",
        trade_id=str(event.aggregate_id),
        trade_time=event.trade_time,
    )
    return MarketRecord(exchange, instrument.symbol, "trade", event.event_time, received_at, data)


def _kline(exchange: str, event: _KlineEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    bar = event.bar
    data = Kline(
        interval=bar.interval,
        start_time=bar.start_time,
        end_time=bar.end_time,
        open=bar.open,
        high=bar.high,
        low=bar.low,
        close=bar.close,
        volume=bar.volume,
        quote_volume=bar.quote_volume,
        trades=bar.trades,
        closed=bar.closed,
    )
    return MarketRecord(exchange, instrument.symbol, "kline", event.event_time, received_at, data)


def _ticker(exchange: str, event: _TickerEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    return MarketRecord(
        exchange, instrument.symbol, "ticker", event.event_time, received_at, _ticker_data(event)
    )


def _ticker_data(ticker: _TickerEvent | _RestTicker) -> Ticker:
    quote = (
        {"bid_price": ticker.bid_price, "bid_quantity": ticker.bid_quantity,
         "ask_price": ticker.ask_price, "ask_quantity": ticker.ask_quantity}
        if isinstance(ticker, (_QuotedTickerEvent, _RestQuotedTicker))
        else {}
    )  # fmt: skip
    return Ticker(
        last=ticker.last, open=ticker.open, high=ticker.high, low=ticker.low, volume=ticker.volume,
        quote_volume=ticker.quote_volume, change=ticker.change, change_percent=ticker.change_percent,
        **quote,
    )  # fmt: skip


def _bbo(exchange: str, event: _BookTickerEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    # Spot bookTicker carries no event time: the receive time is the best available.
    return _bbo_at(exchange, event, instrument, received_at, received_at)


def _bbo_at(
    exchange: str, event: _BookTickerEvent, instrument: Instrument, event_time: int, received_at: int
) -> MarketRecord:
    data = Bbo(
        bid_price=event.bid_price,
        bid_quantity=event.bid_quantity,
        ask_price=event.ask_price,
        ask_quantity=event.ask_quantity,
        update_id=str(event.update_id),
    )
    return MarketRecord(exchange, instrument.symbol, "bbo", event_time, received_at, data)


def _depth_diff(
    exchange: str, event: _DepthUpdateEvent, instrument: Instrument, received_at: int
) -> DepthDiff:
    # Spot events chain by U == previous u + 1 and carry no previous id.
    return DepthDiff(
        instrument.symbol, event.event_time, received_at, event.first_update_id, event.last_update_id, None,
        event.bids, event.asks,
    )  # fmt: skip


class _Channel(NamedTuple):
    """How to read one kind of market payload: its `e` (None for bookTicker), decoder and builder."""

    event: str | None
    decoder: msgspec.json.Decoder[Any]
    build: Callable[[str, Any, Instrument, int], ParsedItem]


_TRADE = _Channel("trade", msgspec.json.Decoder(_TradeEvent), _trade)
# Not a data kind of its own: aggregate trades are read as trades (the recorded fixture and the REST
# backfill use them), with the aggregate id as the trade id.
_AGG_TRADE = _Channel("aggTrade", msgspec.json.Decoder(_AggTradeEvent), _agg_trade)
_KLINE = _Channel("kline", msgspec.json.Decoder(_KlineEvent), _kline)
_TICKER = _Channel("24hrTicker", msgspec.json.Decoder(_QuotedTickerEvent), _ticker)
_BBO = _Channel(None, msgspec.json.Decoder(_BookTickerEvent), _bbo)
_DEPTH = _Channel("depthUpdate", msgspec.json.Decoder(_DepthUpdateEvent), _depth_diff)

# The channel table: data kind → Binance channel name and how to read its payloads.
_CHANNELS: dict[DataKind, tuple[str, _Channel]] = {
    "trade": ("trade", _TRADE),
    "kline": ("kline_{interval}", _KLINE),
    "ticker": ("ticker", _TICKER),
    "bbo": ("bookTicker", _BBO),
    "depth": ("depth{speed}", _DEPTH),
}
_KLINE_INTERVALS = frozenset(
    {"1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"}
)
# Diff depth speed → the channel name's suffix (`btcusdt@depth@100ms`; one second is plain `@depth`).
_DEPTH_SPEEDS = {"100ms": "@100ms", "1000ms": ""}
# GET /api/v3/depth: (largest limit, weight) per weight tier.
_DEPTH_TIERS = ((100, 5), (500, 25), (1000, 50), (5000, 250))


def _by_channel_name(
    channels: Mapping[DataKind, tuple[str, _Channel]], intervals: Iterable[str], speeds: Iterable[str]
) -> dict[str, _Channel]:
    """Every channel name a combined frame can carry; each kline interval and each depth speed is a
    channel of its own."""
    names: dict[str, _Channel] = {}
    for name, channel in channels.values():
        if "{interval}" in name:
            names |= {name.format(interval=interval): channel for interval in intervals}
        elif "{speed}" in name:
            names |= {name.format(speed=suffix): channel for suffix in speeds}
        else:
            names[name] = channel
    return names


def _tier(tiers: Sequence[tuple[int, int]], levels: int) -> tuple[int, int]:
    """(limit, weight) of the cheapest tier whose limit covers `levels`."""
    return next(((limit, weight) for limit, weight in tiers if levels <= limit), tiers[-1])


def _by_event(channels: Iterable[_Channel]) -> dict[str, _Channel]:
    return {c.event: c for c in channels if c.event is not None}


_BY_CHANNEL_NAME = _by_channel_name(_CHANNELS, _KLINE_INTERVALS, _DEPTH_SPEEDS.values())
_BY_CHANNEL_NAME["aggTrade"] = _AGG_TRADE
_BY_EVENT = _by_event(_BY_CHANNEL_NAME.values())


class BinanceAdapter(ExchangeAdapter):
    name = "binance"
    limits = ExchangeLimits(
        max_streams_per_connection=1024,
        max_incoming_messages_per_second=5,
        max_connection_attempts=300,
        connection_attempt_window_seconds=300,
        max_connection_lifetime_seconds=24 * 60 * 60,
        rest_weight_per_minute=6000,
    )
    kline_intervals = _KLINE_INTERVALS
    data_kinds = frozenset(_CHANNELS)
    instruments_path = "/api/v3/exchangeInfo"
    public_mirrors: ClassVar[tuple[str, ...]] = (
        "restEndpoint https://data-api.binance.vision",
        "wsEndpoint wss://data-stream.binance.vision",
    )
    trade_ids = "increasing"  # trade (and aggTrade) ids rise by one per trade and symbol
    rest_history = True
    depth_levels = range(1, 5001)
    depth_speeds = tuple(_DEPTH_SPEEDS)
    default_depth_levels = 20
    _depth_suffixes: ClassVar[Mapping[str, str]] = _DEPTH_SPEEDS
    _depth_tiers: ClassVar[Sequence[tuple[int, int]]] = _DEPTH_TIERS
    _depth_path: ClassVar[str] = "/api/v3/depth"
    # What a subclass for another Binance market replaces: its channel table, the payloads it reads,
    # and the few REST body shapes that differ.
    _channels: ClassVar[Mapping[DataKind, tuple[str, _Channel]]] = _CHANNELS
    _channel_by_name: ClassVar[Mapping[str, _Channel]] = _BY_CHANNEL_NAME
    _channel_by_event: ClassVar[Mapping[str, _Channel]] = _BY_EVENT
    # The raw payload without `e`, told apart by its `u`; None where every raw payload names its event.
    _unnamed_event_channel: ClassVar[_Channel | None] = _BBO
    _trade_channel_mark: ClassVar[bytes] = _TRADE_CHANNEL_MARK
    _trade_mark_decoder: ClassVar[msgspec.json.Decoder[_TradeMark]] = _trade_mark_decoder
    _rest_trades_decoder: ClassVar[msgspec.json.Decoder[list[_RestTrade]]] = _rest_trades_decoder
    _rest_ticker_decoder: ClassVar[msgspec.json.Decoder[_RestTicker]] = _rest_ticker_decoder

    def __init__(self, instruments: Iterable[Instrument], depth: DepthSettings | None = None) -> None:
        super().__init__(instruments, depth)
        # stream name → (channel, exchange symbol); the symbol, not its Instrument, is cached so a
        # refreshed instrument table takes effect at once.
        self._streams: dict[str, tuple[_Channel, str]] = {}

    @staticmethod
    def parse_instruments(body: bytes) -> list[Instrument]:
        return [_listed_instrument(s) for s in _decode(_exchange_info_decoder, body).symbols]

    def route(self, data_type: DataType) -> str:
        # Every data type shares the combined-stream endpoint: streams are added by SUBSCRIBE, never
        # listed in the URL, so a connection's URL stays the same whatever it carries.
        return "/stream"

    def stream_name(self, instrument: Instrument, data_type: DataType) -> str:
        if not self.parses(data_type):
            raise ValueError(f"{self.name} does not support data type {data_type}")
        speed = self._depth_suffixes[self.depth.speed] if self.depth is not None else ""
        channel_name = self._channels[data_type.kind][0].format(interval=data_type.interval, speed=speed)
        return f"{instrument.exchange_symbol.lower()}@{channel_name}"

    @classmethod
    def depth_snapshot_limit(cls, levels: int) -> int:
        # Deeper than the levels published where a tier is: a book whose top level goes must still
        # know its `levels` (the depth engine resyncs a book that no longer does).
        return next((limit for limit, _ in cls._depth_tiers if limit > levels), cls._depth_tiers[-1][0])

    def subscribe_message(self, streams: Sequence[str], request_id: int) -> bytes:
        return _encoder.encode({"method": "SUBSCRIBE", "params": list(streams), "id": request_id})

    def unsubscribe_message(self, streams: Sequence[str], request_id: int) -> bytes:
        return _encoder.encode({"method": "UNSUBSCRIBE", "params": list(streams), "id": request_id})

    def parse_frame(self, payload: bytes, received_at: int) -> list[ParsedItem]:
        envelope = _decode(_envelope_decoder, payload)
        stream = envelope.stream
        if stream is not UNSET:
            if envelope.data is UNSET:
                raise FrameError("schema-mismatch", "combined frame without data")
            if stream == SHUTDOWN_STREAM:
                return [ServerShutdown(_decode(_shutdown_decoder, envelope.data).event_time)]
            channel, exchange_symbol = self._resolve_stream(stream)
            event = _decode(channel.decoder, envelope.data)
            if event.event_type != channel.event:
                raise FrameError("unknown-event", f"{event.event_type!r} on stream {stream}")
            if event.symbol != exchange_symbol:
                raise FrameError("symbol-mismatch", f"{event.symbol} on stream {stream}")
            return [channel.build(self.name, event, self._instrument(exchange_symbol), received_at)]
        if envelope.event is not UNSET:
            return [self._parse_raw_event(envelope.event, payload, received_at)]
        if envelope.error is not UNSET:
            return [ErrorReply(envelope.error.code, envelope.error.msg, envelope.id)]
        if envelope.code is not UNSET:
            if envelope.msg is UNSET:
                raise FrameError("schema-mismatch", "error reply without msg")
            return [ErrorReply(envelope.code, envelope.msg, envelope.id)]
        if envelope.result is not UNSET:
            # GET_PROPERTY's boolean result lands here as a schema mismatch: the collector never asks.
            streams = _decode(_result_decoder, envelope.result)
            if streams is None:
                return [Ack(envelope.id)]
            return [SubscriptionList(envelope.id, streams)]
        if self._unnamed_event_channel is None:
            raise FrameError("unknown-event", "no stream, event type or reply fields")
        if envelope.update_id is not UNSET:
            return [self._build(self._unnamed_event_channel, payload, received_at)]
        raise FrameError("unknown-event", "no stream, event type, reply or bookTicker fields")

    def control_events(self, payload: bytes) -> list[ControlEvent]:
        # Called for every frame on the receive path: a symbol stream's frame is market data by its
        # first bytes, so only the rare others are parsed.
        if payload.startswith(_SYMBOL_STREAM_PREFIX) and not payload.startswith(_MARKET_WIDE_STREAM_PREFIX):
            return []
        return super().control_events(payload)

    # -- REST history -------------------------------------------------------------------------------

    def trades_request(self, instrument: Instrument, from_id: int | None, limit: int) -> RestRequest:
        # historicalTrades, not aggTrades: its ids are the trade stream's `t`, so backfill and the
        # WebSocket share one id sequence per symbol and dedupe by id is exact.
        params = {"symbol": instrument.exchange_symbol, "limit": str(limit)}
        if from_id is None:
            return RestRequest("trades", "/api/v3/trades", params, 25, instrument.exchange_symbol)
        params["fromId"] = str(from_id)
        return RestRequest("trades", "/api/v3/historicalTrades", params, 25, instrument.exchange_symbol)

    def klines_request(
        self, instrument: Instrument, interval: str, start_time: int, limit: int
    ) -> RestRequest:
        params = {"symbol": instrument.exchange_symbol, "interval": interval, "startTime": str(start_time),
                  "limit": str(limit)}  # fmt: skip
        return RestRequest("klines", "/api/v3/klines", params, 2, instrument.exchange_symbol, interval)

    def ticker_request(self, instrument: Instrument) -> RestRequest:
        params = {"symbol": instrument.exchange_symbol}
        return RestRequest("ticker", "/api/v3/ticker/24hr", params, 2, instrument.exchange_symbol)

    def parse_rest(self, tag: RestTag, body: bytes, received_at: int) -> list[MarketRecord]:
        if tag.kind == "depth":
            raise FrameError("unsupported-rest", "an order book snapshot: parse_depth_snapshot reads it")
        instrument = self._instrument(tag.exchange_symbol)
        if tag.kind == "trades":
            return [
                MarketRecord(self.name, instrument.symbol, "trade", t.time, received_at, Trade(
                    price=t.price, quantity=t.qty, side="sell" if t.is_buyer_maker else "buy",
                    trade_id=str(t.id), trade_time=t.time,
                ))
                for t in _decode(self._rest_trades_decoder, body)
            ]  # fmt: skip
        if tag.kind == "klines":
            assert tag.interval is not None
            return [_rest_kline(self.name, row, tag.interval, instrument, received_at)
                    for row in _decode(_rest_klines_decoder, body)]  # fmt: skip
        ticker = _decode(self._rest_ticker_decoder, body)
        if ticker.symbol != tag.exchange_symbol:
            raise FrameError("symbol-mismatch", f"{ticker.symbol} answering {tag.exchange_symbol}")
        data = _ticker_data(ticker)
        return [MarketRecord(self.name, instrument.symbol, "ticker", ticker.close_time, received_at, data)]

    def depth_snapshot_request(self, instrument: Instrument) -> RestRequest:
        assert self.depth is not None
        limit, weight = _tier(self._depth_tiers, self.depth.snapshot_limit)
        params = {"symbol": instrument.exchange_symbol, "limit": str(limit)}
        return RestRequest("depth", self._depth_path, params, weight, instrument.exchange_symbol, limit=limit)

    def parse_depth_snapshot(self, tag: RestTag, body: bytes, received_at: int) -> DepthSnapshot:
        instrument = self._instrument(tag.exchange_symbol)
        book = _decode(_rest_depth_decoder, body)
        event_time = received_at if book.event_time is UNSET else book.event_time  # spot has no time
        return DepthSnapshot(
            instrument.symbol, event_time, received_at, book.last_update_id, tag.limit, book.bids, book.asks
        )

    @staticmethod
    def rest_weight_used(headers: Mapping[str, str]) -> int | None:
        value = headers.get(_WEIGHT_HEADER)
        return int(value) if value is not None and value.strip().isdigit() else None

    def trade_marker(self, payload: bytes) -> tuple[str, int] | None:
        if not payload.startswith(_SYMBOL_STREAM_PREFIX):
            return super().trade_marker(payload)  # raw (uncombined) frames: rare, parse them fully
        if payload.find(self._trade_channel_mark, len(_SYMBOL_STREAM_PREFIX), 64) < 0:
            return None
        try:
            mark = self._trade_mark_decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        instrument = self.instruments.get(mark.data.symbol)
        return (instrument.symbol, mark.data.trade_id) if instrument is not None else None

    def _parse_raw_event(self, event_type: str, payload: bytes, received_at: int) -> ParsedItem:
        channel = self._channel_by_event.get(event_type)
        if channel is not None:
            return self._build(channel, payload, received_at)
        if event_type == "serverShutdown":
            return ServerShutdown(_decode(_shutdown_decoder, payload).event_time)
        raise FrameError("unknown-event", event_type)

    def _build(self, channel: _Channel, payload: bytes | Raw, received_at: int) -> ParsedItem:
        event = _decode(channel.decoder, payload)
        return channel.build(self.name, event, self._instrument(event.symbol), received_at)

    def _resolve_stream(self, stream: str) -> tuple[_Channel, str]:
        resolved = self._streams.get(stream)
        if resolved is None:
            symbol, _, channel_name = stream.partition("@")
            channel = self._channel_by_name.get(channel_name)
            if channel is None:
                reason = "unsupported-data-type" if channel_name.startswith("depth") else "unknown-stream"
                raise FrameError(reason, stream)
            resolved = (channel, symbol.upper())
            if len(self._streams) < _STREAM_CACHE_LIMIT:
                self._streams[stream] = resolved
        return resolved

    def _instrument(self, exchange_symbol: str) -> Instrument:
        instrument = self.instruments.get(exchange_symbol)
        if instrument is None:
            raise FrameError("unknown-symbol", exchange_symbol)
        return instrument


def _listed_instrument(info: _SymbolInfo) -> Instrument:
    return Instrument(
        symbol=f"{info.base_asset}/{info.quote_asset}",
        exchange_symbol=info.symbol,
        base=info.base_asset,
        quote=info.quote_asset,
        status=info.status,
    )


def _rest_kline(
    exchange: str, row: _RestKline, interval: str, instrument: Instrument, received_at: int
) -> MarketRecord:
    open_time, open_, high, low, close, volume, close_time, quote_volume, trades = row[:9]
    data = Kline(
        interval=interval, start_time=open_time, end_time=close_time, open=open_, high=high, low=low,
        close=close, volume=volume, quote_volume=quote_volume, trades=trades,
        closed=close_time < received_at,  # a bar still open when fetched is an update, like the stream's
    )  # fmt: skip
    return MarketRecord(exchange, instrument.symbol, "kline", min(close_time, received_at), received_at, data)


def _decode(decoder: msgspec.json.Decoder[_T], payload: bytes | Raw) -> _T:
    """Decode with `decoder`, turning every way the bytes can be wrong into a FrameError."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise FrameError("schema-mismatch", str(exc)) from None
    # msgspec reports bad UTF-8 inside a string it decodes as UnicodeDecodeError, and nesting beyond
    # the interpreter's recursion limit as RecursionError.
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FrameError("invalid-json", str(exc) or type(exc).__name__) from None
