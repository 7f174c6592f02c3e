"""Upbit: the array-request WebSocket API (exchange-protocols.md §3), shared with Bithumb's gen-2 API.

Protocol traits the connection code follows:

- A request is one JSON array `[{ticket}, {type, codes}..., {format}]`, sent as text; there is no
  acknowledgement (data just starts to flow) and no unsubscribe: each request replaces the
  connection's whole set, so a change of set is a new request naming every stream.
- Frames arrive as binary frames holding UTF-8 JSON.
- The server closes a connection idle for 120 s: the client sends the text `PING` every 60 s and the
  server answers `{"status":"UP"}`.

Mapping to the collector's records:

- Trades are requested real-time only (no snapshot of the previous trade); the other types with
  their snapshot, which gives the current state at once.
- Stream names are `<type>:<code>`: `trade:KRW-BTC`, `ticker:KRW-BTC`, `orderbook:KRW-BTC.1` (the
  top of the book: `bbo`), `candle.1m:KRW-BTC`. `KRW-BTC` is QUOTE-BASE, so the symbol is `BTC/KRW`.
- Prices and sizes come as JSON numbers; they are decoded as Decimal (exactly the digits sent) and
  written as plain decimal strings (`1e-08` becomes `0.00000001`).
- Trades: `ask_bid` ASK means the taker sold; `sequential_id` is the trade id (unique, not ordered:
  the normalize agent dedupes it in a window).
- bbo: the orderbook has no sequence number, so `updateId` is its timestamp (Bithumb's µs string).
- depth: every orderbook message is the whole top-N book (`orderbook:KRW-BTC.15`; Upbit offers 1, 5,
  15 and 30 levels), read as a `DepthBook` whose id is the timestamp; a unit side with size 0 is no
  level. The same message is also the bbo: an orderbook frame gives the bbo record and the book, and a
  request names each code once in the orderbook type, with the most levels any of its streams asked
  for (a symbol with both `bbo` and `depth` gets one book, not two). The caller keeps the book only
  for symbols subscribed to depth. `GET /v1/orderbook` gives the same book over REST.
- ticker: Upbit's describes the trading day (open, high, low and volumes since 00:00 UTC; change
  against the previous close), not a rolling 24 h; it has no bid/ask.
- kline: candles have no closed flag and no trade count. Every candle message is an update
  (`closed: false`); when a later bar of the same symbol and interval arrives, the previous bar's last
  state is published once more with `closed: true`, just before the new bar. `trades` is 0.

REST backfill and fallback: `trades/ticks` answers newest first and pages only backwards (by
`cursor`, a trade's `sequential_id`), so the backfill asks for the newest 500 trades, then the pages
before them (`older_trades_request`) until a page reaches back past the last trade seen; the
normalize agent drops the trades it already published by id. How far the stream got is a trade's
position (`trade_marker`, `trade_position`): Upbit's `sequential_id` is the trade time in ms followed
by a 4-digit counter, so it is its own position.

Failure reasons: `invalid-json`, `schema-mismatch`, `unknown-event` (a `type` this adapter does not
know), `unsupported-data-type` (a candle interval it does not map), `unknown-symbol`, `empty-book`
(an orderbook without levels), `invalid-number` (NaN, Infinity).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec import UNSET, Raw, UnsetType

from streams.depth import DepthBook, DepthSettings, DepthSnapshot
from streams.exchanges.base import (
    ControlEvent,
    DataKind,
    DataType,
    ErrorReply,
    ExchangeAdapter,
    ExchangeLimits,
    FrameError,
    Instrument,
    ParsedItem,
    SubscriptionList,
)
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade
from streams.rest import RestRequest, RestTag

_T = TypeVar("_T")
_TICKET_NAMESPACE = uuid.UUID("6f1d5b52-0c1e-4f59-9a35-6b1f0f3a8e21")
# collector interval → Upbit candle unit
_CANDLE_UNITS = {"1s": "1s", "1m": "1m", "3m": "3m", "5m": "5m", "10m": "10m", "15m": "15m", "30m": "30m",
                 "1h": "60m", "4h": "240m"}  # fmt: skip
_INTERVAL_OF_UNIT = {unit: interval for interval, unit in _CANDLE_UNITS.items()}
_INTERVAL_MS = {"1s": 1_000, "1m": 60_000, "3m": 180_000, "5m": 300_000, "10m": 600_000, "15m": 900_000,
                "30m": 1_800_000, "1h": 3_600_000, "4h": 14_400_000}  # fmt: skip
# SIMPLE format abbreviations (documented for trade and orderbook), mapped back to DEFAULT names.
_SIMPLE_KEYS = {
    "ty": "type", "cd": "code", "tp": "trade_price", "tv": "trade_volume", "ab": "ask_bid",
    "pcp": "prev_closing_price", "c": "change", "cp": "change_price", "td": "trade_date",
    "ttm": "trade_time", "ttms": "trade_timestamp", "tms": "timestamp", "sid": "sequential_id",
    "bap": "best_ask_price", "bas": "best_ask_size", "bbp": "best_bid_price", "bbs": "best_bid_size",
    "st": "stream_type", "tas": "total_ask_size", "tbs": "total_bid_size", "obu": "orderbook_units",
    "ap": "ask_price", "bp": "bid_price", "as": "ask_size", "bs": "bid_size", "lv": "level",
}  # fmt: skip
_BIG_ENOUGH_FOR_MICROSECONDS = 10**14  # epoch ms stay below this until the year 5138


class _Envelope(msgspec.Struct, gc=False):
    type: str | UnsetType = UNSET
    simple_type: str | UnsetType = msgspec.field(name="ty", default=UNSET)
    error: Raw | UnsetType = UNSET
    status: str | UnsetType = UNSET
    method: str | UnsetType = UNSET


class _Error(msgspec.Struct, gc=False):
    name: str | int
    message: str = ""


class _ErrorFrame(msgspec.Struct, gc=False):
    error: _Error


class _Subscription(msgspec.Struct, gc=False):
    type: str
    codes: list[str] = []


class _SubscriptionList(msgspec.Struct, gc=False):
    result: list[_Subscription]
    ticket: str | None = None


class _TradeEvent(msgspec.Struct, gc=False):
    code: str
    timestamp: int | str
    trade_timestamp: int | str
    trade_price: Decimal
    trade_volume: Decimal
    ask_bid: str
    sequential_id: int | str


class _TickerEvent(msgspec.Struct, gc=False):
    code: str
    timestamp: int | str
    opening_price: Decimal
    high_price: Decimal
    low_price: Decimal
    trade_price: Decimal
    acc_trade_volume: Decimal
    acc_trade_price: Decimal
    signed_change_price: Decimal
    signed_change_rate: Decimal


class _BookLevel(msgspec.Struct, gc=False):
    ask_price: Decimal
    bid_price: Decimal
    ask_size: Decimal
    bid_size: Decimal


class _OrderbookEvent(msgspec.Struct, gc=False):
    code: str
    timestamp: int | str
    orderbook_units: list[_BookLevel]


class _RestOrderbook(_OrderbookEvent, gc=False):
    code: str = msgspec.field(name="market")


class _Market(msgspec.Struct, gc=False):
    market: str


class _RestTick(msgspec.Struct, gc=False):
    timestamp: int | str
    trade_price: Decimal
    trade_volume: Decimal
    ask_bid: str
    sequential_id: int | str


class _RestTicker(_TickerEvent, gc=False):
    code: str = msgspec.field(name="market")


class _RestCandle(msgspec.Struct, gc=False):
    candle_date_time_utc: str
    opening_price: Decimal
    high_price: Decimal
    low_price: Decimal
    trade_price: Decimal
    candle_acc_trade_volume: Decimal
    candle_acc_trade_price: Decimal
    timestamp: int | str


class _CandleEvent(_RestCandle, gc=False):  # the WebSocket's candle: the REST one plus its market
    code: str


class _TradeMark(msgspec.Struct, gc=False):
    type: str
    code: str
    sequential_id: int | str
    trade_timestamp: int | str


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_error_decoder = msgspec.json.Decoder(_ErrorFrame)
_list_decoder = msgspec.json.Decoder(_SubscriptionList)
_trade_decoder = msgspec.json.Decoder(_TradeEvent)
_ticker_decoder = msgspec.json.Decoder(_TickerEvent)
_orderbook_decoder = msgspec.json.Decoder(_OrderbookEvent)
_candle_decoder = msgspec.json.Decoder(_CandleEvent)
_markets_decoder = msgspec.json.Decoder(list[_Market])
_rest_orderbooks_decoder = msgspec.json.Decoder(list[_RestOrderbook])
_rest_ticks_decoder = msgspec.json.Decoder(list[_RestTick])
_rest_tickers_decoder = msgspec.json.Decoder(list[_RestTicker])
_rest_candles_decoder = msgspec.json.Decoder(list[_RestCandle])
_trade_mark_decoder = msgspec.json.Decoder(_TradeMark)
_simple_decoder = msgspec.json.Decoder(Any, float_hook=Decimal)
_encoder = msgspec.json.Encoder()
_MARKET_PREFIXES = (b'{"type":', b'{"ty":')
_REQUEST_WEIGHT = 1


def plain(value: Decimal) -> str:
    """A decimal as the contract's plain string: every digit sent, never an exponent."""
    if not value.is_finite():
        raise FrameError("invalid-number", str(value))
    return format(value, "f")


def millis(value: int | str) -> int:
    """Epoch milliseconds from an int or a digit string in ms or µs (Bithumb's orderbook)."""
    if isinstance(value, str):
        if not value.isdigit() or not value.isascii():
            raise FrameError("schema-mismatch", f"timestamp {value!r} is not a number")
        value = int(value)
    return value // 1000 if value >= _BIG_ENOUGH_FOR_MICROSECONDS else value


def _id_text(value: int | str) -> str:
    if isinstance(value, str) and not (value.isdigit() and value.isascii()):
        raise FrameError("schema-mismatch", f"sequential_id {value!r} is not a number")
    return str(value)


_REST_GROUPS = {"trades": "trade", "candles": "candle", "ticker": "ticker", "market": "market",
                "orderbook": "orderbook"}  # fmt: skip
_ID_COUNTER_SPAN = 10_000  # sequential_id = trade time in ms * this + a counter
_ID_TIME_TOLERANCE_MS = 60_000  # how far the time in an id may be from the trade time


class UpbitAdapter(ExchangeAdapter):
    name = "upbit"
    limits = ExchangeLimits(
        max_streams_per_connection=1024,  # not limited by Upbit; kept like Binance's for planning
        max_incoming_messages_per_second=5,  # data requests: 5/s and 100/min
        max_connection_attempts=5,
        connection_attempt_window_seconds=1,
        max_connection_lifetime_seconds=None,
        rest_weight_per_minute=600,  # 10 requests/s per endpoint group
        rest_requests_per_second=10,  # per endpoint group; `Remaining-Req` says what is left
    )
    kline_intervals = frozenset(_CANDLE_UNITS)
    data_kinds: ClassVar[frozenset[DataKind]] = frozenset({"trade", "kline", "ticker", "bbo", "depth"})
    instruments_path = "/v1/market/all?is_details=false"
    acknowledges_subscriptions = False
    replaces_subscriptions = True
    keepalive = (60.0, b"PING")
    trade_ids = "unique"
    # Upbit's sequential_id is the trade time in ms followed by a 4-digit counter (the documented
    # examples: trade_timestamp 1730336862047, sequential_id 17303368620470000), so ordered to the
    # millisecond: the backfill uses it as the position of the last trade seen.
    rest_history = True
    history_page = 500
    history_audits_per_second = 2.0  # of the trade group's 10 requests/s
    ticks_path: ClassVar[str] = "/v1/trades/ticks"
    ticker_path: ClassVar[str] = "/v1/ticker"
    orderbook_path: ClassVar[str] = "/v1/orderbook"
    depth_levels: ClassVar[Collection[int]] = (1, 5, 15, 30)  # the counts Upbit serves (2025-07)
    depth_speeds = ("realtime",)
    default_depth_levels = 15
    whole_books = True
    # Whether `GET /v1/orderbook` takes `count` (Upbit since v1.5.8); without it the answer is the
    # exchange's default depth.
    orderbook_count_param: ClassVar[bool] = True

    def __init__(self, instruments: Iterable[Instrument], depth: DepthSettings | None = None) -> None:
        super().__init__(instruments, depth)
        # (code, interval) → the newest candle seen, so a later bar can close it.
        self._open_bars: dict[tuple[str, str], MarketRecord] = {}
        self._decoders: dict[str, tuple[msgspec.json.Decoder[Any], Callable[[Any, int], list[ParsedItem]]]]
        self._decoders = {
            "trade": (_trade_decoder, self._trade),
            "ticker": (_ticker_decoder, self._ticker),
            "orderbook": (_orderbook_decoder, self._orderbook),
        }

    @staticmethod
    def parse_instruments(body: bytes) -> list[Instrument]:
        instruments = []
        for market in _decode(_markets_decoder, body):
            quote, dash, base = market.market.partition("-")
            if dash and quote and base:
                instruments.append(Instrument(f"{base}/{quote}", market.market, base, quote))
        return instruments

    def route(self, data_type: DataType) -> str:
        return "/websocket/v1"

    def stream_name(self, instrument: Instrument, data_type: DataType) -> str:
        if not self.parses(data_type):
            raise ValueError(f"{self.name} does not support data type {data_type}")
        code = instrument.exchange_symbol
        if data_type.kind == "kline":
            assert data_type.interval is not None
            return f"candle.{_CANDLE_UNITS[data_type.interval]}:{code}"
        if data_type.kind == "bbo":
            return f"orderbook:{code}.1"  # one level: the top of the book
        if data_type.kind == "depth":
            assert self.depth is not None
            return f"orderbook:{code}.{self.depth.levels}"
        return f"{data_type.kind}:{code}"

    def subscribe_message(self, streams: Sequence[str], request_id: int) -> bytes:
        """The whole request: it replaces what the connection had, so `streams` must be the full set."""
        codes: dict[str, list[str]] = {}
        for stream in streams:
            kind, colon, code = stream.partition(":")
            if not colon or not code:
                raise ValueError(f"{stream!r} is not an {self.name} stream name")
            codes.setdefault(kind, []).append(code)
        if "orderbook" in codes:
            codes["orderbook"] = _deepest_per_code(codes["orderbook"])
        ticket = uuid.uuid5(_TICKET_NAMESPACE, f"{request_id}/{','.join(streams)}")
        request: list[dict[str, Any]] = [{"ticket": str(ticket)}]
        # Trades ask for real-time data only: the snapshot is the last trade before the request, one
        # this connection's predecessor already delivered (or one from before the collector started).
        request += [
            {"type": kind, "codes": listed, "is_only_realtime": True} if kind == "trade" else
            {"type": kind, "codes": listed}
            for kind, listed in codes.items()
        ]  # fmt: skip
        request.append({"format": "DEFAULT"})
        return _encoder.encode(request)

    def unsubscribe_message(self, streams: Sequence[str], request_id: int) -> bytes:
        raise NotImplementedError(
            f"{self.name} has no unsubscribe: send subscribe_message with the streams that remain"
        )

    def parse_frame(self, payload: bytes, received_at: int) -> list[ParsedItem]:
        envelope = _decode(_envelope_decoder, payload)
        kind = envelope.type
        if kind is UNSET and envelope.simple_type is not UNSET:
            payload = _from_simple(payload)
            kind = envelope.simple_type
        if kind is not UNSET:
            handler = self._decoders.get(kind)
            if handler is not None:
                decoder, build = handler
                return build(_decode(decoder, payload), received_at)
            if kind.startswith("candle."):
                return self._candle(kind[7:], _decode(_candle_decoder, payload), received_at)
            raise FrameError("unknown-event", kind)
        if envelope.error is not UNSET:
            error = _decode(_error_decoder, payload).error
            return [ErrorReply(0, f"{error.name}: {error.message}")]
        if envelope.status is not UNSET:
            return []  # {"status":"UP"}: the answer to our keepalive
        if envelope.method == "LIST_SUBSCRIPTIONS":
            listed = _decode(_list_decoder, payload)
            streams = [f"{s.type}:{code}" for s in listed.result for code in s.codes]
            return [SubscriptionList(listed.ticket, streams)]
        raise FrameError("unknown-event", "no type, error, status or method")

    def control_events(self, payload: bytes) -> list[ControlEvent]:
        if payload.startswith(_MARKET_PREFIXES):
            return []
        return super().control_events(payload)

    def trade_marker(self, payload: bytes) -> tuple[str, int] | None:
        # Cheap test first: this runs for every frame, and only trade frames name "trade" up front.
        if not self.rest_history or payload.find(b'"trade"', 0, 24) < 0:
            return None
        try:
            mark = _trade_mark_decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        instrument = self.instruments.get(mark.code)
        if instrument is None:
            return None
        try:
            position = self._position(_id_text(mark.sequential_id), millis(mark.trade_timestamp))
        except FrameError:
            return None  # the normalize agent dead-letters the frame
        return instrument.symbol, position

    def trade_position(self, trade: Trade) -> int:
        """Where a trade stands in its symbol's history: the numbers `trade_marker` gives the source."""
        return self._position(trade.trade_id, trade.trade_time)

    @staticmethod
    def _position(sequential_id: str, trade_time: int) -> int:
        return int(sequential_id)  # time-based: ms followed by a 4-digit counter

    # -- records ------------------------------------------------------------------------------------

    def _trade(self, event: _TradeEvent, received_at: int) -> list[ParsedItem]:
        if event.ask_bid not in ("ASK", "BID"):
            raise FrameError("schema-mismatch", f"ask_bid {event.ask_bid!r}")
        data = Trade(
            price=plain(event.trade_price),
            quantity=plain(event.trade_volume),
            side="sell" if event.ask_bid == "ASK" else "buy",  # ASK: the taker hit the bids
            trade_id=_id_text(event.sequential_id),
            trade_time=millis(event.trade_timestamp),
        )
        symbol = self._instrument(event.code).symbol
        return [MarketRecord(self.name, symbol, "trade", millis(event.timestamp), received_at, data)]

    def _ticker(self, event: _TickerEvent, received_at: int) -> list[ParsedItem]:
        symbol = self._instrument(event.code).symbol
        return [
            MarketRecord(self.name, symbol, "ticker", millis(event.timestamp), received_at, _ticker(event))
        ]

    def _orderbook(self, event: _OrderbookEvent, received_at: int) -> list[ParsedItem]:
        """The bbo record and the whole book: one message is both (see the module docstring)."""
        symbol = self._instrument(event.code).symbol
        if not event.orderbook_units:
            raise FrameError("empty-book", event.code)
        top = event.orderbook_units[0]
        update_id = _id_text(event.timestamp)  # no sequence number: the (µs on Bithumb) timestamp
        event_time = millis(event.timestamp)
        data = Bbo(
            bid_price=plain(top.bid_price),
            bid_quantity=plain(top.bid_size),
            ask_price=plain(top.ask_price),
            ask_quantity=plain(top.ask_size),
            update_id=update_id,
        )
        bids, asks = _book_sides(event.orderbook_units)
        return [
            MarketRecord(self.name, symbol, "bbo", event_time, received_at, data),
            DepthBook(symbol, event_time, received_at, int(update_id), bids, asks),
        ]

    def _candle(self, unit: str, event: _CandleEvent, received_at: int) -> list[ParsedItem]:
        interval = _INTERVAL_OF_UNIT.get(unit)
        if interval is None:
            raise FrameError("unsupported-data-type", f"candle.{unit}")
        symbol = self._instrument(event.code).symbol
        data = self._kline(interval, event)
        start_time = data.start_time
        record = MarketRecord(self.name, symbol, "kline", millis(event.timestamp), received_at, data)
        items: list[ParsedItem] = []
        key = (event.code, interval)
        previous = self._open_bars.get(key)
        if previous is not None:
            assert isinstance(previous.data, Kline)
            if start_time < previous.data.start_time:
                return []  # a late update of a bar already closed: the closing record was final
            if start_time > previous.data.start_time:
                closed = msgspec.structs.replace(previous.data, closed=True)
                items.append(msgspec.structs.replace(previous, data=closed, received_at=received_at))
        self._open_bars[key] = record
        items.append(record)
        return items

    @staticmethod
    def _kline(interval: str, candle: _RestCandle) -> Kline:
        try:
            start = datetime.fromisoformat(candle.candle_date_time_utc).replace(tzinfo=UTC)
        except ValueError:
            raise FrameError("schema-mismatch", f"candle time {candle.candle_date_time_utc!r}") from None
        start_time = int(start.timestamp() * 1000)
        return Kline(
            interval=interval,
            start_time=start_time,
            end_time=start_time + _INTERVAL_MS[interval] - 1,
            open=plain(candle.opening_price),
            high=plain(candle.high_price),
            low=plain(candle.low_price),
            close=plain(candle.trade_price),
            volume=plain(candle.candle_acc_trade_volume),
            quote_volume=plain(candle.candle_acc_trade_price),
            trades=0,  # Upbit does not count a candle's trades
            closed=False,
        )

    # -- REST history (backfill and fallback) ---------------------------------------------------------

    def trades_request(self, instrument: Instrument, from_id: int | None, limit: int) -> RestRequest:
        """The newest (at most 500) trades, whatever `from_id`: trades/ticks only pages backwards.

        Trades of the page that were already delivered are dropped downstream by id; the backfill asks
        for `older_trades_request` pages until it reaches the last trade seen.
        """
        params = {"market": instrument.exchange_symbol, "count": str(min(limit, 500))}
        return RestRequest("trades", self.ticks_path, params, _REQUEST_WEIGHT, instrument.exchange_symbol)

    @staticmethod
    def rest_group(request: RestRequest) -> str:
        # /v1/trades/ticks → trade, /v1/candles/... → candle, /v1/ticker → ticker, /v1/market/all → market
        segment = request.path.split("/")[2] if request.path.count("/") >= 2 else request.path
        return _REST_GROUPS.get(segment, segment)

    @staticmethod
    def rest_remaining(headers: Mapping[str, str]) -> int | None:
        # `Remaining-Req: group=trade; min=1800; sec=9` (`min` is deprecated; `sec` counts)
        value = headers.get("Remaining-Req", "")
        for part in value.split(";"):
            key, _, number = part.strip().partition("=")
            if key == "sec" and number.strip().isdigit():
                return int(number)
        return None

    def keepalive_reply(self, payload: bytes) -> bool:
        # `{"status":"UP"}`, the answer to our text PING, comes every 10 s even on a stalled stream.
        return payload.startswith(b'{"status"')

    def history_request(self, instrument: Instrument, from_id: int | None, cursor: str | None) -> RestRequest:
        if cursor is None:
            return self.trades_request(instrument, None, self.history_page)
        return self.older_trades_request(instrument, cursor, self.history_page)

    def trade_id_consistent(self, trade: Trade) -> bool:
        # Upbit's sequential_id is the trade time in ms followed by a 4-digit counter.
        text = trade.trade_id
        if not (text.isdigit() and len(text) < 30):
            return False
        return abs(int(text) // _ID_COUNTER_SPAN - trade.trade_time) <= _ID_TIME_TOLERANCE_MS

    def older_trades_request(self, instrument: Instrument, cursor: str, limit: int) -> RestRequest:
        """The page of trades before the one whose sequential_id is `cursor`, newest first."""
        params = {"market": instrument.exchange_symbol, "count": str(min(limit, 500)), "cursor": str(cursor)}
        return RestRequest("trades", self.ticks_path, params, _REQUEST_WEIGHT, instrument.exchange_symbol)

    def klines_request(
        self, instrument: Instrument, interval: str, start_time: int, limit: int
    ) -> RestRequest:
        """The newest candles (at most 200; Upbit has no start parameter, only `to`)."""
        unit = _CANDLE_UNITS[interval]
        path = "/v1/candles/seconds" if unit == "1s" else f"/v1/candles/minutes/{unit[:-1]}"
        params = {"market": instrument.exchange_symbol, "count": str(min(limit, 200))}
        return RestRequest("klines", path, params, _REQUEST_WEIGHT, instrument.exchange_symbol, interval)

    def ticker_request(self, instrument: Instrument) -> RestRequest:
        params = {"markets": instrument.exchange_symbol}
        return RestRequest("ticker", self.ticker_path, params, _REQUEST_WEIGHT, instrument.exchange_symbol)

    def depth_snapshot_request(self, instrument: Instrument) -> RestRequest:
        assert self.depth is not None
        params = {"markets": instrument.exchange_symbol}
        limit = None
        if self.orderbook_count_param:
            limit = self.depth.snapshot_limit
            params["count"] = str(limit)
        return RestRequest("depth", self.orderbook_path, params, _REQUEST_WEIGHT, instrument.exchange_symbol,
                           limit=limit)  # fmt: skip

    def parse_depth_snapshot(self, tag: RestTag, body: bytes, received_at: int) -> DepthSnapshot:
        symbol = self._instrument(tag.exchange_symbol).symbol
        books = _decode(_rest_orderbooks_decoder, body)
        if len(books) != 1:
            raise FrameError("schema-mismatch", f"{len(books)} order books answering {tag.exchange_symbol}")
        book = books[0]
        if book.code != tag.exchange_symbol:
            raise FrameError("symbol-mismatch", f"{book.code} answering {tag.exchange_symbol}")
        bids, asks = _book_sides(book.orderbook_units)
        update_id = int(_id_text(book.timestamp))
        return DepthSnapshot(symbol, millis(book.timestamp), received_at, update_id, tag.limit, bids, asks)

    def parse_rest(self, tag: RestTag, body: bytes, received_at: int) -> list[MarketRecord]:
        symbol = self._instrument(tag.exchange_symbol).symbol
        records: list[MarketRecord] = []
        if tag.kind == "trades":
            for tick in _decode(_rest_ticks_decoder, body):
                if tick.ask_bid not in ("ASK", "BID"):
                    raise FrameError("schema-mismatch", f"ask_bid {tick.ask_bid!r}")
                time_ms = millis(tick.timestamp)
                trade = Trade(plain(tick.trade_price), plain(tick.trade_volume),
                              "sell" if tick.ask_bid == "ASK" else "buy", _id_text(tick.sequential_id),
                              time_ms)  # fmt: skip
                records.append(MarketRecord(self.name, symbol, "trade", time_ms, received_at, trade))
            records.reverse()  # the exchange answers newest first
            return records
        if tag.kind == "klines":
            interval = tag.interval or ""
            if interval not in _INTERVAL_MS:
                raise FrameError("unsupported-data-type", f"kline_{interval}")
            for candle in _decode(_rest_candles_decoder, body):
                bar = self._kline(interval, candle)
                bar = msgspec.structs.replace(bar, closed=bar.end_time < received_at)
                records.append(MarketRecord(self.name, symbol, "kline", min(bar.end_time, received_at),
                                            received_at, bar))  # fmt: skip
            records.sort(key=lambda record: record.data.start_time)  # type: ignore[union-attr]
            return records
        if tag.kind == "ticker":
            for ticker in _decode(_rest_tickers_decoder, body):
                if ticker.code != tag.exchange_symbol:
                    raise FrameError("symbol-mismatch", f"{ticker.code} answering {tag.exchange_symbol}")
                records.append(MarketRecord(self.name, symbol, "ticker", millis(ticker.timestamp),
                                            received_at, _ticker(ticker)))  # fmt: skip
            return records
        raise FrameError("unsupported-rest", f"{self.name} does not parse REST {tag.kind}")

    @staticmethod
    def rest_weight_used(headers: Mapping[str, str]) -> int | None:
        return None  # `Remaining-Req` counts what is left per group, not weight used

    def _instrument(self, code: str) -> Instrument:
        instrument = self.instruments.get(code)
        if instrument is None:
            raise FrameError("unknown-symbol", code)
        return instrument


def _book_sides(units: list[_BookLevel]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Bids and asks, best first, from orderbook units (each unit holds one level of both sides)."""
    bids: list[tuple[str, str]] = []
    asks: list[tuple[str, str]] = []
    for unit in units:
        bid_size, ask_size = plain(unit.bid_size), plain(unit.ask_size)
        if not unit.bid_size.is_zero():  # a thinner side leaves the rest of its units empty
            bids.append((plain(unit.bid_price), bid_size))
        if not unit.ask_size.is_zero():
            asks.append((plain(unit.ask_price), ask_size))
    return bids, asks


def _deepest_per_code(codes: list[str]) -> list[str]:
    """Orderbook codes with each market once, at the most levels asked for (`KRW-BTC.1`, `KRW-BTC.15`
    → `KRW-BTC.15`), in first-seen order."""
    deepest: dict[str, int] = {}
    for code in codes:
        market, _, count = code.partition(".")
        levels = int(count) if count.isdigit() else 0
        deepest[market] = max(deepest.get(market, 0), levels)
    return [f"{market}.{levels}" if levels else market for market, levels in deepest.items()]


def _ticker(event: _TickerEvent) -> Ticker:
    return Ticker(
        last=plain(event.trade_price),
        open=plain(event.opening_price),
        high=plain(event.high_price),
        low=plain(event.low_price),
        volume=plain(event.acc_trade_volume),
        quote_volume=plain(event.acc_trade_price),
        change=plain(event.signed_change_price),
        change_percent=plain(event.signed_change_rate.scaleb(2)),
    )


def _rename(value: Any) -> Any:
    if isinstance(value, dict):
        return {_SIMPLE_KEYS.get(key, key): _rename(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rename(item) for item in value]
    return value


def _from_simple(payload: bytes) -> bytes:
    """A SIMPLE-format frame rewritten with the DEFAULT names (numbers kept exact as Decimal strings)."""
    document = _decode(_simple_decoder, payload)
    try:
        return _encoder.encode(_rename(document))
    except RecursionError:
        raise FrameError("invalid-json", "nested too deeply") from None


def _decode(decoder: msgspec.json.Decoder[_T], payload: bytes | Raw) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise FrameError("schema-mismatch", str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FrameError("invalid-json", str(exc) or type(exc).__name__) from None
    except ArithmeticError:  # float_hook=Decimal: an exponent past Decimal's range (InvalidOperation)
        raise FrameError("invalid-number", "a number's exponent is out of range") from None
