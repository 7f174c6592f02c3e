"""Binance spot payload shapes, built from the market's ground truth.

Field names, order and types follow binance-spot-api-docs: prices and quantities are strings with 8
decimals (as the live exchange sends them), ids and times are integers, times are epoch ms.
"""

from __future__ import annotations

from typing import Any

from simulator.market import Instrument, Kline, Quote, RollingStats, Trade, format_ratio, format_units

PLACES = 8
WEIGHT_LIMIT_PER_MINUTE = 6000
RATE_LIMITS = [
    {
        "rateLimitType": "REQUEST_WEIGHT",
        "interval": "MINUTE",
        "intervalNum": 1,
        "limit": WEIGHT_LIMIT_PER_MINUTE,
    },
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]


def exchange_symbol(instrument: Instrument) -> str:
    """`BTC/USDT` → `BTCUSDT` (streams use it lowercased)."""
    return instrument.base + instrument.quote


# Market strings carry the instrument's precision; Binance pads them to 8 decimals.
_PADDING = [".00000000", *("0" * (PLACES - decimals) for decimals in range(1, PLACES + 1))]


def _padded(text: str, decimals: int) -> str:
    return text + _PADDING[decimals]


def _price(instrument: Instrument, ticks: int) -> str:
    return format_units(ticks, instrument.price_decimals, PLACES)


def _quantity(instrument: Instrument, lots: int) -> str:
    return format_units(lots, instrument.quantity_decimals, PLACES)


def _notional(instrument: Instrument, units: int) -> str:
    return format_units(units, instrument.price_decimals + instrument.quantity_decimals, PLACES)


# -- WebSocket events ---------------------------------------------------------------------------


def trade_event(symbol: str, instrument: Instrument, trade: Trade, event_time: int) -> dict[str, Any]:
    return {
        "e": "trade",
        "E": event_time,
        "s": symbol,
        "t": trade.id,
        "p": _padded(trade.price, instrument.price_decimals),
        "q": _padded(trade.quantity, instrument.quantity_decimals),
        "T": trade.time,
        "m": trade.taker_side == "sell",  # the buyer was the maker, so the taker sold
        "M": True,
    }


def agg_trade_event(symbol: str, instrument: Instrument, trade: Trade, event_time: int) -> dict[str, Any]:
    return {"e": "aggTrade", "E": event_time, "s": symbol, **rest_agg_trade(instrument, trade)}


def book_ticker_event(symbol: str, instrument: Instrument, quote: Quote) -> dict[str, Any]:
    # Spot bookTicker carries neither an event type nor an event time.
    return {
        "u": quote.update_id,
        "s": symbol,
        "b": _price(instrument, quote.bid_ticks),
        "B": _quantity(instrument, quote.bid_lots),
        "a": _price(instrument, quote.ask_ticks),
        "A": _quantity(instrument, quote.ask_lots),
    }


def kline_event(
    symbol: str, instrument: Instrument, bar: Kline, event_time: int, closed: bool
) -> dict[str, Any]:
    return {
        "e": "kline",
        "E": event_time,
        "s": symbol,
        "k": {
            "t": bar.open_time,
            "T": bar.close_time,
            "s": symbol,
            "i": bar.interval,
            "f": bar.first_id,
            "L": bar.last_id,
            "o": _price(instrument, bar.open),
            "c": _price(instrument, bar.close),
            "h": _price(instrument, bar.high),
            "l": _price(instrument, bar.low),
            "v": _quantity(instrument, bar.volume),
            "n": bar.count,
            "x": closed,
            "q": _notional(instrument, bar.quote_volume),
            "V": _quantity(instrument, bar.taker_buy_volume),
            "Q": _notional(instrument, bar.taker_buy_quote_volume),
            "B": "0",
        },
    }


def ticker_event(
    symbol: str, instrument: Instrument, stats: RollingStats, quote: Quote, event_time: int
) -> dict[str, Any]:
    return {
        "e": "24hrTicker",
        "E": event_time,
        "s": symbol,
        "p": _price(instrument, stats.last - stats.open),
        "P": _change_percent(stats),
        "w": _weighted_average(instrument, stats),
        "x": _price(instrument, stats.previous_close),
        "c": _price(instrument, stats.last),
        "Q": _quantity(instrument, stats.last_quantity),
        "b": _price(instrument, quote.bid_ticks),
        "B": _quantity(instrument, quote.bid_lots),
        "a": _price(instrument, quote.ask_ticks),
        "A": _quantity(instrument, quote.ask_lots),
        "o": _price(instrument, stats.open),
        "h": _price(instrument, stats.high),
        "l": _price(instrument, stats.low),
        "v": _quantity(instrument, stats.volume),
        "q": _notional(instrument, stats.quote_volume),
        "O": stats.open_time,
        "C": stats.close_time,
        "F": stats.first_id,
        "L": stats.last_id,
        "n": stats.count,
    }


def server_shutdown_event(event_time: int) -> dict[str, Any]:
    return {"e": "serverShutdown", "E": event_time}


def _change_percent(stats: RollingStats) -> str:
    return format_ratio((stats.last - stats.open) * 100, stats.open, 3)


def _weighted_average(instrument: Instrument, stats: RollingStats) -> str:
    # quote volume / volume, both integers: the quotient is in ticks, rescaled here to 8 places.
    return format_ratio(stats.quote_volume, stats.volume * 10**instrument.price_decimals, PLACES)


# -- REST bodies -----------------------------------------------------------------------------------


def rest_trade(instrument: Instrument, trade: Trade) -> dict[str, Any]:
    return {
        "id": trade.id,
        "price": _padded(trade.price, instrument.price_decimals),
        "qty": _padded(trade.quantity, instrument.quantity_decimals),
        "quoteQty": _notional(instrument, trade.price_ticks * trade.quantity_lots),
        "time": trade.time,
        "isBuyerMaker": trade.taker_side == "sell",
        "isBestMatch": True,
    }


def rest_agg_trade(instrument: Instrument, trade: Trade) -> dict[str, Any]:
    # Every simulated trade fills a single order, so each aggregate holds exactly one trade.
    return {
        "a": trade.id,
        "p": _padded(trade.price, instrument.price_decimals),
        "q": _padded(trade.quantity, instrument.quantity_decimals),
        "f": trade.id,
        "l": trade.id,
        "T": trade.time,
        "m": trade.taker_side == "sell",
        "M": True,
    }


def rest_kline(instrument: Instrument, bar: Kline) -> list[Any]:
    return [
        bar.open_time,
        _price(instrument, bar.open),
        _price(instrument, bar.high),
        _price(instrument, bar.low),
        _price(instrument, bar.close),
        _quantity(instrument, bar.volume),
        bar.close_time,
        _notional(instrument, bar.quote_volume),
        bar.count,
        _quantity(instrument, bar.taker_buy_volume),
        _notional(instrument, bar.taker_buy_quote_volume),
        "0",
    ]


def rest_ticker(
    symbol: str, instrument: Instrument, stats: RollingStats, quote: Quote, full: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"symbol": symbol}
    if full:
        body |= {
            "priceChange": _price(instrument, stats.last - stats.open),
            "priceChangePercent": _change_percent(stats),
            "weightedAvgPrice": _weighted_average(instrument, stats),
            "prevClosePrice": _price(instrument, stats.previous_close),
            "lastPrice": _price(instrument, stats.last),
            "lastQty": _quantity(instrument, stats.last_quantity),
            "bidPrice": _price(instrument, quote.bid_ticks),
            "bidQty": _quantity(instrument, quote.bid_lots),
            "askPrice": _price(instrument, quote.ask_ticks),
            "askQty": _quantity(instrument, quote.ask_lots),
        }
    else:
        body["lastPrice"] = _price(instrument, stats.last)
    body |= {
        "openPrice": _price(instrument, stats.open),
        "highPrice": _price(instrument, stats.high),
        "lowPrice": _price(instrument, stats.low),
        "volume": _quantity(instrument, stats.volume),
        "quoteVolume": _notional(instrument, stats.quote_volume),
        "openTime": stats.open_time,
        "closeTime": stats.close_time,
        "firstId": stats.first_id,
        "lastId": stats.last_id,
        "count": stats.count,
    }
    return body


def symbol_info(instrument: Instrument) -> dict[str, Any]:
    tick = format_units(1, instrument.price_decimals, PLACES)
    lot = format_units(1, instrument.quantity_decimals, PLACES)
    return {
        "symbol": exchange_symbol(instrument),
        "status": "TRADING",
        "baseAsset": instrument.base,
        "baseAssetPrecision": PLACES,
        "quoteAsset": instrument.quote,
        "quotePrecision": PLACES,
        "quoteAssetPrecision": PLACES,
        "baseCommissionPrecision": PLACES,
        "quoteCommissionPrecision": PLACES,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {"filterType": "LOT_SIZE", "minQty": lot, "maxQty": "9000000.00000000", "stepSize": lot},
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def exchange_info(instruments: list[Instrument], server_time: int) -> dict[str, Any]:
    return {
        "timezone": "UTC",
        "serverTime": server_time,
        "rateLimits": RATE_LIMITS,
        "exchangeFilters": [],
        "symbols": [symbol_info(instrument) for instrument in instruments],
    }
