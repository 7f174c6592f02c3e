"""The PostgreSQL sink's schema and write rules: migrations, staging tables, and how a batch of market
records becomes COPY text and `INSERT … ON CONFLICT` statements. Pure code: no I/O.

Values never enter SQL text: they travel as COPY data into a per-connection staging table, and one
constant `INSERT … SELECT … ON CONFLICT` per table moves them into place. The SQL here is built only
from the constants in this module.

Adding a record type (depth, once books exist): one `TableSpec` in `TABLES` and one `Migration`
creating its table; `checks.check_record` learns its values.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade

Row = tuple[str | None, ...]  # one staging row, every value as COPY text (None: NULL)
VERSION_TABLE = "collector_schema_version"
MIGRATION_LOCK = 0x636F6C6C  # pg_advisory_xact_lock key: workers starting together migrate one at a time


def epoch_ms(column: str) -> str:
    """SQL turning a staging column of epoch milliseconds into an exact timestamptz (no float
    rounding: `to_timestamp(ms / 1000.0)` goes through a double)."""
    return f"(timestamptz 'epoch' + {column} * interval '1 millisecond')"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "market history: trades, klines, tickers, bbo",
        (
            """CREATE TABLE IF NOT EXISTS trades (
                exchange text NOT NULL, symbol text NOT NULL, trade_id text NOT NULL,
                price numeric NOT NULL, quantity numeric NOT NULL, side text NOT NULL,
                trade_time timestamptz NOT NULL, received_at timestamptz NOT NULL,
                PRIMARY KEY (exchange, symbol, trade_id))""",
            # BRIN: trades arrive in time order, and a B-tree on time cost a third of the write time.
            "CREATE INDEX IF NOT EXISTS trades_by_time ON trades USING brin (trade_time)",
            """CREATE TABLE IF NOT EXISTS klines (
                exchange text NOT NULL, symbol text NOT NULL, "interval" text NOT NULL,
                start_time timestamptz NOT NULL, end_time timestamptz NOT NULL,
                open numeric NOT NULL, high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL,
                volume numeric NOT NULL, quote_volume numeric NOT NULL, trades bigint NOT NULL,
                closed boolean NOT NULL, event_time timestamptz NOT NULL, received_at timestamptz NOT NULL,
                PRIMARY KEY (exchange, symbol, "interval", start_time))""",
            """CREATE TABLE IF NOT EXISTS tickers (
                exchange text NOT NULL, symbol text NOT NULL, event_time timestamptz NOT NULL,
                last numeric NOT NULL, open numeric NOT NULL, high numeric NOT NULL, low numeric NOT NULL,
                volume numeric NOT NULL, quote_volume numeric NOT NULL,
                change numeric NOT NULL, change_percent numeric NOT NULL,
                bid_price numeric, bid_quantity numeric, ask_price numeric, ask_quantity numeric,
                received_at timestamptz NOT NULL,
                PRIMARY KEY (exchange, symbol, event_time))""",
            """CREATE TABLE IF NOT EXISTS bbo (
                exchange text NOT NULL, symbol text NOT NULL, update_id text NOT NULL,
                bid_price numeric NOT NULL, bid_quantity numeric NOT NULL,
                ask_price numeric NOT NULL, ask_quantity numeric NOT NULL,
                event_time timestamptz NOT NULL, received_at timestamptz NOT NULL,
                PRIMARY KEY (exchange, symbol, update_id))""",
        ),
    ),
)

# TimescaleDB wants the time column in every unique key: only the tables keyed by time qualify.
HYPERTABLES = {"klines": "start_time", "tickers": "event_time"}


def hypertable_statements(timescale_installed: bool) -> list[str]:
    if not timescale_installed:
        return []
    return [
        f"SELECT create_hypertable('{table}', '{column}', if_not_exists => TRUE, migrate_data => TRUE)"
        for table, column in HYPERTABLES.items()
    ]


def pending_migrations(current: int, migrations: Sequence[Migration] = MIGRATIONS) -> list[Migration]:
    """The migrations a database at schema version `current` still needs, in order."""
    return [m for m in sorted(migrations, key=lambda m: m.version) if m.version > current]


@dataclass(frozen=True)
class TableSpec:
    """How one record type is stored."""

    kind: str  # the record type
    table: str
    stage: tuple[tuple[str, str], ...]  # staging columns: (name, SQL type)
    columns: tuple[str, ...]  # target columns, in the order of `select`
    select: tuple[str, ...]  # SQL expressions over the staging columns
    conflict: str  # the ON CONFLICT clause
    key: Callable[[MarketRecord], tuple[Any, ...]]  # natural key: one row per key and batch
    row: Callable[[MarketRecord], Row]
    # Among records of one key in a batch, the one with the highest rank is written (later ones win
    # ties); None: the first one, as the database keeps the first too.
    rank: Callable[[MarketRecord], tuple[Any, ...]] | None = None
    stage_table: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_table", f"sink_stage_{self.table}")

    def create_stage(self) -> str:
        columns = ", ".join(f"{name} {kind}" for name, kind in self.stage)
        return f"CREATE TEMP TABLE IF NOT EXISTS {self.stage_table} ({columns}) ON COMMIT DELETE ROWS"

    def copy_statement(self) -> str:
        return f"COPY {self.stage_table} ({', '.join(name for name, _ in self.stage)}) FROM STDIN"

    def insert_statement(self) -> str:
        return (
            f"INSERT INTO {self.table} ({', '.join(self.columns)}) "
            f"SELECT {', '.join(self.select)} FROM {self.stage_table} {self.conflict}"
        )


def _s(value: int) -> str:
    return str(value)


def _trade_row(record: MarketRecord) -> Row:
    data: Trade = record.data  # type: ignore[assignment]
    return (
        record.exchange, record.symbol, data.trade_id, data.price, data.quantity, data.side,
        _s(data.trade_time), _s(record.received_at),
    )  # fmt: skip


def _kline_row(record: MarketRecord) -> Row:
    data: Kline = record.data  # type: ignore[assignment]
    return (
        record.exchange, record.symbol, data.interval, _s(data.start_time), _s(data.end_time),
        data.open, data.high, data.low, data.close, data.volume, data.quote_volume, _s(data.trades),
        "t" if data.closed else "f", _s(record.timestamp), _s(record.received_at),
    )  # fmt: skip


def _ticker_row(record: MarketRecord) -> Row:
    data: Ticker = record.data  # type: ignore[assignment]
    return (
        record.exchange, record.symbol, _s(record.timestamp), data.last, data.open, data.high, data.low,
        data.volume, data.quote_volume, data.change, data.change_percent,
        data.bid_price, data.bid_quantity, data.ask_price, data.ask_quantity, _s(record.received_at),
    )  # fmt: skip


def _bbo_row(record: MarketRecord) -> Row:
    data: Bbo = record.data  # type: ignore[assignment]
    return (
        record.exchange, record.symbol, data.update_id, data.bid_price, data.bid_quantity,
        data.ask_price, data.ask_quantity, _s(record.timestamp), _s(record.received_at),
    )  # fmt: skip


_TEXT, _NUM, _MS = "text", "numeric", "bigint"
_KLINE_VALUES = ("open", "high", "low", "close", "volume", "quote_volume")
_TICKER_VALUES = ("last", "open", "high", "low", "volume", "quote_volume", "change", "change_percent",
                  "bid_price", "bid_quantity", "ask_price", "ask_quantity")  # fmt: skip
_BBO_VALUES = ("bid_price", "bid_quantity", "ask_price", "ask_quantity")

TABLES: dict[str, TableSpec] = {
    "trade": TableSpec(
        kind="trade",
        table="trades",
        stage=(("exchange", _TEXT), ("symbol", _TEXT), ("trade_id", _TEXT), ("price", _NUM),
               ("quantity", _NUM), ("side", _TEXT), ("trade_time", _MS), ("received_at", _MS)),
        columns=("exchange", "symbol", "trade_id", "price", "quantity", "side", "trade_time", "received_at"),
        select=("exchange", "symbol", "trade_id", "price", "quantity", "side",
                epoch_ms("trade_time"), epoch_ms("received_at")),
        conflict="ON CONFLICT (exchange, symbol, trade_id) DO NOTHING",  # a trade never changes
        key=lambda r: (r.exchange, r.symbol, r.data.trade_id),  # type: ignore[union-attr]
        row=_trade_row,
    ),
    "kline": TableSpec(
        kind="kline",
        table="klines",
        stage=(("exchange", _TEXT), ("symbol", _TEXT), ("bar_interval", _TEXT), ("start_time", _MS),
               ("end_time", _MS), *((name, _NUM) for name in _KLINE_VALUES), ("trades", "bigint"),
               ("closed", "boolean"), ("event_time", _MS), ("received_at", _MS)),
        columns=("exchange", "symbol", '"interval"', "start_time", "end_time", *_KLINE_VALUES, "trades",
                 "closed", "event_time", "received_at"),
        select=("exchange", "symbol", "bar_interval", epoch_ms("start_time"), epoch_ms("end_time"),
                *_KLINE_VALUES, "trades", "closed", epoch_ms("event_time"), epoch_ms("received_at")),
        # A closed bar is final; an open one takes a later update of itself, or its close.
        conflict=(
            'ON CONFLICT (exchange, symbol, "interval", start_time) DO UPDATE SET '
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in ("end_time", *_KLINE_VALUES, "trades", "closed",
                                                        "event_time", "received_at"))
            + " WHERE NOT klines.closed AND (EXCLUDED.closed OR EXCLUDED.event_time >= klines.event_time)"
        ),
        key=lambda r: (r.exchange, r.symbol, r.data.interval, r.data.start_time),  # type: ignore[union-attr]
        row=_kline_row,
        rank=lambda r: (r.data.closed, r.timestamp),  # type: ignore[union-attr]
    ),
    "ticker": TableSpec(
        kind="ticker",
        table="tickers",
        stage=(("exchange", _TEXT), ("symbol", _TEXT), ("event_time", _MS),
               *((name, _NUM) for name in _TICKER_VALUES), ("received_at", _MS)),
        columns=("exchange", "symbol", "event_time", *_TICKER_VALUES, "received_at"),
        select=("exchange", "symbol", epoch_ms("event_time"), *_TICKER_VALUES, epoch_ms("received_at")),
        conflict="ON CONFLICT (exchange, symbol, event_time) DO NOTHING",
        key=lambda r: (r.exchange, r.symbol, r.timestamp),
        row=_ticker_row,
    ),
    "bbo": TableSpec(
        kind="bbo",
        table="bbo",
        stage=(("exchange", _TEXT), ("symbol", _TEXT), ("update_id", _TEXT),
               *((name, _NUM) for name in _BBO_VALUES), ("event_time", _MS), ("received_at", _MS)),
        columns=("exchange", "symbol", "update_id", *_BBO_VALUES, "event_time", "received_at"),
        select=("exchange", "symbol", "update_id", *_BBO_VALUES, epoch_ms("event_time"),
                epoch_ms("received_at")),
        conflict="ON CONFLICT (exchange, symbol, update_id) DO NOTHING",
        key=lambda r: (r.exchange, r.symbol, r.data.update_id),  # type: ignore[union-attr]
        row=_bbo_row,
    ),
}  # fmt: skip


def rows_by_table(
    records: Iterable[MarketRecord], tables: dict[str, TableSpec] = TABLES
) -> dict[str, list[Row]]:
    """kind → staging rows, one per natural key (the rule of `TableSpec.rank`): `INSERT … ON CONFLICT
    DO UPDATE` refuses to touch one row twice in a statement."""
    chosen: dict[str, dict[tuple[Any, ...], MarketRecord]] = {}
    for record in records:
        spec = tables.get(record.type)
        if spec is None:
            continue
        per_key = chosen.setdefault(record.type, {})
        key = spec.key(record)
        held = per_key.get(key)
        if held is None or (spec.rank is not None and spec.rank(record) >= spec.rank(held)):
            per_key[key] = record
    return {kind: [tables[kind].row(r) for r in per_key.values()] for kind, per_key in chosen.items()}


def split_lanes(records: Iterable[MarketRecord], lanes: int) -> list[list[MarketRecord]]:
    """Records split into `lanes` groups by exchange and symbol: every row key of a symbol falls in one
    lane, so transactions of different lanes never wait for each other's rows."""
    split: list[list[MarketRecord]] = [[] for _ in range(lanes)]
    for record in records:
        split[zlib.crc32(f"{record.exchange}|{record.symbol}".encode()) % lanes].append(record)
    return split


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(rows: Iterable[Row]) -> bytes:
    """Rows in COPY's text format: tab-separated, `\\N` for NULL, backslash escapes."""
    lines = []
    for row in rows:
        fields = []
        for value in row:
            if value is None:
                fields.append("\\N")
            elif "\\" in value or "\t" in value or "\n" in value or "\r" in value:
                fields.append(value.translate(_ESCAPES))
            else:
                fields.append(value)
        lines.append("\t".join(fields))
    lines.append("")
    return "\n".join(lines).encode()
