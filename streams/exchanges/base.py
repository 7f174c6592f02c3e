"""What every exchange adapter provides.

An adapter is the pure protocol core for one exchange: it builds subscribe messages and turns frame
bytes into market records and control events. It opens no sockets and reads no clock: the receive
time is passed in. The source agents wrap it with I/O; the normalize agents call `parse_frame`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import msgspec

from streams.depth import DepthItem, DepthSettings, DepthSnapshot
from streams.records import MarketRecord, Trade
from streams.rest import RestRequest, RestTag
from streams.validation import TradeIdPolicy

DataKind = Literal["trade", "kline", "ticker", "bbo", "depth"]
_DATA_TYPE = re.compile(r"^(trade|ticker|bbo|depth)$|^kline_([0-9]+[smhdwM])$")
# Adapters parse order books (streams/depth.py) and the continuity engine's books publish them
# (streams/continuity/books.py): `depth` may be configured and subscribed. The switch stays so an
# exchange's adapter can be built before its books are published.
DEPTH_PUBLISHED = True
DEFAULT_SNAPSHOT_INTERVAL_SECONDS = 60.0


class FrameError(ValueError):
    """A frame the adapter cannot turn into events.

    `reason` is a short stable slug (the dead-letter reason and metric label); `detail` says more.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DataType:
    """A configured data type: `trade`, `ticker`, `bbo`, `depth` or `kline_<interval>`."""

    kind: DataKind
    interval: str | None = None

    @classmethod
    def parse(cls, text: str) -> DataType:
        match = _DATA_TYPE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"unknown data type {text!r}: expected trade, ticker, bbo, depth or kline_<interval>"
            )
        if match.group(2) is not None:
            return cls("kline", match.group(2))
        kind: DataKind = match.group(1)  # type: ignore[assignment]
        return cls(kind)

    def __str__(self) -> str:
        return f"kline_{self.interval}" if self.kind == "kline" else self.kind


@dataclass(frozen=True, slots=True)
class Instrument:
    """One market: `symbol` is the normalized BASE/QUOTE, `exchange_symbol` the exchange's own name."""

    symbol: str
    exchange_symbol: str
    base: str
    quote: str
    status: str = "TRADING"


@dataclass(frozen=True, slots=True)
class ExchangeLimits:
    """The exchange's published limits that connection management must respect."""

    max_streams_per_connection: int
    max_incoming_messages_per_second: float
    max_connection_attempts: int
    connection_attempt_window_seconds: float
    max_connection_lifetime_seconds: float | None
    rest_weight_per_minute: int
    # Exchanges that count requests per second per endpoint group instead of weight (Upbit 10/s per
    # group, Bithumb 150/s per category); None where only the weight counts (Binance).
    rest_requests_per_second: float | None = None


# Control events: what a frame tells the connection rather than the market.
class Ack(msgspec.Struct, frozen=True):
    request_id: int | str | None


class ErrorReply(msgspec.Struct, frozen=True):
    code: int
    message: str
    request_id: int | str | None = None


class ServerShutdown(msgspec.Struct, frozen=True):
    event_time: int


class SubscriptionList(msgspec.Struct, frozen=True):
    request_id: int | str | None
    streams: list[str]


ControlEvent = Ack | ErrorReply | ServerShutdown | SubscriptionList
ParsedItem = MarketRecord | ControlEvent | DepthItem


class DepthSettingError(ValueError):
    """A depth setting the exchange does not offer; `key` is its config key (`levels`, `speed`, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class ExchangeAdapter(ABC):
    """The small fixed set of things an exchange module overrides."""

    name: ClassVar[str]  # the exchange token used in config, topics and metric labels
    limits: ClassVar[ExchangeLimits]
    kline_intervals: ClassVar[frozenset[str]]
    data_kinds: ClassVar[frozenset[DataKind]]
    instruments_path: ClassVar[str]  # REST path (with query) that lists the exchange's markets
    # Protocol traits the connection code follows (overridden by exchanges that differ from Binance):
    acknowledges_subscriptions: ClassVar[bool] = True  # False: data just starts to flow (Upbit)
    replaces_subscriptions: ClassVar[bool] = False  # True: each request replaces the whole set (Upbit)
    keepalive: ClassVar[tuple[float, bytes] | None] = None  # (seconds, text message) the client must send
    # How trade ids behave (streams/validation.py): "increasing" (dedupe + gap detection), "unique"
    # (dedupe in a bounded window: Upbit, Bithumb), "none".
    trade_ids: ClassVar[TradeIdPolicy] = "unique"
    # True when the adapter implements the REST history methods below (backfill and REST fallback).
    rest_history: ClassVar[bool] = False
    # Public mirrors of the exchange's endpoints, named to the operator when the exchange is unreachable.
    public_mirrors: ClassVar[tuple[str, ...]] = ()
    # Order books: the level counts and diff speeds the exchange offers, and its defaults
    # (README, "Order books"). Speeds are names such as `100ms`; `realtime` where there is one speed.
    depth_levels: ClassVar[Collection[int]] = ()
    depth_speeds: ClassVar[tuple[str, ...]] = ()
    default_depth_levels: ClassVar[int] = 0
    # Whole books on every message (Upbit, Bithumb): every depth record is a snapshot.
    whole_books: ClassVar[bool] = False

    def __init__(self, instruments: Iterable[Instrument], depth: DepthSettings | None = None) -> None:
        self.instruments: dict[str, Instrument] = {i.exchange_symbol: i for i in instruments}
        self.by_symbol: dict[str, Instrument] = {i.symbol: i for i in self.instruments.values()}
        # The exchange's defaults unless the configuration says otherwise (CollectorConfig.depth_settings).
        self.depth: DepthSettings | None = (
            depth if depth is not None else self.depth_settings() if "depth" in self.data_kinds else None
        )

    @classmethod
    def parses(cls, data_type: DataType) -> bool:
        """Whether the adapter names and reads this data type's stream."""
        if data_type.kind not in cls.data_kinds:
            return False
        return data_type.kind != "kline" or data_type.interval in cls.kline_intervals

    @classmethod
    def supports(cls, data_type: DataType) -> bool:
        """Whether the data type may be configured and subscribed (see DEPTH_PUBLISHED)."""
        return cls.parses(data_type) and (data_type.kind != "depth" or DEPTH_PUBLISHED)

    @classmethod
    def depth_settings(
        cls,
        levels: int | None = None,
        speed: str | None = None,
        snapshot_interval_seconds: float | None = None,
    ) -> DepthSettings:
        """The depth settings with the exchange's defaults for what is None; DepthSettingError for a
        value the exchange does not offer."""
        if "depth" not in cls.data_kinds:
            raise DepthSettingError("depth", f"{cls.name} offers no order books")
        if levels is None:
            levels = cls.default_depth_levels
        elif levels not in cls.depth_levels:
            offered = _describe_counts(cls.depth_levels)
            raise DepthSettingError("levels", f"{cls.name} offers {offered} levels")
        if speed is None:
            speed = cls.depth_speeds[0]
        elif speed not in cls.depth_speeds:
            raise DepthSettingError("speed", f"{cls.name} offers the speeds {', '.join(cls.depth_speeds)}")
        if snapshot_interval_seconds is None:
            snapshot_interval_seconds = DEFAULT_SNAPSHOT_INTERVAL_SECONDS
        elif snapshot_interval_seconds <= 0:
            raise DepthSettingError("snapshotIntervalSeconds", "must be positive")
        return DepthSettings(levels, speed, snapshot_interval_seconds, cls.depth_snapshot_limit(levels))

    @classmethod
    def depth_snapshot_limit(cls, levels: int) -> int:
        """The levels to ask of a REST snapshot for a book publishing `levels` levels."""
        return levels

    @staticmethod
    @abstractmethod
    def parse_instruments(body: bytes) -> list[Instrument]:
        """Markets from the body of a GET of `instruments_path`."""

    @abstractmethod
    def route(self, data_type: DataType) -> str:
        """The path appended to `wsEndpoint` for a connection carrying this data type."""

    @abstractmethod
    def stream_name(self, instrument: Instrument, data_type: DataType) -> str:
        """The exchange's name for one subscribable stream."""

    @abstractmethod
    def subscribe_message(self, streams: Sequence[str], request_id: int) -> bytes: ...

    @abstractmethod
    def unsubscribe_message(self, streams: Sequence[str], request_id: int) -> bytes: ...

    @abstractmethod
    def parse_frame(self, payload: bytes, received_at: int) -> list[ParsedItem]:
        """Turn one frame into market records and control events.

        Raises FrameError, and nothing else, for a frame it cannot parse.
        """

    def keepalive_reply(self, payload: bytes) -> bool:
        """Whether a frame only answers our keepalive (no market data): it does not show a stream alive."""
        return False

    def control_events(self, payload: bytes) -> list[ControlEvent]:
        """The control events in a frame (acks, errors, shutdown notices).

        The source agent calls this for every frame it receives, so adapters override it to
        recognise ordinary market frames without parsing them.
        """
        try:
            items = self.parse_frame(payload, 0)
        except FrameError:
            return []
        return [item for item in items if isinstance(item, _CONTROL_EVENTS)]

    # -- REST history (backfill and fallback); exchanges that set `rest_history` override these ----

    # Trades per REST history page: the most the exchange returns in one answer.
    history_page: ClassVar[int] = 1000
    # Where ids cannot show a gap ("unique"), symbols whose history is compared with what was published,
    # per second across the exchange: a stream that skips trades on a healthy connection is caught so.
    history_audits_per_second: ClassVar[float] = 0.0

    def history_request(self, instrument: Instrument, from_id: int | None, cursor: str | None) -> RestRequest:
        """The continuity engine's history request: trades from `from_id` on where ids count trades;
        else the newest page, or with `cursor` the page before that trade (history paging backwards)."""
        return self.trades_request(instrument, from_id, self.history_page)

    def trade_id_consistent(self, trade: Trade) -> bool:
        """Whether a trade's id agrees with the rest of the trade (ids that encode the trade time)."""
        return True

    def trades_request(self, instrument: Instrument, from_id: int | None, limit: int) -> RestRequest:
        """Trades by id from `from_id` on (the newest ones when None), ids matching the trade stream's."""
        raise NotImplementedError(f"{self.name} has no REST trade history")

    def klines_request(
        self, instrument: Instrument, interval: str, start_time: int, limit: int
    ) -> RestRequest:
        raise NotImplementedError(f"{self.name} has no REST kline history")

    def ticker_request(self, instrument: Instrument) -> RestRequest:
        raise NotImplementedError(f"{self.name} has no REST ticker")

    def parse_rest(self, tag: RestTag, body: bytes, received_at: int) -> list[MarketRecord]:
        """Market records from the body answering the request tagged `tag`; raises FrameError."""
        raise FrameError("unsupported-rest", f"{self.name} does not parse REST {tag.kind}")

    def depth_snapshot_request(self, instrument: Instrument) -> RestRequest:
        """The REST order book of a symbol, `depth.snapshot_limit` levels deep (tag `depth/<symbol>/<n>`)."""
        raise NotImplementedError(f"{self.name} has no REST order book")

    def parse_depth_snapshot(self, tag: RestTag, body: bytes, received_at: int) -> DepthSnapshot:
        """The book in the body answering `depth_snapshot_request`; raises FrameError."""
        raise FrameError("unsupported-rest", f"{self.name} does not parse REST depth")

    @staticmethod
    def rest_weight_used(headers: Mapping[str, str]) -> int | None:
        """The request weight the exchange says this IP has used in its current window, if it says."""
        return None

    @staticmethod
    def rest_group(request: RestRequest) -> str:
        """The endpoint group a request counts against, where the exchange limits groups separately."""
        return "default"

    @staticmethod
    def rest_remaining(headers: Mapping[str, str]) -> int | None:
        """Requests the exchange says this group may still make in the current second, if it says."""
        return None

    def trade_marker(self, payload: bytes) -> tuple[str, int] | None:
        """(symbol, numeric trade id) when the frame is a trade: how the source tracks the last id seen.

        Called for every frame, so adapters override it to skip non-trade frames cheaply.
        """
        try:
            items = self.parse_frame(payload, 0)
        except FrameError:
            return None
        for item in items:
            if isinstance(item, MarketRecord) and isinstance(item.data, Trade):
                return (item.symbol, int(item.data.trade_id)) if item.data.trade_id.isdigit() else None
        return None


_CONTROL_EVENTS = (Ack, ErrorReply, ServerShutdown, SubscriptionList)


def _describe_counts(counts: Collection[int]) -> str:
    if isinstance(counts, range) and counts.step == 1:
        return f"{counts.start} to {counts.stop - 1}"
    return ", ".join(str(count) for count in sorted(counts))
