"""Binance spot: subscribe messages and frame parsing for the combined-stream WebSocket API.

Frames are decoded once, at the boundary, into typed msgspec structs that mirror Binance's one-letter
field names; anything that does not fit becomes a FrameError with a stable reason slug:

    invalid-json           not JSON: bad syntax, non-UTF-8 text, or nested too deeply to decode
    schema-mismatch        JSON of the wrong shape: a missing field, a wrong type, not an object
    unknown-stream         a combined-stream name whose channel this adapter does not know
    unknown-event          a raw payload that is no known event, reply or bookTicker
    unsupported-data-type  depth, a collector data type this adapter does not parse yet
    unknown-symbol         a symbol missing from the adapter's instrument table
    symbol-mismatch        a combined frame whose payload names another symbol than its stream
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
from msgspec import UNSET, Raw, UnsetType, field

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

EXCHANGE = "binance"
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
class _SymbolEvent(msgspec.Struct, gc=False):
    symbol: str = field(name="s")


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


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_shutdown_decoder = msgspec.json.Decoder(_ShutdownEvent)
_result_decoder = msgspec.json.Decoder(list[str] | None)
_exchange_info_decoder = msgspec.json.Decoder(_ExchangeInfo)
_encoder = msgspec.json.Encoder()


def _trade(event: _TradeEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Trade(
        price=event.price,
        quantity=event.quantity,
        side="sell" if event.buyer_is_maker else "buy",  # the buyer made the book, so the taker sold
        trade_id=str(event.trade_id),
        trade_time=event.trade_time,
    )
    return MarketRecord(EXCHANGE, instrument.symbol, "trade", event.event_time, received_at, data)


def _agg_trade(event: _AggTradeEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Trade(
        price=event.price,
        quantity=event.quantity,
        side="sell" if event.buyer_is_maker else "buy",
        trade_id=str(event.aggregate_id),
        trade_time=event.trade_time,
    )
    return MarketRecord(EXCHANGE, instrument.symbol, "trade", event.event_time, received_at, data)


def _kline(event: _KlineEvent, instrument: Instrument, received_at: int) -> MarketRecord:
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
    return MarketRecord(EXCHANGE, instrument.symbol, "kline", event.event_time, received_at, data)


def _ticker(event: _TickerEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Ticker(
        last=event.last,
        open=event.open,
        high=event.high,
        low=event.low,
        volume=event.volume,
        quote_volume=event.quote_volume,
        change=event.change,
        change_percent=event.change_percent,
        bid_price=event.bid_price,
        bid_quantity=event.bid_quantity,
        ask_price=event.ask_price,
        ask_quantity=event.ask_quantity,
    )
    return MarketRecord(EXCHANGE, instrument.symbol, "ticker", event.event_time, received_at, data)


def _bbo(event: _BookTickerEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Bbo(
        bid_price=event.bid_price,
        bid_quantity=event.bid_quantity,
        ask_price=event.ask_price,
        ask_quantity=event.ask_quantity,
        update_id=str(event.update_id),
    )
    # Spot bookTicker carries no event time: the receive time is the best available.
    return MarketRecord(EXCHANGE, instrument.symbol, "bbo", received_at, received_at, data)


class _Channel(NamedTuple):
    """How to read one kind of market payload: its `e` (None for bookTicker), decoder and builder."""

    event: str | None
    decoder: msgspec.json.Decoder[Any]
    build: Callable[[Any, Instrument, int], MarketRecord]


_TRADE = _Channel("trade", msgspec.json.Decoder(_TradeEvent), _trade)
# Not a data kind of its own: aggregate trades are read as trades (the recorded fixture and the REST
# backfill use them), with the aggregate id as the trade id.
_AGG_TRADE = _Channel("aggTrade", msgspec.json.Decoder(_AggTradeEvent), _agg_trade)
_KLINE = _Channel("kline", msgspec.json.Decoder(_KlineEvent), _kline)
_TICKER = _Channel("24hrTicker", msgspec.json.Decoder(_TickerEvent), _ticker)
_BBO = _Channel(None, msgspec.json.Decoder(_BookTickerEvent), _bbo)

# The channel table: data kind → Binance channel name and how to read its payloads.
_CHANNELS: dict[DataKind, tuple[str, _Channel]] = {
    "trade": ("trade", _TRADE),
    "kline": ("kline_{interval}", _KLINE),
    "ticker": ("ticker", _TICKER),
    "bbo": ("bookTicker", _BBO),
}
_KLINE_INTERVALS = frozenset(
    {"1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"}
)
# Every channel name a combined frame can carry; each kline interval is a channel of its own.
_BY_CHANNEL_NAME: dict[str, _Channel] = {
    name.format(interval=interval): channel
    for name, channel in _CHANNELS.values()
    for interval in (_KLINE_INTERVALS if "{interval}" in name else ("",))
}
_BY_CHANNEL_NAME["aggTrade"] = _AGG_TRADE
_BY_EVENT: dict[str, _Channel] = {c.event: c for c in _BY_CHANNEL_NAME.values() if c.event is not None}


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

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        super().__init__(instruments)
        # stream name → (channel, exchange symbol); the symbol, not its Instrument, is cached so a
        # refreshed instrument table takes effect at once.
        self._streams: dict[str, tuple[_Channel, str]] = {}

    @staticmethod
    def parse_instruments(body: bytes) -> list[Instrument]:
        info = _decode(_exchange_info_decoder, body)
        return [
            Instrument(
                symbol=f"{s.base_asset}/{s.quote_asset}",
                exchange_symbol=s.symbol,
                base=s.base_asset,
                quote=s.quote_asset,
                status=s.status,
            )
            for s in info.symbols
        ]

    def route(self, data_type: DataType) -> str:
        # Every data type shares the combined-stream endpoint: streams are added by SUBSCRIBE, never
        # listed in the URL, so a connection's URL stays the same whatever it carries.
        return "/stream"

    def stream_name(self, instrument: Instrument, data_type: DataType) -> str:
        if not self.supports(data_type):
            raise ValueError(f"{self.name} does not support data type {data_type}")
        channel_name = _CHANNELS[data_type.kind][0].format(interval=data_type.interval)
        return f"{instrument.exchange_symbol.lower()}@{channel_name}"

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
            if event.symbol != exchange_symbol:
                raise FrameError("symbol-mismatch", f"{event.symbol} on stream {stream}")
            return [channel.build(event, self._instrument(exchange_symbol), received_at)]
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
        if envelope.update_id is not UNSET:
            return [self._build(_BBO, payload, received_at)]
        raise FrameError("unknown-event", "no stream, event type, reply or bookTicker fields")

    def control_events(self, payload: bytes) -> list[ControlEvent]:
        # Called for every frame on the receive path: a symbol stream's frame is market data by its
        # first bytes, so only the rare others are parsed.
        if payload.startswith(_SYMBOL_STREAM_PREFIX) and not payload.startswith(_MARKET_WIDE_STREAM_PREFIX):
            return []
        return super().control_events(payload)

    def _parse_raw_event(self, event_type: str, payload: bytes, received_at: int) -> ParsedItem:
        channel = _BY_EVENT.get(event_type)
        if channel is not None:
            return self._build(channel, payload, received_at)
        if event_type == "serverShutdown":
            return ServerShutdown(_decode(_shutdown_decoder, payload).event_time)
        if event_type == "depthUpdate":
            raise FrameError("unsupported-data-type", event_type)
        raise FrameError("unknown-event", event_type)

    def _build(self, channel: _Channel, payload: bytes | Raw, received_at: int) -> MarketRecord:
        event = _decode(channel.decoder, payload)
        return channel.build(event, self._instrument(event.symbol), received_at)

    def _resolve_stream(self, stream: str) -> tuple[_Channel, str]:
        resolved = self._streams.get(stream)
        if resolved is None:
            symbol, _, channel_name = stream.partition("@")
            channel = _BY_CHANNEL_NAME.get(channel_name)
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
