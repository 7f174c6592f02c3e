"""Binance USD-M futures: routed WebSocket URLs, aggregate trades, klines, 24 h tickers, bookTicker, depth.

The wire protocol is Binance's (SUBSCRIBE/UNSUBSCRIBE, combined `{"stream", "data"}` frames, the same
replies), so the adapter is the spot adapter with its market-specific tables replaced. What differs
(exchange-protocols.md §2):

- Since 2026 every stream lives behind a routed path: `/public` for bookTicker and depth, `/market`
  for aggTrade, kline and ticker. A stream subscribed on the wrong route never delivers.
- Diff depth events carry `pu`, the previous event's `u`: they chain by `pu`, not by `U` (§2.5).
  Speeds 100, 250 (plain `@depth`) and 500 ms; `GET /fapi/v1/depth` takes limits 5 to 1000.
- There is no raw `@trade` stream: `trade` is read from `@aggTrade`, the aggregate id is the trade id.
- Klines have no `1s` interval; the 24 h ticker has no bid/ask; bookTicker carries `E` (event time).
- Perpetual contracts only: a delivery contract (`BTCUSDT_260925`) has no BASE/QUOTE name of its own,
  so the instrument list leaves it out.

Failure reasons are the spot adapter's (see streams/exchanges/binance.py).
"""

from __future__ import annotations

import msgspec
from msgspec import field

from streams.depth import DepthDiff

# The module, not its classes: the adapter registry registers every adapter class a module holds.
from streams.exchanges import binance as spot
from streams.exchanges.base import DataKind, DataType, ExchangeLimits, Instrument
from streams.records import MarketRecord
from streams.rest import RestRequest

PUBLIC_ROUTE = "/public/stream"
MARKET_ROUTE = "/market/stream"
_KLINE_INTERVALS = spot._KLINE_INTERVALS - {"1s"}


class _TimedBookTickerEvent(spot._BookTickerEvent, gc=False):
    event_time: int = field(name="E")


class _ChainedDepthEvent(spot._DepthUpdateEvent, gc=False):
    prev_update_id: int = field(name="pu")


class _ContractInfo(spot._SymbolInfo, gc=False):
    contract_type: str = field(name="contractType", default="PERPETUAL")


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_ContractInfo]


# REST aggTrades rows, read into the spot trade row's attributes so the spot parser serves both.
class _RestAggTrade(spot._RestTrade, gc=False):
    id: int = field(name="a")
    price: str = field(name="p")
    qty: str = field(name="q")
    time: int = field(name="T")
    is_buyer_maker: bool = field(name="m")


class _AggTradeIdOnly(spot._TradeIdOnly, gc=False):
    trade_id: int = field(name="a")


class _AggTradeMark(spot._TradeMark, gc=False):
    data: _AggTradeIdOnly


def _timed_bbo(
    exchange: str, event: _TimedBookTickerEvent, instrument: Instrument, received_at: int
) -> MarketRecord:
    return spot._bbo_at(exchange, event, instrument, event.event_time, received_at)


def _chained_depth_diff(
    exchange: str, event: _ChainedDepthEvent, instrument: Instrument, received_at: int
) -> DepthDiff:
    return DepthDiff(
        instrument.symbol, event.event_time, received_at, event.first_update_id, event.last_update_id,
        event.prev_update_id, event.bids, event.asks,
    )  # fmt: skip


_BBO = spot._Channel("bookTicker", msgspec.json.Decoder(_TimedBookTickerEvent), _timed_bbo)
_DEPTH = spot._Channel("depthUpdate", msgspec.json.Decoder(_ChainedDepthEvent), _chained_depth_diff)
_TICKER = spot._Channel("24hrTicker", msgspec.json.Decoder(spot._TickerEvent), spot._ticker)
_CHANNELS: dict[DataKind, tuple[str, spot._Channel]] = {
    "trade": ("aggTrade", spot._AGG_TRADE),
    "kline": ("kline_{interval}", spot._KLINE),
    "ticker": ("ticker", _TICKER),
    "bbo": ("bookTicker", _BBO),
    "depth": ("depth{speed}", _DEPTH),
}
_ROUTES: dict[DataKind, str] = {
    "trade": MARKET_ROUTE,
    "kline": MARKET_ROUTE,
    "ticker": MARKET_ROUTE,
    "bbo": PUBLIC_ROUTE,
    "depth": PUBLIC_ROUTE,
}
_DEPTH_SPEEDS = {"100ms": "@100ms", "250ms": "", "500ms": "@500ms"}
# GET /fapi/v1/depth: (limit, weight) per weight tier; limits are 5, 10, 20, 50, 100, 500 or 1000.
_DEPTH_TIERS = ((50, 2), (100, 5), (500, 10), (1000, 20))
_BY_CHANNEL_NAME = spot._by_channel_name(_CHANNELS, _KLINE_INTERVALS, _DEPTH_SPEEDS.values())
_exchange_info_decoder = msgspec.json.Decoder(_ExchangeInfo)


class BinanceFuturesAdapter(spot.BinanceAdapter):
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
    public_mirrors = ()
    trade_ids = "increasing"  # aggregate ids rise by one per aggregate and symbol
    _channels = _CHANNELS
    _channel_by_name = _BY_CHANNEL_NAME
    _channel_by_event = spot._by_event(_BY_CHANNEL_NAME.values())
    _unnamed_event_channel = None  # futures bookTicker names its event
    _trade_channel_mark = b'@aggTrade"'
    _trade_mark_decoder = msgspec.json.Decoder(_AggTradeMark)
    _rest_trades_decoder = msgspec.json.Decoder(list[_RestAggTrade])
    _rest_ticker_decoder = msgspec.json.Decoder(spot._RestTicker)
    depth_levels = range(1, 1001)
    depth_speeds = tuple(_DEPTH_SPEEDS)
    default_depth_levels = 20
    _depth_suffixes = _DEPTH_SPEEDS
    _depth_tiers = _DEPTH_TIERS
    _depth_path = "/fapi/v1/depth"

    @staticmethod
    def parse_instruments(body: bytes) -> list[Instrument]:
        info = spot._decode(_exchange_info_decoder, body)
        return [spot._listed_instrument(s) for s in info.symbols if s.contract_type == "PERPETUAL"]

    def route(self, data_type: DataType) -> str:
        return _ROUTES.get(data_type.kind, PUBLIC_ROUTE)

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
