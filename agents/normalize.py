"""Normalize agents: `raw.<exchange>` → market topics, dead letters, gap events, history requests.

A raw record carries a batch of frames (or a REST answer); every frame becomes zero or more market
records, or a dead letter with its reason. Trades go through the continuity engine
(streams/continuity/), which publishes them in order, holds them across gaps, asks the exchange's REST
history (carried out by the source running the symbol's connection group: `fetch`) and rejects
invented ones; every other record is published as it comes. Order book items (`DepthDiff`, `DepthBook`)
and REST snapshot answers (`rest:depth/...`) go to the engine's books, which publish depth records,
ask for snapshots (`FetchSnapshot`, carried out by the same `fetch`) and resync (`BookResync`).

A raw record is acknowledged (and so its offset committed) once what its step produced has been
acknowledged by the broker; the next batch is normalized meanwhile. Trades the engine still holds do
not keep it open (Faust waits for every open record before a rebalance or a stop, and a hold can last
minutes): a crash loses them from memory, and the restarted engine repairs them from the exchange's
history like any gap (it continues from what the market topics hold).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from agents.book_metrics import book_crossed, book_resynced, register_books
from agents.metrics import event_emitted, flow_meter, gap_closed
from agents.writer import AcknowledgedAt, TopicWriter
from streams.continuity import (
    BookResync,
    BookSettings,
    ContinuityEngine,
    Drop,
    FetchRequest,
    FetchSnapshot,
    FetchTrades,
    GapClosed,
    Output,
    Publish,
    Reject,
    RejectFrame,
    Seed,
    Settings,
)
from streams.continuity.books import NEW_CONNECTION, REBALANCE, START
from streams.deadletter import dead_letter
from streams.depth import DepthBook, DepthDiff
from streams.events import CollectorEvent, encode_event
from streams.exchanges.base import ExchangeAdapter, FrameError, ParsedItem
from streams.raw import RawBatch, RawFrame, decode_batch
from streams.records import MarketRecord, Trade, encode_record
from streams.rest import RestTag, parse_source
from streams.topics import EVENTS, deadletter_topic, market_topic
from streams.validation import DEFAULT_CLOCK_SKEW_SECONDS, Validator, depth_problem
from tables.records import BookFlow

log = logging.getLogger(__name__)
# A dead letter must fit the producer's message size even when JSON escaping inflates a frame ~6x; a
# dead letter that can never be produced would be retried forever and stall the whole agent.
MAX_DEAD_LETTER_FRAME = 128 * 1024

ReadSeeds = Callable[[Collection[str]], Awaitable[dict[str, Seed]]]
Fetch = Callable[[FetchRequest], None]
BookWanted = Callable[[str], bool]  # whether a symbol is subscribed to depth here (the source knows)
BOOK_CHORES_MS = 5_000  # between dropping books no longer subscribed and logging sync progress
# Resyncs of every book a worker starts, takes over or reads on a new connection: the worker logs the
# cause once already. The others are one book's trouble, logged with their detail.
BULK_RESYNCS = frozenset({START, REBALANCE, NEW_CONNECTION})


class RawInput(NamedTuple):
    """One raw record: its value, the connection group whose partition it came from, and what to call
    once everything it produced is safe with the broker (None: nothing)."""

    value: bytes
    group: str
    settle: Callable[[], None] | None = None


class _Origin(msgspec.Struct, frozen=True, gc=False):
    """Where a record came from: what its dead letter names. Made per frame and held while a gap is
    repaired; scalars only, so gc=False keeps them (and the tuples carrying them) out of the garbage
    collector's generations."""

    connection_id: str
    sequence: int
    received_at: int
    payload: bytes

    def where(self) -> tuple[str, int, int, bytes]:
        return self.connection_id, self.sequence, self.received_at, self.payload


class _TradeOrigin(_Origin, frozen=True, gc=False):
    """A live trade's origin."""


class _FrameOrigin(_Origin, frozen=True, gc=False):
    """An order book item's origin."""


class Normalizer:
    """Turns raw batches of one exchange into market records and dead letters."""

    def __init__(
        self,
        adapter: ExchangeAdapter,
        writer: TopicWriter,
        clock_skew_seconds: float = DEFAULT_CLOCK_SKEW_SECONDS,
        read_seeds: ReadSeeds | None = None,
        fetch: Fetch | None = None,
        settings: Settings | None = None,
        book_wanted: BookWanted | None = None,
        book_settings: BookSettings | None = None,
    ) -> None:
        self.adapter = adapter
        self.writer = writer
        self.exchange = adapter.name
        self.deadletters = deadletter_topic(adapter.name)
        self.records_out = 0
        self.dead_lettered = 0
        self.duplicates = 0  # repeated trades: dropped and counted, not dead-lettered
        self.validator = Validator(adapter.name, adapter.trade_ids, clock_skew_seconds)
        if book_settings is None and adapter.depth is not None:
            book_settings = BookSettings.of(adapter.name, adapter.depth, adapter.whole_books)
        self.engine = ContinuityEngine(
            adapter.trade_ids,
            position=getattr(adapter, "trade_position", None),
            consistent=adapter.trade_id_consistent,
            settings=settings,
            audits_per_second=adapter.history_audits_per_second,
            books=book_settings,
        )
        self._book_wanted = book_wanted
        self._book_chores_at = 0
        self._progress_logged: dict[str, int] = {}
        if self.engine.books is not None:
            books = self.engine.books
            register_books(adapter.name, books.ages)
            flow_meter(adapter.name).book_states = lambda: {
                symbol: BookFlow(state, heard_at) for symbol, (state, heard_at) in books.states().items()
            }
        self._read_seeds = read_seeds
        self.seeded = read_seeds is None
        self._fetch = fetch
        self._settles: list[Callable[[], None]] = []  # raw records to acknowledge with the next commit
        self._raw_bytes = 0
        self._step = asyncio.Lock()  # one normalize step or tick at a time: each commits its own records

    # -- the raw topic ----------------------------------------------------------------------------

    def normalize_frames(self, inputs: Iterable[RawInput | bytes]) -> None:
        for raw in inputs:
            value, group, settle = raw if isinstance(raw, RawInput) else (raw, f"{self.exchange}:0", None)
            if settle is not None:
                self._settles.append(settle)
            self._raw_bytes += len(value)
            try:
                batch = decode_batch(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._reject("invalid-raw-record", str(exc), "", -1, 0, value)
                continue
            if batch.source == "ws":
                self._live_batch(batch, group)
            else:
                self._rest_batch(batch, group)
        self._carry_out(self.engine.drain())

    def _live_batch(self, batch: RawBatch, group: str) -> None:
        frames = batch.frames
        if not frames:
            return
        connection = batch.connection_id
        flow_meter(self.exchange).normalized(connection, frames[-1].received_at)
        self.engine.frames(
            connection, frames[0].sequence, frames[-1].sequence, frames[0].received_at, frames[-1].received_at
        )
        parse, check, live = self.adapter.parse_frame, self.validator.check, self.engine.live
        for frame in frames:
            items: Sequence[ParsedItem]
            try:
                items = parse(frame.payload, frame.received_at)
            except FrameError as exc:
                self._reject(
                    exc.reason, exc.detail, connection, frame.sequence, frame.received_at, frame.payload
                )
                continue
            for item in items:
                kind = type(item)
                if kind is DepthDiff or kind is DepthBook:
                    self._book_item(item, group, connection, frame)  # type: ignore[arg-type]
                    continue
                if not isinstance(item, MarketRecord):
                    continue
                problem = check(item, True)
                if problem is not None:
                    self._reject(
                        problem.reason, problem.detail, connection, frame.sequence, frame.received_at,
                        frame.payload,
                    )  # fmt: skip
                elif type(item.data) is Trade:
                    origin = _TradeOrigin(connection, frame.sequence, frame.received_at, frame.payload)
                    live(item, origin, group, connection, frame.received_at)
                else:
                    self._send(item)

    def _book_item(self, item: DepthDiff | DepthBook, group: str, connection: str, frame: RawFrame) -> None:
        """An order book item of a live connection: validated, then the engine's books decide."""
        engine = self.engine
        if engine.books is None or (self._book_wanted is not None and not self._book_wanted(item.symbol)):
            return  # Upbit's orderbook frames carry a book for bbo-only symbols too: not kept
        problem = depth_problem(item)
        if problem is not None:
            where = (connection, frame.sequence, frame.received_at, frame.payload)
            self._reject_book(item.symbol, group, problem.reason, problem.detail, where, answer=False)
            return
        origin = _FrameOrigin(connection, frame.sequence, frame.received_at, frame.payload)
        engine.depth(item, origin, group, connection, frame.received_at)

    def _snapshot_answer(self, batch: RawBatch, tag: RestTag, frame: RawFrame, group: str) -> None:
        """A REST order book, in the raw topic in order with the diffs: the engine's books use it."""
        where = (batch.connection_id, frame.sequence, frame.received_at, frame.payload)
        instrument = self.adapter.instruments.get(tag.exchange_symbol)
        try:
            item = self.adapter.parse_depth_snapshot(tag, frame.payload, frame.received_at)
        except FrameError as exc:
            symbol = instrument.symbol if instrument is not None else ""
            self._reject_book(symbol, group, exc.reason, exc.detail, where, answer=True)
            return
        problem = depth_problem(item)
        if problem is not None:
            self._reject_book(item.symbol, group, problem.reason, problem.detail, where, answer=True)
            return
        self.engine.snapshot(item, group, batch.request, frame.received_at)

    def _reject_book(
        self,
        symbol: str,
        group: str,
        reason: str,
        detail: str,
        where: tuple[str, int, int, bytes],
        answer: bool,
    ) -> None:
        self._reject(reason, detail, *where)
        if reason == "crossed-book":
            book_crossed(self.exchange)
        if symbol:
            self.engine.book_invalid(symbol, group, reason, detail, where[2], answer)

    def _rest_batch(self, batch: RawBatch, group: str) -> None:
        tag = parse_source(batch.source)
        for frame in batch.frames:
            if tag is not None and tag.kind == "depth":
                self._snapshot_answer(batch, tag, frame, group)
                continue
            try:
                if tag is None:
                    raise FrameError("unknown-source", batch.source)
                records = self.adapter.parse_rest(tag, frame.payload, frame.received_at)
            except FrameError as exc:
                self._reject(
                    exc.reason,
                    exc.detail,
                    batch.connection_id,
                    frame.sequence,
                    frame.received_at,
                    frame.payload,
                )
                continue
            trades: list[MarketRecord] = []
            for record in records:
                problem = self.validator.check(record, False)  # history may be old, but not invalid
                if problem is not None:
                    where = (batch.connection_id, frame.sequence, frame.received_at, frame.payload)
                    self._reject(problem.reason, problem.detail, *where)
                elif type(record.data) is Trade:
                    trades.append(record)
                else:
                    self._send(record)
            if tag is not None and tag.kind == "trades":
                self._history_answer(batch, tag, trades, group, frame.received_at)

    def _history_answer(
        self, batch: RawBatch, tag: RestTag, trades: list[MarketRecord], group: str, received_at: int
    ) -> None:
        by_symbol: dict[str, list[MarketRecord]] = {}
        asked = self.adapter.instruments.get(tag.exchange_symbol)
        if asked is not None and batch.request is not None:
            # An empty page answers too ("nothing yet": history lags the stream); unanswered, the
            # repair would wait for its answer timeout before asking again.
            by_symbol[asked.symbol] = []
        for record in trades:
            by_symbol.setdefault(record.symbol, []).append(record)
        page_full = len(trades) >= self.adapter.history_page
        for symbol, mine in by_symbol.items():
            self.engine.history(symbol, group, batch.request, mine, page_full, received_at)

    # -- the engine's outputs ---------------------------------------------------------------------

    def _carry_out(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, Publish):
                self._send(output.record)
            elif isinstance(output, Drop):
                self.duplicates += 1
            elif isinstance(output, Reject):
                origin = output.origin
                if origin is None:
                    payload = encode_record(output.record)
                    self._reject(output.reason, output.detail, "", -1, output.record.received_at, payload)
                else:
                    self._reject(output.reason, output.detail, *origin.where())
            elif isinstance(output, FetchTrades | FetchSnapshot):
                if self._fetch is not None:
                    self._fetch(output)
            elif isinstance(output, GapClosed):
                self._gap(output)
            elif isinstance(output, BookResync):
                book_resynced(self.exchange, output.reason)
                if output.reason not in BULK_RESYNCS:
                    log.info("%s %s order book resyncs: %s (%s)", self.exchange, output.symbol, output.reason,
                             output.detail)  # fmt: skip
            elif isinstance(output, RejectFrame):
                if output.reason == "crossed-book":
                    book_crossed(self.exchange)
                if isinstance(output.origin, _FrameOrigin):
                    self._reject(output.reason, output.detail, *output.origin.where())

    def _send(self, record: MarketRecord) -> None:
        topic = market_topic(record.type, self.exchange, record.symbol)
        self.writer.send(topic, record.symbol.encode(), encode_record(record))
        self.records_out += 1
        flow_meter(self.exchange).record(record, topic)

    def _gap(self, gap: GapClosed) -> None:
        gap_closed(self.exchange, gap.data_type, gap.outcome, gap.missing)
        if gap.outcome == "unrecoverable":
            log.warning(
                "%s %s: unrecoverable gap %s..%s (%s missing, %s..%s): %s", self.exchange, gap.symbol,
                gap.first_missing_id, gap.last_missing_id, gap.missing, gap.after_time, gap.before_time,
                gap.reason,
            )  # fmt: skip
        event = gap_event(self.exchange, gap)
        event_emitted(event)
        self.writer.send(EVENTS, self.exchange.encode(), encode_event(event))

    def _reject(
        self, reason: str, detail: str, connection_id: str, sequence: int, received_at: int, payload: bytes
    ) -> None:
        self.dead_lettered += 1
        flow_meter(self.exchange).dead_letter(reason)
        if len(payload) > MAX_DEAD_LETTER_FRAME:
            detail = f"frame of {len(payload)} bytes, first {MAX_DEAD_LETTER_FRAME} kept; {detail}"
            payload = payload[:MAX_DEAD_LETTER_FRAME]
        record = dead_letter(self.exchange, reason, detail, connection_id, sequence, received_at, payload)
        self.writer.send(self.deadletters, self.exchange.encode(), record)

    # -- steps ------------------------------------------------------------------------------------

    async def seed(self) -> None:
        """Read what the market topics already hold before the first step (and after partitions moved)."""
        if not self.seeded and self._read_seeds is not None:
            self.engine.seed(await self._read_seeds(list(self.adapter.by_symbol)))
            self.seeded = True

    def forget(self) -> None:
        """Partitions moved: another worker may publish these symbols now; read the topics again."""
        self.engine.forget()
        self.seeded = self._read_seeds is None

    async def handle(
        self, raw: list[RawInput] | list[bytes], on_acknowledged: Callable[[], None] | None = None
    ) -> None:
        """Normalize a batch of raw records and hand what it made to the writer. Returns before the
        broker acknowledges it when `on_acknowledged` is given (it runs then), else after."""
        await self.seed()
        async with self._step:
            self.normalize_frames(raw)
            await self._commit(on_acknowledged)
        if on_acknowledged is None:
            await self.writer.flush()

    async def tick(self, now: int) -> None:
        """Let the engine's waits run out (history that never came, trades waiting for confirmation)."""
        if self.engine.starting:
            await self.seed()  # a quiet symbol's line starts from what its market topic holds
        async with self._step:
            self.engine.tick(now)
            if self.engine.books is not None and now - self._book_chores_at >= BOOK_CHORES_MS:
                self._book_chores_at = now
                self._book_chores()
            self._carry_out(self.engine.drain())
            await self._commit(None)

    def _book_chores(self) -> None:
        books = self.engine.books
        assert books is not None
        if self._book_wanted is not None:
            books.prune(self._book_wanted)
        progress = books.progress()
        if progress != self._progress_logged and (
            progress["syncing"] or self._progress_logged.get("syncing")
        ):
            log.info(
                "%s order books: %d synced, %d syncing (%d queued for a snapshot, %d asked, %d waiting "
                "after a refusal); %d snapshots asked so far", self.exchange, progress["synced"],
                progress["syncing"], progress["queued"], progress["inFlight"], progress["waiting"],
                books.requests,
            )  # fmt: skip
        self._progress_logged = progress

    # -- order book views (the worker that owns the symbol answers /books) ------------------------

    def book_view(self, symbol: str, levels: int) -> dict[str, Any] | None:
        books = self.engine.books
        return None if books is None else books.view(symbol, levels)

    def book_progress(self) -> dict[str, int] | None:
        books = self.engine.books
        return None if books is None else books.progress()

    # What the source tells the engine between steps; what follows is written with the next commit.

    def stream_down(self, group: str, symbols: list[str], now: int) -> None:
        self.engine.stream_down(group, symbols, now)
        self._carry_out(self.engine.drain())

    def stream_up(self, group: str, symbols: list[str], now: int) -> None:
        self.engine.stream_up(group, symbols, now)
        self._carry_out(self.engine.drain())

    def refused(self, symbol: str, request_id: str, retry_after_ms: int, now: int) -> None:
        self.engine.refused(symbol, request_id, retry_after_ms, now)
        self._carry_out(self.engine.drain())

    async def _commit(self, on_acknowledged: Callable[[], None] | None) -> None:
        flow = flow_meter(self.exchange)
        records, raw_bytes, writer = flow.hand_over(), self._raw_bytes, self.writer
        settles, self._settles, self._raw_bytes = self._settles, [], 0

        def acknowledged(acknowledged_at: AcknowledgedAt) -> None:
            flow.acknowledged(records, raw_bytes, writer.retries, acknowledged_at)
            for settle in settles:
                settle()
            if on_acknowledged is not None:
                on_acknowledged()

        await writer.commit(acknowledged)


def gap_event(exchange: str, gap: GapClosed) -> CollectorEvent:
    """The `collector.events` record of a settled gap."""
    detail: dict[str, Any] = {
        "dataType": gap.data_type,
        "outcome": gap.outcome,
        "unrecoverable": gap.outcome == "unrecoverable",
        "reason": gap.reason,
        "firstMissingId": gap.first_missing_id,
        "lastMissingId": gap.last_missing_id,
        "missing": gap.missing,
        "repaired": gap.repaired,
        "afterTime": gap.after_time,
        "beforeTime": gap.before_time,
        "detectedAt": gap.detected_at,
        "requests": gap.requests,
        "seconds": round((gap.settled_at - gap.detected_at) / 1000, 3),
    }
    if gap.detail:
        detail["detail"] = gap.detail
    return CollectorEvent(
        type="gap", exchange=exchange, time=gap.settled_at, symbol=gap.symbol, detail=detail
    )
