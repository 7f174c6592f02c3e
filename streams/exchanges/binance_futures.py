"""Binance USD-M futures: routed WebSocket URLs, aggregate trades, klines, 24 h tickers, bookTicker.

The wire protocol is Binance's (SUBSCRIBE/UNSUBSCRIBE, combined `{"stream", "data"}` frames, the same
replies), so the envelope, reply and kline schemas are shared with the spot adapter. What differs
(exchange-protocols.md §2):

- Since 2026 every stream lives behind a routed path: `/public` for bookTicker and depth, `/market`
  for aggTrade, kline and ticker. A stream subscribed on the wrong route never delivers.
- There is no raw `@trade` stream: `trade` is read from `@aggTrade`, the aggregate id is the trade id.
- Klines have no `1s` interval; the 24 h ticker has no bid/ask; bookTicker carries `E` (event time).
- Perpetual contracts only: a delivery contract (`BTCUSDT_260925`) has no BASE/QUOTE name of its own,
  so the instrument list leaves it out.

Failure reasons are the spot adapter's (see streams/exchanges/binance.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from msgspec import UNSET, field

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
from streams.exchanges.binance import (
    _AggTradeEvent,
    _decode,
    _envelope_decoder,
    _KlineEvent,
    _result_decoder,
    _shutdown_decoder,
    _SymbolEvent,
)
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.rest import RestRequest, RestTag

EXCHANGE = "binance-futures"
PUBLIC_ROUTE = "/public/stream"
MARKET_ROUTE = "/market/stream"
_SYMBOL_STREAM_PREFIX = b'{"stream":"'
_MARKET_WIDE_STREAM_PREFIX = b'{"stream":"!'
_STREAM_CACHE_LIMIT = 100_000
_KLINE_INTERVALS = frozenset(
    {"1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"}
)


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


class _BookTickerEvent(_SymbolEvent, gc=False):
    event_time: int = field(name="E")
    update_id: int = field(name="u")
    bid_price: str = field(name="b")
    bid_quantity: str = field(name="B")
    ask_price: str = field(name="a")
    ask_quantity: str = field(name="A")


class _SymbolInfo(msgspec.Struct, gc=False):
    symbol: str
    status: str
    base_asset: str = field(name="baseAsset")
    quote_asset: str = field(name="quoteAsset")
    contract_type: str = field(name="contractType", default="PERPETUAL")


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_SymbolInfo]


# REST bodies of the history endpoints used for backfill and REST fallback.
class _RestAggTrade(msgspec.Struct, gc=False):
    aggregate_id: int = field(name="a")
    price: str = field(name="p")
    quantity: str = field(name="q")
    trade_time: int = field(name="T")
    buyer_is_maker: bool = field(name="m")


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


class _AggTradeIdOnly(msgspec.Struct, gc=False):
    symbol: str = field(name="s")
    aggregate_id: int = field(name="a")


class _TradeMark(msgspec.Struct, gc=False):
    stream: str
    data: _AggTradeIdOnly


_exchange_info_decoder = msgspec.json.Decoder(_ExchangeInfo)
_rest_agg_trades_decoder = msgspec.json.Decoder(list[_RestAggTrade])
_rest_klines_decoder = msgspec.json.Decoder(list[_RestKline])
_rest_ticker_decoder = msgspec.json.Decoder(_RestTicker)
_trade_mark_decoder = msgspec.json.Decoder(_TradeMark)
_TRADE_CHANNEL_MARK = b'@aggTrade"'
_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
_encoder = msgspec.json.Encoder()


def _trade(event: _AggTradeEvent, instrument: Instrument, received_at: int) -> MarketRecord:
    data = Trade(
        price=event.price,
        quantity=event.quantity,
        side="sell" if event.buyer_is_maker else "buy",  # the buyer made the book, so the taker sold
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
    return MarketRecord(EXCHANGE, instrument.symbol, "bbo", event.event_time, received_at, data)


class _Channel(NamedTuple):
    event: str
    decoder: msgspec.json.Decoder[Any]
    build: Callable[[Any, Instrument, int], MarketRecord]
    route: str


_AGG_TRADE = _Channel("aggTrade", msgspec.json.Decoder(_AggTradeEvent), _trade, MARKET_ROUTE)
_KLINE = _Channel("kline", msgspec.json.Decoder(_KlineEvent), _kline, MARKET_ROUTE)
_TICKER = _Channel("24hrTicker", msgspec.json.Decoder(_TickerEvent), _ticker, MARKET_ROUTE)
_BBO = _Channel("bookTicker", msgspec.json.Decoder(_BookTickerEvent), _bbo, PUBLIC_ROUTE)

_CHANNELS: dict[DataKind, tuple[str, _Channel]] = {
    "trade": ("aggTrade", _AGG_TRADE),
    "kline": ("kline_{interval}", _KLINE),
    "ticker": ("ticker", _TICKER),
    "bbo": ("bookTicker", _BBO),
}
_BY_CHANNEL_NAME: dict[str, _Channel] = {
    name.format(interval=interval): channel
    for name, channel in _CHANNELS.values()
    for interval in (_KLINE_INTERVALS if "{interval}" in name else ("",))
}
_BY_EVENT: dict[str, _Channel] = {channel.event: channel for _, channel in _CHANNELS.values()}


class BinanceFuturesAdapter(ExchangeAdapter):
    name = "binance-futures"
    limits = ExchangeLimits(
        max_streams_per_connection=1024,
        max_incoming_messages_per_second=10,
        max_connection_attempts=300,
        connection_attempt_window_seconds=300,
        max_connection_lifetime_seconds=24 * 60 * 60,
        rest_weight_per_minute=2400,
    )
    kline_intervals = _KLINE_INTERVALS
    data_kinds = frozenset(_CHANNELS)
    instruments_path = "/fapi/v1/exchangeInfo"
    trade_ids = "increasing"  # aggregate ids rise by one per aggregate and symbol
    rest_history = True

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        super().__init__(instruments)
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
            if s.contract_type == "PERPETUAL"
        ]

    def route(self, data_type: DataType) -> str:
        return _CHANNELS[data_type.kind][1].route if data_type.kind in _CHANNELS else PUBLIC_ROUTE

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
            if stream == "!serverShutdown":
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
            streams = _decode(_result_decoder, envelope.result)
            if streams is None:
                return [Ack(envelope.id)]
            return [SubscriptionList(envelope.id, streams)]
        raise FrameError("unknown-event", "no stream, event type or reply fields")

    def control_events(self, payload: bytes) -> list[ControlEvent]:
        if payload.startswith(_SYMBOL_STREAM_PREFIX) and not payload.startswith(_MARKET_WIDE_STREAM_PREFIX):
            return []
        return super().control_events(payload)

    # -- REST history -------------------------------------------------------------------------------

    def trades_request(self, instrument: Instrument, from_id: int | None, limit: int) -> RestRequest:
        # aggTrades, the one public trade history whose ids are the aggTrade stream's `a` (trades and
        # historicalTrades count individual fills). Only the last 48 h or so are kept.
        params = {"symbol": instrument.exchange_symbol, "limit": str(min(limit, 1000))}
        if from_id is not None:
            params["fromId"] = str(from_id)
        return RestRequest("trades", "/fapi/v1/aggTrades", params, 20, instrument.exchange_symbol)

    def klines_request(
        self, instrument: Instrument, interval: str, start_time: int, limit: int
    ) -> RestRequest:
        limit = min(limit, 1500)
        params = {"symbol": instrument.exchange_symbol, "interval": interval, "startTime": str(start_time),
                  "limit": str(limit)}  # fmt: skip
        weight = 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10
        return RestRequest("klines", "/fapi/v1/klines", params, weight, instrument.exchange_symbol, interval)

    def ticker_request(self, instrument: Instrument) -> RestRequest:
        params = {"symbol": instrument.exchange_symbol}
        return RestRequest("ticker", "/fapi/v1/ticker/24hr", params, 1, instrument.exchange_symbol)

    def parse_rest(self, tag: RestTag, body: bytes, received_at: int) -> list[MarketRecord]:
        instrument = self._instrument(tag.exchange_symbol)
        if tag.kind == "trades":
            return [
                MarketRecord(EXCHANGE, instrument.symbol, "trade", t.trade_time, received_at, Trade(
                    price=t.price, quantity=t.quantity, side="sell" if t.buyer_is_maker else "buy",
                    trade_id=str(t.aggregate_id), trade_time=t.trade_time,
                ))
                for t in _decode(_rest_agg_trades_decoder, body)
            ]  # fmt: skip
        if tag.kind == "klines":
            assert tag.interval is not None
            return [_rest_kline(row, tag.interval, instrument, received_at)
                    for row in _decode(_rest_klines_decoder, body)]  # fmt: skip
        ticker = _decode(_rest_ticker_decoder, body)
        if ticker.symbol != tag.exchange_symbol:
            raise FrameError("symbol-mismatch", f"{ticker.symbol} answering {tag.exchange_symbol}")
        data = Ticker(
            last=ticker.last, open=ticker.open, high=ticker.high, low=ticker.low, volume=ticker.volume,
            quote_volume=ticker.quote_volume, change=ticker.change, change_percent=ticker.change_percent,
        )  # fmt: skip
        return [MarketRecord(EXCHANGE, instrument.symbol, "ticker", ticker.close_time, received_at, data)]

    @staticmethod
    def rest_weight_used(headers: Mapping[str, str]) -> int | None:
        value = headers.get(_WEIGHT_HEADER)
        return int(value) if value is not None and value.strip().isdigit() else None

    def trade_marker(self, payload: bytes) -> tuple[str, int] | None:
        if not payload.startswith(_SYMBOL_STREAM_PREFIX):
            return super().trade_marker(payload)  # raw (uncombined) frames: rare, parse them fully
        if payload.find(_TRADE_CHANNEL_MARK, len(_SYMBOL_STREAM_PREFIX), 64) < 0:
            return None
        try:
            mark = _trade_mark_decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        instrument = self.instruments.get(mark.data.symbol)
        return (instrument.symbol, mark.data.aggregate_id) if instrument is not None else None

    def _parse_raw_event(self, event_type: str, payload: bytes, received_at: int) -> ParsedItem:
        channel = _BY_EVENT.get(event_type)
        if channel is not None:
            event = _decode(channel.decoder, payload)
            return channel.build(event, self._instrument(event.symbol), received_at)
        if event_type == "serverShutdown":
            return ServerShutdown(_decode(_shutdown_decoder, payload).event_time)
        if event_type == "depthUpdate":
            raise FrameError("unsupported-data-type", event_type)
        raise FrameError("unknown-event", event_type)

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


def _rest_kline(row: _RestKline, interval: str, instrument: Instrument, received_at: int) -> MarketRecord:
    open_time, open_, high, low, close, volume, close_time, quote_volume, trades = row[:9]
    data = Kline(
        interval=interval, start_time=open_time, end_time=close_time, open=open_, high=high, low=low,
        close=close, volume=volume, quote_volume=quote_volume, trades=trades,
        closed=close_time < received_at,  # a bar still open when fetched is an update, like the stream's
    )  # fmt: skip
    return MarketRecord(EXCHANGE, instrument.symbol, "kline", min(close_time, received_at), received_at, data)
