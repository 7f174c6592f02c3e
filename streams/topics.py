"""Topic names: the one place they are spelled."""

from __future__ import annotations

from functools import lru_cache

COMMANDS = "collector.commands"
EVENTS = "collector.events"


def raw_topic(exchange: str) -> str:
    return f"raw.{exchange}"


def deadletter_topic(exchange: str) -> str:
    return f"deadletter.{exchange}"


@lru_cache(maxsize=65536)
def symbol_token(symbol: str) -> str:
    """`BTC/USDT` → `btc-usdt`, the symbol as it appears in topic names."""
    base, _, quote = symbol.partition("/")
    return f"{base}-{quote}".lower()


@lru_cache(maxsize=262144)
def market_topic(record_type: str, exchange: str, symbol: str) -> str:
    return f"market.{record_type}.{exchange}.{symbol_token(symbol)}"
