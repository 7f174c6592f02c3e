"""What a sink accepts from a market topic: a market record whose every value the database takes as is.

The normalize agent already dead-letters hostile frames; a sink checks again because it reads topics
anyone can write to, and because one value PostgreSQL refuses would fail a whole batch again and again.
So every price and quantity must be a plain decimal, every time a sane epoch-ms integer, every text
free of NUL characters. Pure code: no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade, decode_record

MAX_NUMBER_LENGTH = 64  # as streams/validation.py: longer digit strings are garbage
MAX_TEXT_LENGTH = 128  # exchange, symbol, ids, interval
MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: PostgreSQL's timestamps go further
MAX_COUNT = 2**63 - 1  # bigint


class Rejected(NamedTuple):
    reason: str  # undecodable, not-a-decimal, bad-time, bad-text, bad-count, wrong-topic
    detail: str


def is_decimal(text: str, signed: bool = False) -> bool:
    """A plain decimal numeric accepts exactly: ASCII digits with at most one point, `-` if signed.
    No exponent, `NaN` or `Infinity`: PostgreSQL would take some of those, but they are no exchange's
    price."""
    if signed and text.startswith("-"):
        text = text[1:]
    digits = text.replace(".", "", 1)
    return digits.isdigit() and digits.isascii() and len(text) <= MAX_NUMBER_LENGTH


def _text_ok(text: str) -> bool:
    return 0 < len(text) <= MAX_TEXT_LENGTH and "\x00" not in text


def _time_ok(ms: int) -> bool:
    return 0 <= ms <= MAX_EPOCH_MS


def check_record(record: MarketRecord) -> Rejected | None:
    """None when every value of the record can be stored exactly; else why not."""
    for name, text in (("exchange", record.exchange), ("symbol", record.symbol)):
        if not _text_ok(text):
            return Rejected("bad-text", f"{name} {text[:40]!r}")
    for name, ms in (("timestamp", record.timestamp), ("receivedAt", record.received_at)):
        if not _time_ok(ms):
            return Rejected("bad-time", f"{name} {ms}")
    data = record.data
    numbers: tuple[tuple[str, str | None, bool], ...]
    if isinstance(data, Trade):
        if not _text_ok(data.trade_id):
            return Rejected("bad-text", f"tradeId {data.trade_id[:40]!r}")
        if not _time_ok(data.trade_time):
            return Rejected("bad-time", f"tradeTime {data.trade_time}")
        numbers = (("price", data.price, False), ("quantity", data.quantity, False))
    elif isinstance(data, Kline):
        if not _text_ok(data.interval):
            return Rejected("bad-text", f"interval {data.interval[:40]!r}")
        for name, ms in (("startTime", data.start_time), ("endTime", data.end_time)):
            if not _time_ok(ms):
                return Rejected("bad-time", f"{name} {ms}")
        if not 0 <= data.trades <= MAX_COUNT:
            return Rejected("bad-count", f"trades {data.trades}")
        numbers = (
            ("open", data.open, False), ("high", data.high, False), ("low", data.low, False),
            ("close", data.close, False), ("volume", data.volume, False),
            ("quoteVolume", data.quote_volume, False),
        )  # fmt: skip
    elif isinstance(data, Ticker):
        numbers = (
            ("last", data.last, False), ("open", data.open, False), ("high", data.high, False),
            ("low", data.low, False), ("volume", data.volume, False),
            ("quoteVolume", data.quote_volume, False), ("change", data.change, True),
            ("changePercent", data.change_percent, True), ("bidPrice", data.bid_price, False),
            ("bidQuantity", data.bid_quantity, False), ("askPrice", data.ask_price, False),
            ("askQuantity", data.ask_quantity, False),
        )  # fmt: skip
    elif isinstance(data, Bbo):
        if not _text_ok(data.update_id):
            return Rejected("bad-text", f"updateId {data.update_id[:40]!r}")
        numbers = (
            ("bidPrice", data.bid_price, False), ("bidQuantity", data.bid_quantity, False),
            ("askPrice", data.ask_price, False), ("askQuantity", data.ask_quantity, False),
        )  # fmt: skip
    else:  # a type added to the schema but not to the sinks yet
        return Rejected("unsupported-type", record.type)
    for name, number, signed in numbers:
        if number is not None and not is_decimal(number, signed):
            return Rejected("not-a-decimal", f"{name} {number[:40]!r}")
    return None


def topic_type(topic: str) -> str:
    """`market.trade.binance.btc-usdt` → `trade` (empty for a topic that is not a market topic)."""
    prefix, _, rest = topic.partition(".")
    return rest.partition(".")[0] if prefix == "market" else ""


def read_record(topic: str, value: bytes | None) -> MarketRecord | Rejected:
    """Decode and check one market topic record."""
    if value is None:
        return Rejected("undecodable", "no value")
    try:
        record = decode_record(value)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
        return Rejected("undecodable", str(exc)[:200])
    if record.type != topic_type(topic):
        return Rejected("wrong-topic", f"a {record.type} record on {topic}")
    return check_record(record) or record
