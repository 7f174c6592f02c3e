"""What `/ws/exchange` clients send and get, as pure code: filters, client messages, frames.

A filter has three dimensions (exchanges, symbols, types); `None` in one means every value. A market
record matches when its exchange, symbol and type are each in the filter. Matching happens per
market topic (`market.<type>.<exchange>.<symbol>` names all three), never per record.

Filter changes (`{"op": "subscribe" | "unsubscribe", ...}`):
- `subscribe` adds the listed values to each dimension it names; a dimension that took every value
  takes just the listed ones from then on (choosing is narrowing the default of everything).
  `null` for a dimension sets it back to every value.
- `unsubscribe` removes the listed values; a dimension left empty matches nothing. Removing values
  from a dimension that takes every value is an error (there is no list to remove them from).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

RECORD_TYPES = ("trade", "kline", "ticker", "bbo", "depth")
QUERY_DIMENSIONS = ("exchanges", "symbols", "types")
MAX_VALUES = 1000  # values per dimension in one filter: more is a mistake, and it bounds the work per client
MAX_MESSAGE_BYTES = 64 * 1024  # a client message longer than this is refused unread
_EXCHANGE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_SYMBOL = re.compile(r"^(?P<base>[A-Za-z0-9]{1,20})[/-](?P<quote>[A-Za-z0-9]{1,20})$")
MARKET_PREFIX = "market."


class FilterError(ValueError):
    """A filter or client message that cannot be used; the message says why, for the client."""


@dataclass(frozen=True, slots=True)
class TopicKey:
    """What a market topic carries: `market.trade.binance.btc-usdt` → trade, binance, btc-usdt."""

    type: str
    exchange: str
    symbol: str  # the topic's token: lowercase base-quote


def parse_market_topic(topic: str) -> TopicKey | None:
    """The type, exchange and symbol token of a market topic; None for any other topic."""
    if not topic.startswith(MARKET_PREFIX):
        return None
    parts = topic.split(".")
    if len(parts) != 4 or not all(parts[1:]):
        return None
    return TopicKey(parts[1], parts[2], parts[3])


def symbol_token(text: str) -> str:
    """`BTC/USDT` or `btc-usdt` → `btc-usdt`; FilterError for anything else."""
    match = _SYMBOL.match(text)
    if match is None:
        raise FilterError(f"{text!r} is not a symbol: write BASE/QUOTE (BTC/USDT) or base-quote (btc-usdt)")
    return f"{match['base']}-{match['quote']}".lower()


def symbol_name(token: str) -> str:
    """`btc-usdt` → `BTC/USDT`, the symbol as records spell it."""
    base, _, quote = token.partition("-")
    return f"{base}/{quote}".upper()


@dataclass(frozen=True, slots=True)
class Filter:
    """Which market records a client gets; `None` in a dimension means every value."""

    exchanges: frozenset[str] | None = None
    symbols: frozenset[str] | None = None  # topic tokens (`btc-usdt`)
    types: frozenset[str] | None = None

    def matches(self, key: TopicKey) -> bool:
        return (
            (self.exchanges is None or key.exchange in self.exchanges)
            and (self.symbols is None or key.symbol in self.symbols)
            and (self.types is None or key.type in self.types)
        )

    def describe(self) -> dict[str, list[str] | None]:
        """The filter as clients see it: symbols as BASE/QUOTE, `null` for every value."""
        return {
            "exchanges": None if self.exchanges is None else sorted(self.exchanges),
            "symbols": None if self.symbols is None else sorted(map(symbol_name, self.symbols)),
            "types": None if self.types is None else sorted(self.types),
        }


EVERYTHING = Filter()


def _exchanges(values: Iterable[str], known: Iterable[str]) -> frozenset[str]:
    found = set()
    allowed = set(known)
    for value in values:
        name = value.strip().lower()
        if not _EXCHANGE.match(name):
            raise FilterError(f"{value!r} is not an exchange name")
        if allowed and name not in allowed:
            raise FilterError(f"unknown exchange {value!r} (known: {', '.join(sorted(allowed))})")
        found.add(name)
    return frozenset(found)


def _types(values: Iterable[str]) -> frozenset[str]:
    found = set()
    for value in values:
        name = value.strip().lower()
        if name not in RECORD_TYPES:
            hint = " (every kline interval comes as kline)" if name.startswith("kline_") else ""
            raise FilterError(f"unknown type {value!r}: expected {', '.join(RECORD_TYPES)}{hint}")
        found.add(name)
    return frozenset(found)


def _values(dimension: str, values: Iterable[str], known_exchanges: Iterable[str]) -> frozenset[str]:
    listed = list(values)
    if len(listed) > MAX_VALUES:
        raise FilterError(f"{dimension}: at most {MAX_VALUES} values")
    if dimension == "exchanges":
        return _exchanges(listed, known_exchanges)
    if dimension == "symbols":
        return frozenset(symbol_token(value.strip()) for value in listed)
    return _types(listed)


def parse_query(query: Mapping[str, str], known_exchanges: Iterable[str] = ()) -> Filter:
    """The initial filter from `?exchanges=binance,upbit&symbols=BTC/USDT,krw-btc&types=trade,bbo`.

    Each parameter is a comma list and may be left out (every value); an unknown parameter, an empty
    or repeated one, or a value that is not an exchange, symbol or type is a FilterError."""
    unknown = sorted(set(query) - set(QUERY_DIMENSIONS))
    if unknown:
        raise FilterError(
            f"unknown query parameter {unknown[0]!r}: the filters are {', '.join(QUERY_DIMENSIONS)}"
        )
    dimensions: dict[str, frozenset[str]] = {}
    for dimension in QUERY_DIMENSIONS:
        getall = getattr(query, "getall", None)
        given = list(getall(dimension, [])) if getall is not None else (
            [query[dimension]] if dimension in query else []
        )  # fmt: skip
        if not given:
            continue
        if len(given) > 1:
            raise FilterError(f"{dimension} is given twice: list the values once, separated by commas")
        values = [value for value in given[0].split(",") if value.strip()]
        if not values:
            raise FilterError(f"{dimension} lists nothing: leave it out to get every value")
        dimensions[dimension] = _values(dimension, values, known_exchanges)
    return Filter(**dimensions)


# ---- client messages -------------------------------------------------------------------------------


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    op: str
    exchanges: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    symbols: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    types: list[str] | msgspec.UnsetType | None = msgspec.UNSET


_decode_message = msgspec.json.Decoder(_Message).decode
Op = Literal["subscribe", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class FilterChange:
    """One client message: which op, and per dimension the values named (None: set back to every)."""

    op: Op
    dimensions: dict[str, frozenset[str] | None]


def parse_client_message(text: str | bytes, known_exchanges: Iterable[str] = ()) -> FilterChange:
    """A `{"op": "subscribe" | "unsubscribe", "exchanges": [...], "symbols": [...], "types": [...]}`
    message, checked; FilterError with a message for the client otherwise."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise FilterError(f"message longer than {MAX_MESSAGE_BYTES} bytes")
    try:
        message = _decode_message(text)
    except msgspec.ValidationError as exc:
        raise FilterError(f"bad message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FilterError(f"not a JSON object: {exc}") from None
    if message.op not in ("subscribe", "unsubscribe"):
        raise FilterError(f"unknown op {message.op!r}: expected subscribe or unsubscribe")
    op: Op = "subscribe" if message.op == "subscribe" else "unsubscribe"
    dimensions: dict[str, frozenset[str] | None] = {}
    for dimension in QUERY_DIMENSIONS:
        values = getattr(message, dimension)
        if values is msgspec.UNSET:
            continue
        if values is None:
            if op == "unsubscribe":
                raise FilterError(f"{dimension}: unsubscribe takes a list of values, not null")
            dimensions[dimension] = None
            continue
        if not values:
            raise FilterError(f"{dimension} lists nothing")
        dimensions[dimension] = _values(dimension, values, known_exchanges)
    if not dimensions:
        raise FilterError(f"{op} names none of {', '.join(QUERY_DIMENSIONS)}")
    return FilterChange(op, dimensions)


def apply_change(current: Filter, change: FilterChange) -> Filter:
    """The filter after a client's subscribe or unsubscribe (the rules are in the module's doc)."""
    updated: dict[str, frozenset[str] | None] = {}
    for dimension in QUERY_DIMENSIONS:
        now: frozenset[str] | None = getattr(current, dimension)
        if dimension not in change.dimensions:
            updated[dimension] = now
            continue
        named = change.dimensions[dimension]
        if change.op == "subscribe":
            updated[dimension] = None if named is None else (named if now is None else now | named)
        else:
            assert named is not None  # parse_client_message refuses null for unsubscribe
            if now is None:
                raise FilterError(
                    f"{dimension}: the filter takes every value, so there is nothing to remove; "
                    f"subscribe the {dimension} you want instead"
                )
            updated[dimension] = now - named
        if (values := updated[dimension]) is not None and len(values) > MAX_VALUES:
            raise FilterError(f"{dimension}: at most {MAX_VALUES} values")
    return Filter(**updated)


_encode = msgspec.json.Encoder().encode


def subscribed_message(current: Filter) -> bytes:
    return _encode({"op": "subscribed", "filter": current.describe()})


def error_message(message: str) -> bytes:
    return _encode({"op": "error", "message": message})


# ---- WebSocket frames ------------------------------------------------------------------------------


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 §5.2) holding `payload`, as a server sends it.

    Built once per record and written to every client that wants it, instead of one encode per client."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


def is_text(payload: bytes) -> bool:
    """Whether a record value can go out as a text frame (UTF-8): anything else would break the client."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- rates -----------------------------------------------------------------------------------------


class RateMeter:
    """Events per second over the last `window` seconds, from counts added as they happen."""

    def __init__(self, window: float = 10.0, clock: Any = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._counts: deque[tuple[int, int]] = deque()  # (whole second, count)

    def add(self, count: int) -> None:
        second = int(self._clock())
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1] = (second, self._counts[-1][1] + count)
        else:
            self._counts.append((second, count))
        self._trim(second)

    def _trim(self, now: int) -> None:
        while self._counts and self._counts[0][0] <= now - self.window:
            self._counts.popleft()

    def rate(self) -> float:
        now = int(self._clock())
        self._trim(now)
        return sum(count for _, count in self._counts) / self.window
