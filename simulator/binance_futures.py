"""The Binance USD-M futures dialect: routed WebSocket entry points and the `/fapi/v1/` REST API.

It is the spot dialect with the futures rules (exchange-protocols.md §2):

- Routed entry points `/public/{ws,stream}` (bookTicker, diff depth) and `/market/{ws,stream}`
  (aggTrade, kline, ticker). A stream subscribed on the wrong route is acknowledged but never delivers,
  as the live exchange does; the simulator counts it as a `wrongRoute` violation so tests notice.
- No `@trade` stream and no `1s` klines; bookTicker carries `e`, `E` and `T`; the 24 h ticker has no
  bid/ask. Diff depth (`@depth` every 250 ms, `@depth@100ms`, `@depth@500ms`) carries `pu`, the
  stream's previous `u`; `/fapi/v1/depth` takes limits 5 to 1000 and carries `E` and `T`.
- 10 incoming messages per second, a server ping every 3 minutes and 10 minutes to answer it,
  2400 REST weight per minute.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from simulator import binance_format as spot_fmt
from simulator.binance import (
    BinanceConnection,
    BinanceError,
    BinanceSpot,
    Stream,
    _encode,
    _limit,
    _SymbolStreams,
    _ticker_weight,
)
from simulator.book import DepthFeed, DiffEvent
from simulator.market import Instrument, Market, Quote, RollingStats, Tick, Trade, format_units

log = logging.getLogger(__name__)

WEIGHT_LIMIT_PER_MINUTE = 2400
PING_INTERVAL = 180.0
PONG_TIMEOUT = 600.0
MAX_MESSAGES_PER_SECOND = 10
PUBLIC = "public"
MARKET = "market"
_ROUTE_OF_KIND = {"bookTicker": PUBLIC, "depth": PUBLIC,
                  "aggTrade": MARKET, "kline": MARKET, "ticker": MARKET}  # fmt: skip
_DEPTH_WEIGHTS = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}


class BinanceFutures(BinanceSpot):
    """Serves one `Market` the way Binance USD-M futures does."""

    name = "binance-futures"
    depth_channels = {"depth": 250, "depth@100ms": 100, "depth@500ms": 500}

    def __init__(
        self,
        market: Market,
        *,
        ping_interval: float = PING_INTERVAL,
        pong_timeout: float = PONG_TIMEOUT,
        weight_limit: int = WEIGHT_LIMIT_PER_MINUTE,
    ) -> None:
        super().__init__(
            market,
            ping_interval=ping_interval,
            pong_timeout=pong_timeout,
            weight_limit=weight_limit,
            max_messages_per_second=MAX_MESSAGES_PER_SECOND,
        )
        self.violations["wrongRoute"] = 0

    # -- routes -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        for route in (PUBLIC, MARKET):
            app.router.add_get(f"/{route}/ws", self._handle_ws)
            app.router.add_get(f"/{route}/ws/{{streams:.+}}", self._handle_ws)
            app.router.add_get(f"/{route}/stream", self._handle_ws)
        endpoints = {
            "ping": (lambda _: 1, lambda _: {}),
            "time": (lambda _: 1, lambda _: {"serverTime": self._now_ms()}),
            "exchangeInfo": (lambda _: 1, self._futures_exchange_info),
            "trades": (lambda _: 5, self._futures_trades),
            "aggTrades": (lambda _: 20, self._futures_agg_trades),
            "klines": (lambda _: 5, self._klines_rest),
            "ticker/24hr": (_ticker_weight, self._ticker_24hr),
            "depth": (_depth_weight, self._futures_depth),
        }
        for path, (weigh, answer) in endpoints.items():
            app.router.add_get(f"/fapi/v1/{path}", self._rest_handler(weigh, answer))

    # -- WebSocket ----------------------------------------------------------------------------------

    def _is_combined(self, request: web.Request) -> bool:
        return request.path.strip("/").partition("/")[2] == "stream"

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> BinanceConnection:
        connection = super()._new_connection(ws, request)
        connection.route = request.path.strip("/").partition("/")[0]  # public or market
        return connection

    def _parse_stream(self, name: str) -> Stream | None:
        _, _, kind = name.partition("@")
        if kind in ("trade", "kline_1s"):  # spot-only streams
            return None
        return super()._parse_stream(name)

    def _subscribe(self, connection: BinanceConnection, stream: Stream) -> None:
        route = connection.route or MARKET
        if _ROUTE_OF_KIND[stream.kind] != route:
            self.violations["wrongRoute"] += 1
            log.info("%s subscribed %s on /%s: it will never deliver", connection.id, stream.name, route)
            return
        super()._subscribe(connection, stream)

    # -- publishing ---------------------------------------------------------------------------------

    def publish(self, tick: Tick, monotonic_now: float) -> None:
        subscribers = self._hub.subscribers
        if subscribers:
            skipping = self.faults.skipping
            for trade in tick.trades:
                if skipping and self.faults.skips(trade.symbol, trade.id, monotonic_now):
                    continue
                names = self._symbols[trade.symbol]
                listeners = subscribers.get(names.agg_trade)
                if listeners:
                    payload = agg_trade_event(names.exchange_symbol, names.instrument, trade, tick.time)
                    self._fan_out(names.agg_trade, "aggTrade", listeners, _encode(payload))
            for quote in tick.quotes:
                names = self._symbols[quote.symbol]
                listeners = subscribers.get(names.book_ticker)
                if listeners:
                    payload = book_ticker_event(names.exchange_symbol, names.instrument, quote, tick.time)
                    self._fan_out(names.book_ticker, "bookTicker", listeners, _encode(payload))
        # Diff depth after the bookTickers of the tick: Binance batches it, bookTicker is real-time.
        self._publish_depth(tick)
        if not self.market.paused and (self._klines or self._tickers):
            self._publish_periodic(tick.time)
        if monotonic_now >= self._next_housekeeping:
            self._housekeeping(monotonic_now)

    def _send_ticker(self, stream: Stream, now_ms: int) -> None:
        listeners = self._hub.subscribers.get(stream.name)
        if not listeners:
            return
        names = self._symbols[stream.symbol]
        stats = self.market.rolling_stats(stream.symbol, now_ms)
        payload = ticker_event(names.exchange_symbol, names.instrument, stats, now_ms)
        self._fan_out(stream.name, "ticker", listeners, _encode(payload))

    def _depth_feed(self) -> DepthFeed:
        names = {symbol: symbol for symbol in self._symbols}
        names |= {n.exchange_symbol: symbol for symbol, n in self._symbols.items()}
        return DepthFeed(self.market, names, _price, _quantity)

    def _depth_event(self, event: DiffEvent, event_time: int) -> dict[str, Any]:
        payload = super()._depth_event(event, event_time)
        return {**payload, "T": event_time, "pu": event.prev_update_id}

    # -- ground truth (/_sim/trades?exchange=binance-futures) ----------------------------------------

    def truth_row(self, instrument: Instrument, trade: Trade) -> dict[str, Any]:
        return rest_agg_trade(trade)

    def _send_invented(self, names: _SymbolStreams, trade: Trade, event_type: str | None, now_ms: int) -> int:
        listeners = self._hub.subscribers.get(names.agg_trade)
        if not listeners:
            return 0
        payload = agg_trade_event(names.exchange_symbol, names.instrument, trade, now_ms)
        if event_type is not None:
            payload["e"] = event_type
        self._fan_out(names.agg_trade, "invented", listeners, _encode(payload))
        return len(listeners)

    # -- REST -------------------------------------------------------------------------------------

    def _futures_exchange_info(self, params: Mapping[str, str]) -> dict[str, Any]:
        return {
            "timezone": "UTC",
            "serverTime": self._now_ms(),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                            "limit": self.weights.limit}],
            "assets": [],
            "symbols": [symbol_info(names) for names in self._symbols.values()],
        }  # fmt: skip

    def _futures_depth(self, params: Mapping[str, str]) -> dict[str, Any]:
        names = self._symbol(params)
        limit = _limit(params, default=500, maximum=1000)
        if limit not in _DEPTH_WEIGHTS:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
        update_id, time_ms, bids, asks = self.depth.snapshot(names.instrument.symbol, limit)
        return {"lastUpdateId": update_id, "E": self._now_ms(), "T": time_ms, "bids": bids, "asks": asks}

    def _futures_trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        names = self._symbol(params)
        limit = _limit(params, default=500, maximum=1000)
        history = self.market.history(names.instrument.symbol)
        return [rest_trade(names.instrument, t) for t in history.slice(history.end - limit, history.end)]

    def _futures_agg_trades(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        # The spot dialect picks the aggregates (fromId, startTime, endTime, limit); futures shapes them.
        names = self._symbol(params)
        history = self.market.history(names.instrument.symbol)
        trades = (history.at(history.index_of_id(row["a"])) for row in self._agg_trades(params))
        return [rest_agg_trade(trade) for trade in trades]


def _depth_weight(params: Mapping[str, str]) -> int:
    text = params.get("limit", "500")
    return _DEPTH_WEIGHTS.get(int(text), 20) if text.isdigit() and len(text) < 6 else 20


def _price(instrument: Instrument, ticks: int) -> str:
    return format_units(ticks, instrument.price_decimals)


def _quantity(instrument: Instrument, lots: int) -> str:
    return format_units(lots, instrument.quantity_decimals)


def agg_trade_event(symbol: str, instrument: Instrument, trade: Trade, event_time: int) -> dict[str, Any]:
    # Futures prices carry the contract's precision, not spot's 8 padded decimals.
    return {"e": "aggTrade", "E": event_time, "s": symbol, **rest_agg_trade(trade)}


def book_ticker_event(symbol: str, instrument: Instrument, quote: Quote, event_time: int) -> dict[str, Any]:
    return {
        "e": "bookTicker",
        "u": quote.update_id,
        "s": symbol,
        "b": _price(instrument, quote.bid_ticks),
        "B": _quantity(instrument, quote.bid_lots),
        "a": _price(instrument, quote.ask_ticks),
        "A": _quantity(instrument, quote.ask_lots),
        "T": event_time,
        "E": event_time,
    }


def ticker_event(symbol: str, instrument: Instrument, stats: RollingStats, event_time: int) -> dict[str, Any]:
    spot = spot_fmt.ticker_event(symbol, instrument, stats, _NO_QUOTE, event_time)
    for key in ("x", "b", "B", "a", "A"):  # futures tickers have no previous close and no bid/ask
        del spot[key]
    return spot


_NO_QUOTE = Quote("", 0, 0, 0, 0, 0)


def rest_agg_trade(trade: Trade) -> dict[str, Any]:
    return {
        "a": trade.id,
        "p": trade.price,
        "q": trade.quantity,
        "nq": trade.quantity,
        "f": trade.id,
        "l": trade.id,
        "T": trade.time,
        "m": trade.taker_side == "sell",
    }


def rest_trade(instrument: Instrument, trade: Trade) -> dict[str, Any]:
    return {
        "id": trade.id,
        "price": trade.price,
        "qty": trade.quantity,
        "quoteQty": instrument.notional(trade.price_ticks * trade.quantity_lots),
        "time": trade.time,
        "isBuyerMaker": trade.taker_side == "sell",
    }


def symbol_info(names: _SymbolStreams) -> dict[str, Any]:
    instrument = names.instrument
    return {
        "symbol": names.exchange_symbol,
        "pair": names.exchange_symbol,
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000,
        "status": "TRADING",
        "baseAsset": instrument.base,
        "quoteAsset": instrument.quote,
        "marginAsset": instrument.quote,
        "pricePrecision": instrument.price_decimals,
        "quantityPrecision": instrument.quantity_decimals,
        "underlyingType": "COIN",
        "filters": [
            {"filterType": "PRICE_FILTER", "tickSize": format_units(1, instrument.price_decimals)},
            {"filterType": "LOT_SIZE", "stepSize": format_units(1, instrument.quantity_decimals)},
        ],
        "orderTypes": ["LIMIT", "MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }
