"""Order books in the continuity engine, without sockets: scripted inputs in, outputs checked.

Each case is what the raw topic would carry for a symbol's book (diffs or whole books from a
connection, REST snapshot answers, lost frames, refusals) and clock ticks; the checks are the depth
records published (rebuilt by a consumer that checks the `prevUpdateId` chain), the snapshot
requests, the resyncs with their reasons and the frames dead-lettered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.continuity import (
    BookResync,
    BookSettings,
    ContinuityEngine,
    FetchSnapshot,
    Publish,
    RejectFrame,
)
from streams.depth import DepthBook, DepthDiff, DepthSettings, DepthSnapshot
from streams.records import Depth, MarketRecord
from tests.depth_consumer import RebuiltBook

T0 = 1_700_000_000_000
SYMBOL = "BTC/USDT"
GROUP = "binance:0"
Levels = list[tuple[str, str]]
BIDS: Levels = [("100", "1"), ("99", "1"), ("98", "1"), ("97", "1"), ("96", "1")]
ASKS: Levels = [("101", "1"), ("102", "1"), ("103", "1"), ("104", "1"), ("105", "1")]


def book_settings(**overrides: Any) -> BookSettings:
    base: dict[str, Any] = {"exchange": "binance", "levels": 3, "capacity": 5, "snapshot_interval_ms": 60_000}
    return BookSettings(**{**base, **overrides})


def diff(
    first: int, last: int, bids: Levels = (), asks: Levels = (), *, pu: int | None = None,  # type: ignore[assignment]
    at: int = T0, symbol: str = SYMBOL,
) -> DepthDiff:  # fmt: skip
    return DepthDiff(symbol, at, at, first, last, pu, list(bids), list(asks))


def snap(last_id: int, bids: Levels = BIDS, asks: Levels = ASKS, *, limit: int | None = 5, at: int = T0,
         symbol: str = SYMBOL) -> DepthSnapshot:  # fmt: skip
    return DepthSnapshot(symbol, at, at, last_id, limit, list(bids), list(asks))


def whole(update_id: int, bids: Levels = BIDS[:3], asks: Levels = ASKS[:3], at: int = T0) -> DepthBook:
    return DepthBook(SYMBOL, at, at, update_id, list(bids), list(asks))


@dataclass
class Run:
    engine: ContinuityEngine
    records: list[MarketRecord] = field(default_factory=list)
    requests: list[FetchSnapshot] = field(default_factory=list)
    resyncs: list[BookResync] = field(default_factory=list)
    rejected: list[RejectFrame] = field(default_factory=list)
    consumers: dict[str, RebuiltBook] = field(default_factory=dict)

    def collect(self) -> None:
        for output in self.engine.drain():
            if isinstance(output, Publish):
                self.records.append(output.record)
                self.consumers.setdefault(output.record.symbol, RebuiltBook()).apply(output.record)
            elif isinstance(output, FetchSnapshot):
                self.requests.append(output)
            elif isinstance(output, BookResync):
                self.resyncs.append(output)
            elif isinstance(output, RejectFrame):
                self.rejected.append(output)
            else:
                raise AssertionError(f"unexpected output {output!r}")

    def feed(self, item: DepthDiff | DepthBook, connection: str = "c1", now: int | None = None) -> None:
        self.engine.depth(
            item, ("origin", connection), GROUP, connection, item.received_at if now is None else now
        )
        self.collect()

    def answer(self, item: DepthSnapshot, request: str | None = "last", now: int | None = None) -> None:
        request_id = self.requests[-1].request_id if request == "last" and self.requests else request
        self.engine.snapshot(item, GROUP, request_id, item.received_at if now is None else now)
        self.collect()

    def refuse(self, symbol: str = SYMBOL, retry_after_ms: int = 0, now: int = T0) -> None:
        request = next(r for r in reversed(self.requests) if r.symbol == symbol)
        self.engine.refused(symbol, request.request_id, retry_after_ms, now)
        self.collect()

    def tick(self, now: int) -> None:
        self.engine.tick(now)
        self.collect()

    def reasons(self) -> list[str]:
        return [r.reason for r in self.resyncs]

    def data(self, index: int = -1) -> Depth:
        data = self.records[index].data
        assert isinstance(data, Depth)
        return data

    def book(self, symbol: str = SYMBOL) -> RebuiltBook:
        return self.consumers[symbol]


def run(**overrides: Any) -> Run:
    return Run(ContinuityEngine("increasing", books=book_settings(**overrides)))


def synced(**overrides: Any) -> Run:
    """A spot book synced at update id 15 from a snapshot at 12 and diffs 11..15."""
    r = run(**overrides)
    r.feed(diff(11, 12, [("100", "2")]))
    r.feed(diff(13, 13, asks=[("101", "3")]))
    r.feed(diff(14, 15, [("99", "0")]))
    r.answer(snap(12))
    return r


# ---- diff books: the documented procedure ---------------------------------------------------------


def test_first_sync_buffers_diffs_asks_once_and_publishes_one_snapshot_at_the_last_diff() -> None:
    r = synced()
    assert [q.symbol for q in r.requests] == [SYMBOL] and r.reasons() == ["start"]
    assert len(r.records) == 1
    data = r.data()
    # 11..12 is in the snapshot (dropped); 13 straddles 12+1; 14..15 follows.
    assert (data.snapshot, data.first_update_id, data.last_update_id, data.prev_update_id) == (
        True,
        "15",
        "15",
        None,
    )
    assert data.bids == [("100", "1"), ("98", "1"), ("97", "1")]
    assert data.asks == [("101", "3"), ("102", "1"), ("103", "1")]


def test_after_the_sync_each_diff_is_an_update_of_the_changed_levels_chained_by_prev_update_id() -> None:
    r = synced()
    r.feed(diff(16, 16, [("100", "5")]))
    r.feed(diff(17, 18, asks=[("101", "0")], bids=[("95", "1")]))  # 95 is past the published levels
    r.feed(diff(19, 19, [("94", "7")]))  # changes nothing in the top 3: no record
    r.feed(diff(20, 20, [("98", "2")]))
    updates = [(d.first_update_id, d.last_update_id, d.prev_update_id, d.bids, d.asks)
               for d in (r.data(i) for i in range(1, len(r.records)))]  # fmt: skip
    assert updates == [
        ("16", "16", "15", [("100", "5")], []),
        ("17", "18", "16", [], [("101", "0"), ("104", "1")]),
        ("19", "20", "18", [("98", "2")], []),
    ]
    assert r.book().top(3)[0] == [
        (Decimal(100), Decimal(5)),
        (Decimal(98), Decimal(2)),
        (Decimal(97), Decimal(1)),
    ]


def test_a_snapshot_older_than_the_buffered_diffs_is_asked_for_again() -> None:
    r = run()
    r.feed(diff(20, 21, [("100", "2")]))
    r.feed(diff(22, 22, [("99", "2")]))
    r.answer(snap(15))  # the first buffered diff starts at 20 > 15 + 1
    assert r.records == [] and len(r.requests) == 2
    assert r.reasons() == ["start", "stale-snapshot"]
    r.answer(snap(21))
    assert r.data().last_update_id == "22" and r.data().snapshot
    assert r.data().bids[:2] == [("100", "1"), ("99", "2")]


def test_a_snapshot_newer_than_every_buffered_diff_waits_for_the_next_diff_to_straddle() -> None:
    r = run()
    r.feed(diff(10, 11))
    r.answer(snap(30))
    assert r.data().last_update_id == "30"
    r.feed(diff(25, 29))  # wholly in the snapshot: ignored
    r.feed(diff(31, 32, [("100", "4")]))
    assert r.data().prev_update_id == "30" and r.data().bids == [("100", "4")]
    r.feed(diff(34, 34))  # 33 missing
    assert r.reasons() == ["start", "sequence-break"]


def test_a_skipped_diff_resyncs_and_nothing_is_published_until_the_new_snapshot() -> None:
    r = synced()
    r.feed(diff(16, 16, [("100", "5")]))
    r.feed(diff(18, 18, [("100", "6")]))  # 17 never came
    r.feed(diff(19, 19, [("99", "3")]))
    assert r.reasons() == ["start", "sequence-break"] and len(r.requests) == 2
    assert [d.last_update_id for d in (r.data(i) for i in range(len(r.records)))] == ["15", "16"]
    r.answer(snap(18, [("100", "6"), *BIDS[1:]]))  # 18 is in it, 19 straddles 18 + 1
    last = r.data()
    assert (last.snapshot, last.last_update_id, last.prev_update_id) == (True, "19", "16")
    assert last.bids[:2] == [("100", "6"), ("99", "3")]


def test_a_break_inside_the_buffered_diffs_waits_for_another_snapshot() -> None:
    r = run()
    r.feed(diff(11, 12))
    r.feed(diff(13, 14))
    r.feed(diff(16, 17))  # 15 missing
    r.answer(snap(12))
    assert r.records == [] and r.reasons() == ["start", "sequence-break"]
    r.answer(snap(16))
    assert r.data().last_update_id == "17"


def test_a_crossed_book_dead_letters_the_diff_and_resyncs() -> None:
    r = synced()
    r.feed(diff(16, 16, [("102", "1")]))  # a bid above the best ask
    assert [(x.reason, x.origin) for x in r.rejected] == [("crossed-book", ("origin", "c1"))]
    assert r.reasons() == ["start", "crossed-book"] and len(r.records) == 1
    r.feed(diff(17, 17))
    r.answer(snap(16))
    assert r.data().snapshot and r.data().prev_update_id == "15" and r.book().crossed == 0


def test_diffs_from_a_new_connection_resync_and_the_old_connection_is_ignored_from_then_on() -> None:
    r = synced()
    r.feed(diff(16, 16, [("100", "5")]), "c2")  # a reconnect or a rollover's new connection
    assert r.reasons() == ["start", "new-connection"]
    r.feed(diff(16, 16, [("100", "9")]), "c1")  # the old connection, still open for a moment
    r.feed(diff(17, 17, [("99", "5")]), "c2")
    r.answer(snap(16, [("100", "5"), *BIDS[1:]]))
    assert r.data().last_update_id == "17" and r.data().bids[:2] == [("100", "5"), ("99", "5")]
    r.feed(diff(18, 18, [("100", "1")]), "c1")
    assert r.data().last_update_id == "17"


def test_lost_raw_frames_of_the_books_connection_resync_it() -> None:
    r = synced()
    r.engine.frames("c1", 0, 9, T0, T0 + 100)
    r.engine.frames("c1", 15, 20, T0 + 200, T0 + 300)  # 10..14 lost
    r.collect()
    assert r.reasons() == ["start", "lost-frames"] and len(r.requests) == 2


def test_an_invalid_item_resyncs_the_book() -> None:
    r = synced()
    r.engine.book_invalid(SYMBOL, GROUP, "invalid-price", "level price '1e5'", T0)
    r.collect()
    assert r.reasons() == ["start", "invalid-item"]


def test_a_book_that_no_longer_knows_its_top_levels_resyncs() -> None:
    r = synced()
    # The snapshot filled its limit of 5: nothing below 96 is known. Removing 100 and 98 leaves 97, 96.
    r.feed(diff(16, 16, [("100", "0"), ("98", "0")]))
    assert r.reasons() == ["start", "book-short"]


def test_a_periodic_snapshot_replaces_an_update_when_due_and_quiet_books_get_one_from_the_clock() -> None:
    r = synced(snapshot_interval_ms=10_000, quiet_grace_ms=2_000)
    r.feed(diff(16, 16, [("100", "5")], at=T0 + 5_000))
    r.feed(diff(17, 17, [("100", "6")], at=T0 + 10_000))
    assert [d.snapshot for d in (r.data(i) for i in range(len(r.records)))] == [True, False, True]
    assert r.data().prev_update_id == "16"
    r.tick(T0 + 21_000)  # 11 s since the snapshot but within the grace of it: not yet
    assert len(r.records) == 3
    r.tick(T0 + 22_000)
    assert len(r.records) == 4 and r.data().snapshot and r.data().last_update_id == "17"
    assert r.data().prev_update_id == "17"


# ---- USD-M: `pu` chaining ----------------------------------------------------------------------------


def test_usdm_diffs_chain_by_pu_and_the_first_straddles_the_snapshot() -> None:
    r = run()
    r.feed(diff(10, 12, pu=9))
    r.feed(diff(13, 15, [("100", "2")], pu=12))
    r.feed(diff(16, 18, [("99", "2")], pu=15))
    r.answer(snap(14))  # 10..12 dropped (u < 14); 13..15 straddles 14
    assert r.data().last_update_id == "18" and r.data().bids[:2] == [("100", "2"), ("99", "2")]
    r.feed(diff(20, 21, [("98", "2")], pu=18))  # U need not be previous u + 1
    assert r.data().prev_update_id == "18" and r.data().first_update_id == "20"
    r.feed(diff(24, 25, pu=23))
    assert r.reasons() == ["start", "sequence-break"]


def test_usdm_keeps_a_diff_ending_at_the_snapshot_id() -> None:
    r = run()
    r.feed(diff(13, 15, [("100", "2")], pu=12))
    r.feed(diff(16, 18, pu=15))
    r.answer(snap(15))
    assert r.data().last_update_id == "18" and r.reasons() == ["start"]


def test_usdm_stale_snapshot() -> None:
    r = run()
    r.feed(diff(20, 22, pu=19))
    r.answer(snap(19))  # U 20 > 19: the snapshot is older than the diffs
    assert r.reasons() == ["start", "stale-snapshot"]


# ---- whole books (Upbit, Bithumb) -----------------------------------------------------------------


def test_whole_books_are_snapshots_and_repeats_or_older_books_are_dropped() -> None:
    r = run(whole_books=True, exchange="upbit")
    r.feed(whole(1_000))
    r.feed(whole(1_000, [("100", "9")]))  # a repeat of the same id
    r.feed(whole(999))  # older
    r.feed(whole(1_005, [("100", "2")]), "c2")  # a new connection's first book
    assert [
        (d.snapshot, d.last_update_id, d.prev_update_id) for d in (r.data(i) for i in range(len(r.records)))
    ] == [
        (True, "1000", None),
        (True, "1005", "1000"),
    ]
    assert r.requests == [] and r.resyncs == []  # nothing to ask for: every message is the whole book


def test_a_crossed_whole_book_is_dead_lettered_and_the_book_shows_syncing_until_the_next() -> None:
    r = run(whole_books=True, exchange="upbit")
    r.feed(whole(1))
    r.feed(whole(2, [("101", "1")]))
    assert [x.reason for x in r.rejected] == ["crossed-book"] and r.reasons() == ["crossed-book"]
    books = r.engine.books
    assert books is not None and books.states() == {SYMBOL: ("syncing", T0)}
    r.feed(whole(3))
    assert books.states() == {SYMBOL: ("synced", T0)} and r.data().prev_update_id == "1"


# ---- the snapshot queue: staggered, within the budget ---------------------------------------------


def symbols(count: int) -> list[str]:
    return [f"S{index}/USDT" for index in range(count)]


def test_snapshot_requests_are_staggered_and_released_as_answers_come_back() -> None:
    r = run(max_in_flight=2)
    names = symbols(10)
    for name in names:
        r.feed(diff(5, 5, symbol=name))
    assert [q.symbol for q in r.requests] == names[:2]
    books = r.engine.books
    assert books is not None
    assert books.progress() == {"synced": 0, "syncing": 10, "queued": 8, "inFlight": 2, "waiting": 0}
    r.answer(snap(4, symbol=names[0]), r.requests[0].request_id)
    assert [q.symbol for q in r.requests] == names[:3]
    for index in range(1, 10):
        r.answer(snap(4, symbol=names[index]), r.requests[index].request_id)
    assert [q.symbol for q in r.requests] == names
    assert books.progress()["synced"] == 10


def test_a_refused_snapshot_request_is_asked_again_after_a_pause_and_frees_its_slot() -> None:
    r = run(max_in_flight=1, retry_first_ms=1_000)
    r.feed(diff(5, 5, symbol="A/USDT"))
    r.feed(diff(5, 5, symbol="B/USDT"))
    r.refuse("A/USDT", retry_after_ms=0, now=T0)
    assert [q.symbol for q in r.requests] == ["A/USDT", "B/USDT"]
    r.answer(snap(4, symbol="B/USDT"), r.requests[1].request_id)
    r.tick(T0 + 999)
    assert len(r.requests) == 2
    r.tick(T0 + 1_000)
    assert [q.symbol for q in r.requests] == ["A/USDT", "B/USDT", "A/USDT"]


def test_a_retry_after_is_honoured() -> None:
    r = run(retry_first_ms=1_000)
    r.feed(diff(5, 5))
    r.refuse(retry_after_ms=30_000)
    r.tick(T0 + 29_999)
    assert len(r.requests) == 1
    r.tick(T0 + 30_000)
    assert len(r.requests) == 2


def test_an_unanswered_snapshot_request_is_asked_again() -> None:
    r = run(answer_timeout_ms=90_000, retry_first_ms=1_000)
    r.feed(diff(5, 5))
    r.tick(T0 + 89_999)
    assert len(r.requests) == 1
    r.tick(T0 + 90_000)
    r.tick(T0 + 91_000)
    assert len(r.requests) == 2


def test_a_book_waiting_in_the_queue_keeps_only_its_latest_diffs() -> None:
    r = run(max_in_flight=1, queued_diffs=3)
    r.feed(diff(5, 5, symbol="A/USDT"))
    for update_id in range(10, 20):
        r.feed(diff(update_id, update_id, symbol="B/USDT"))
    books = r.engine.books
    assert books is not None
    buffered = books.lines["B/USDT"].buffer  # type: ignore[union-attr]
    assert [d.first_update_id for d, _ in buffered] == [17, 18, 19]
    r.answer(snap(4, symbol="A/USDT"), r.requests[0].request_id)  # B's request goes out now
    r.answer(snap(17, symbol="B/USDT"), r.requests[1].request_id)
    assert r.records[-1].symbol == "B/USDT" and r.data().last_update_id == "19"


def test_an_answer_is_used_whichever_request_it_answers_so_a_replay_decides_the_same() -> None:
    script: list[tuple[str, Any]] = [
        ("diff", diff(11, 12)),
        ("diff", diff(13, 14, [("100", "3")])),
        ("answer", snap(20)),  # stale: asked again
        ("diff", diff(15, 21, [("99", "3")])),
        ("answer", snap(20)),
        ("diff", diff(22, 22, [("98", "3")])),
        ("diff", diff(24, 24)),  # break
        ("answer", snap(23)),
        ("diff", diff(25, 25, [("100", "8")])),
    ]

    def replay(request_ids: str) -> list[MarketRecord]:
        r = run()
        for kind, item in script:
            if kind == "diff":
                r.feed(item)
            else:
                r.answer(item, request_ids)
        return r.records

    live = replay("last")
    assert live == replay("another-run-s-id") and len(live) >= 3


def test_forgetting_the_books_starts_them_over_as_a_rebalance() -> None:
    r = synced()
    r.engine.forget()
    r.feed(diff(16, 16))
    assert r.reasons() == ["start", "rebalance"] and len(r.requests) == 2


def test_books_of_symbols_no_longer_subscribed_are_dropped() -> None:
    r = synced()
    books = r.engine.books
    assert books is not None
    books.prune(lambda symbol: symbol != SYMBOL)
    assert books.states() == {}


def test_views_show_the_state_the_top_levels_and_the_age() -> None:
    r = synced()
    books = r.engine.books
    assert books is not None
    view = books.view(SYMBOL, 2)
    assert view is not None
    assert (view["state"], view["updateId"], view["bids"]) == ("synced", "15", [("100", "1"), ("98", "1")])
    assert list(books.ages(T0 + 1_500)) == [(SYMBOL, "synced", 1.5)]
    assert books.view("ETH/USDT", 2) is None


def test_book_settings_from_an_exchange_s_depth_settings() -> None:
    made = BookSettings.of("binance", DepthSettings(20, "100ms", 60.0, 100), whole_books=False)
    assert (made.levels, made.capacity, made.snapshot_interval_ms, made.whole_books) == (
        20,
        100,
        60_000,
        False,
    )


# ---- the consumer's view: a rebuilt book is the exchange's, whatever breaks ----------------------


class Truth:
    """An exchange's book evolving one update id at a time, never crossed, deeper than the levels kept."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bids = {1000 - i: 1 + rng.randrange(9) for i in range(30)}
        self.asks = {1001 + i: 1 + rng.randrange(9) for i in range(30)}
        self.update_id = 100
        self.states = {self.update_id: (dict(self.bids), dict(self.asks))}

    def step(self) -> dict[tuple[bool, int], int]:
        """One update id: returns the levels it changed (price → quantity, 0 removed)."""
        rng, changes = self.rng, {}
        for _ in range(1 + rng.randrange(3)):
            is_bid = rng.random() < 0.5
            side = self.bids if is_bid else self.asks
            best_bid, best_ask = max(self.bids), min(self.asks)
            action = rng.randrange(4)
            if action == 0 and len(side) > 12:  # a level near the top goes
                price = sorted(side, reverse=is_bid)[rng.randrange(4)]
                del side[price]
                changes[(is_bid, price)] = 0
            elif action == 1:  # a new level inside the spread or near the top
                price = best_bid + 1 if is_bid else best_ask - 1
                if best_bid < price < best_ask and price not in side:
                    side[price] = 1 + rng.randrange(9)
                    changes[(is_bid, price)] = side[price]
            else:
                price = sorted(side, reverse=is_bid)[rng.randrange(min(8, len(side)))]
                side[price] = 1 + rng.randrange(9)
                changes[(is_bid, price)] = side[price]
        self.update_id += 1
        self.states[self.update_id] = (dict(self.bids), dict(self.asks))
        return changes

    def snapshot(self, update_id: int, limit: int) -> DepthSnapshot:
        bids, asks = self.states[update_id]
        top_bids = [(str(p), str(bids[p])) for p in sorted(bids, reverse=True)[:limit]]
        top_asks = [(str(p), str(asks[p])) for p in sorted(asks)[:limit]]
        return DepthSnapshot(SYMBOL, T0, T0, update_id, limit, top_bids, top_asks)

    def top(self, update_id: int, levels: int) -> tuple[list[tuple[Decimal, Decimal]], ...]:
        bids, asks = self.states[update_id]
        return (
            [(Decimal(p), Decimal(bids[p])) for p in sorted(bids, reverse=True)[:levels]],
            [(Decimal(p), Decimal(asks[p])) for p in sorted(asks)[:levels]],
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), chained=st.booleans())
def test_a_consumer_rebuilds_the_exchange_s_book_through_skips_stale_snapshots_and_reconnects(
    seed: int, chained: bool
) -> None:
    rng = random.Random(seed)
    truth = Truth(rng)
    r = run(levels=5, capacity=15, snapshot_interval_ms=2_000, max_in_flight=1)
    connection, previous_u, now = "c1", truth.update_id, T0
    answer_in: int | None = None  # events until the pending snapshot request is answered
    stale_next = False
    for _ in range(150):
        now += 100
        first = truth.update_id + 1
        changes: dict[tuple[bool, int], int] = {}
        for _ in range(1 + rng.randrange(3)):
            changes.update(truth.step())
        fault = rng.random()
        if fault < 0.04:
            previous_u = truth.update_id  # the event is skipped on the connection
        else:
            if fault < 0.07:
                connection = f"c{rng.randrange(1_000)}"
            bids = [(str(p), str(q)) for (is_bid, p), q in changes.items() if is_bid]
            asks = [(str(p), str(q)) for (is_bid, p), q in changes.items() if not is_bid]
            item = DepthDiff(
                SYMBOL, now, now, first, truth.update_id, previous_u if chained else None, bids, asks
            )
            previous_u = truth.update_id
            r.feed(item, connection)
        stale_next = stale_next or fault > 0.97
        if answer_in is None and len(r.requests) > 0 and r.engine.books is not None:
            if r.engine.books.in_flight:
                answer_in = rng.randrange(4)
        elif answer_in is not None:
            answer_in -= 1
            if answer_in <= 0:
                answer_in = None
                at = truth.update_id - (rng.randrange(5, 12) if stale_next else 0)
                stale_next = False
                r.answer(truth.snapshot(max(at, 100), 15))
        r.tick(now)
    consumer = r.consumers.get(SYMBOL)
    if consumer is None:
        return
    replay = RebuiltBook()
    for record in r.records:
        replay.apply(record)  # raises on a broken chain
        data = record.data
        assert isinstance(data, Depth)
        assert replay.top(5) == truth.top(int(data.last_update_id), 5), (seed, data)
    assert replay.crossed == 0 and consumer.snapshots >= 1
