"""The continuity engine, without sockets: scripted inputs in, outputs checked.

Each case is a script of what the raw topic would carry (live trades, REST history answers and
refusals, frame batches) and clock ticks; the checks are what got published (in order), rejected,
dropped, asked of REST, and which gaps were reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from streams.continuity import (
    UNCONFIRMED,
    ContinuityEngine,
    Drop,
    FetchTrades,
    GapClosed,
    Publish,
    Reject,
    Seed,
    Settings,
)
from streams.records import MarketRecord, Trade

T0 = 1_700_000_000_000
SYMBOL = "BTC/USDT"
GROUP = "binance:0"


def trade(
    trade_id: int | str, price: str = "100.0", quantity: str = "1", at: int | None = None
) -> MarketRecord:
    time = at if at is not None else T0 + int(str(trade_id)[-6:]) % 1_000_000
    data = Trade(price=price, quantity=quantity, side="buy", trade_id=str(trade_id), trade_time=time)
    return MarketRecord("x", SYMBOL, "trade", time, time, data)


@dataclass
class Run:
    engine: ContinuityEngine
    published: list[str] = field(default_factory=list)
    settled: list[Any] = field(default_factory=list)  # origins of published, rejected and dropped trades
    rejected: list[tuple[str, str]] = field(default_factory=list)
    dropped: int = 0
    requests: list[FetchTrades] = field(default_factory=list)
    gaps: list[GapClosed] = field(default_factory=list)

    def collect(self) -> None:
        for output in self.engine.drain():
            if isinstance(output, Publish):
                assert isinstance(output.record.data, Trade)
                self.published.append(output.record.data.trade_id)
                self.settled += list(output.origins)
            elif isinstance(output, Reject):
                assert isinstance(output.record.data, Trade)
                self.rejected.append((output.record.data.trade_id, output.reason))
                self.settled.append(output.origin)
            elif isinstance(output, Drop):
                self.dropped += 1
                self.settled.append(output.origin)
            elif isinstance(output, FetchTrades):
                self.requests.append(output)
            elif isinstance(output, GapClosed):
                self.gaps.append(output)

    def live(self, record: MarketRecord, now: int | None = None, connection: str = "c1") -> None:
        assert isinstance(record.data, Trade)
        self.engine.live(record, ("origin", record.data.trade_id), GROUP, connection, now or T0)
        self.collect()

    def history(self, records: list[MarketRecord], page_full: bool = False, now: int | None = None) -> None:
        request = self.requests[-1].request_id if self.requests else None
        self.engine.history(SYMBOL, GROUP, request, records, page_full, now or T0)
        self.collect()

    def refuse(self, retry_after_ms: int = 0, now: int | None = None) -> None:
        self.engine.refused(SYMBOL, self.requests[-1].request_id, retry_after_ms, now or T0)
        self.collect()

    def tick(self, now: int) -> None:
        self.engine.tick(now)
        self.collect()


def increasing(last: int | None = 100, **settings: Any) -> Run:
    engine = ContinuityEngine("increasing", settings=Settings(**settings))
    if last is not None:
        engine.seed({SYMBOL: Seed(last_id=last, last_price="100.0", last_time=T0)})
    return Run(engine)


def only_gap(run: Run) -> tuple[str, str, str | None, str | None]:
    [gap] = run.gaps
    return gap.outcome, gap.reason, gap.first_missing_id, gap.last_missing_id


def ids(first: int, last: int) -> list[str]:
    return [str(i) for i in range(first, last + 1)]


# ---- increasing ids (Binance) ---------------------------------------------------------------------


def test_trades_that_follow_on_are_published_at_once_and_cost_no_rest_call() -> None:
    run = increasing()
    for trade_id in range(101, 111):
        run.live(trade(trade_id))
    assert run.published == ids(101, 110)
    assert run.requests == [] and run.gaps == [] and run.rejected == []


def test_a_first_trade_with_nothing_known_before_starts_the_line() -> None:
    run = increasing(last=None)
    run.live(trade(5000))
    run.live(trade(5001))
    assert run.published == ["5000", "5001"] and run.requests == []


@pytest.mark.parametrize(
    "case",
    ["live gap (ids skip on a healthy connection)", "reconnect gap", "restart (seeded from the topic)"],
)
def test_a_gap_is_filled_from_history_before_later_trades_go_out(case: str) -> None:
    run = increasing()
    if case == "reconnect gap":
        run.live(trade(101), connection="old")
        start = 102
    else:
        start = 101
    # the stream skips start..150; 151.. arrive (on a new connection after a reconnect)
    for trade_id in range(151, 156):
        run.live(trade(trade_id), connection="new")
    assert run.published == ids(101, start - 1)  # later trades wait
    assert run.requests[-1].from_id == start
    run.history([trade(i) for i in range(start, 160)])
    assert run.published == ids(101, 155)
    [gap] = run.gaps
    assert (gap.outcome, gap.first_missing_id, gap.last_missing_id, gap.missing) == (
        "repaired", str(start), "150", 151 - start,
    )  # fmt: skip
    run.live(trade(156))
    assert run.published[-1] == "156" and len(run.requests) == 1


def test_a_gap_longer_than_one_history_page_is_read_page_by_page() -> None:
    run = increasing()
    run.live(trade(2600))
    run.history([trade(i) for i in range(101, 1101)], page_full=True)
    assert run.requests[-1].from_id == 1101
    run.history([trade(i) for i in range(1101, 2101)], page_full=True)
    assert run.requests[-1].from_id == 2101
    run.history([trade(i) for i in range(2101, 2605)])
    assert run.published == ids(101, 2600)
    assert [(g.first_missing_id, g.last_missing_id) for g in run.gaps] == [("101", "2599")]


def test_repeats_and_overlaps_are_dropped_not_published_twice() -> None:
    run = increasing()
    for trade_id in (101, 102, 101, 102, 103, 99):
        run.live(trade(trade_id))
    assert run.published == ids(101, 103) and run.dropped == 3


def test_an_id_far_outside_the_sequence_is_held_then_rejected_while_the_stream_goes_on() -> None:
    run = increasing(confirm_ms=5_000)
    run.live(trade(9_000_000_000_425, price="1.00000000"))
    assert run.requests[-1].from_id == 101
    for trade_id in range(101, 104):  # the real stream continues meanwhile, unheld
        run.live(trade(trade_id))
    assert run.published == ids(101, 103)
    run.history([trade(i) for i in range(101, 104)])  # history's newest trade is 103
    run.tick(T0 + 4_000)
    assert run.rejected == []  # history may still catch up
    run.tick(T0 + 6_000)
    assert run.rejected == [("9000000000425", UNCONFIRMED)]
    run.live(trade(104))
    assert run.published == ids(101, 104) and run.gaps == []


def test_a_trade_whose_values_differ_from_history_is_rejected_and_history_published() -> None:
    run = increasing()
    run.live(trade(101, price="1.00000000"))  # a real id, an invented price
    run.history([trade(101, price="100.5")])
    assert run.rejected == [("101", UNCONFIRMED)]
    assert run.published == ["101"]
    run.live(trade(102, price="100.5"))
    assert run.published == ["101", "102"]


def test_a_real_trade_history_lags_behind_is_published_once_history_has_it() -> None:
    run = increasing()
    run.live(trade(105))
    run.history([trade(i) for i in range(101, 104)])  # history has not seen 104 and 105 yet
    assert run.published == [] and run.rejected == []
    run.tick(T0 + 1_000)  # recheck
    assert run.requests[-1].from_id == 104
    run.history([trade(i) for i in range(104, 106)], now=T0 + 1_000)
    assert run.published == ids(101, 105) and run.rejected == []


def test_out_of_order_delivery_is_put_back_in_order() -> None:
    run = increasing()
    run.live(trade(102))
    run.live(trade(101))
    assert run.published == ["101", "102"]


def test_a_refused_request_is_asked_again_after_its_retry_after_and_never_sooner() -> None:
    run = increasing()
    run.live(trade(110))
    run.refuse(retry_after_ms=5_000)
    run.tick(T0 + 4_000)
    assert len(run.requests) == 1
    run.tick(T0 + 5_001)
    assert len(run.requests) == 2 and run.requests[-1].from_id == 101
    run.history([trade(i) for i in range(101, 111)], now=T0 + 5_001)
    assert run.published == ids(101, 110)


def test_refusals_past_the_limit_end_in_an_unrecoverable_gap_of_exact_range() -> None:
    run = increasing(give_up_ms=60_000, corroborate=5)
    for trade_id in range(151, 160):  # a real jump: a long run follows it
        run.live(trade(trade_id))
    now = T0
    while now < T0 + 61_000:
        if run.engine.repairing():
            run.refuse(now=now)
        now += 1_000
        run.tick(now)
    [gap] = run.gaps
    assert (gap.outcome, gap.first_missing_id, gap.last_missing_id, gap.missing) == (
        "unrecoverable", "101", "150", 50,
    )  # fmt: skip
    assert run.published == ids(151, 159)


def test_an_unconfirmed_lone_jump_is_rejected_when_history_cannot_be_read() -> None:
    run = increasing(give_up_ms=10_000, corroborate=5)
    run.live(trade(500))
    run.refuse(now=T0)
    run.tick(T0 + 11_000)
    assert run.rejected == [("500", UNCONFIRMED)]
    assert run.published == [] and run.gaps == []


def test_history_that_no_longer_reaches_back_reports_the_lost_range() -> None:
    run = increasing()
    run.live(trade(5_000))
    run.history([trade(i) for i in range(4_000, 5_001)])  # the oldest history kept starts at 4000
    unrecoverable = [g for g in run.gaps if g.outcome == "unrecoverable"]
    assert [(g.first_missing_id, g.last_missing_id, g.missing) for g in unrecoverable] == [
        ("101", "3999", 3899)
    ]
    assert run.published == ids(4_000, 5_000)


def test_a_lost_answer_is_asked_again() -> None:
    run = increasing(answer_timeout_ms=20_000)
    run.live(trade(110))
    run.tick(T0 + 19_000)
    assert len(run.requests) == 1
    run.tick(T0 + 20_000)
    assert len(run.requests) == 2


def test_a_price_far_from_the_last_needs_history_to_confirm_it() -> None:
    run = increasing()
    run.live(trade(101, price="130"))  # a 30 % move between two trades
    assert run.published == [] and run.requests[-1].from_id == 101
    run.history([trade(101, price="130")])
    assert run.published == ["101"] and run.rejected == []


def test_every_live_trade_is_settled_exactly_once() -> None:
    run = increasing(confirm_ms=1_000)
    script = [101, 102, 9_000_000_000, 103, 103, 110, 111, 104]
    for trade_id in script:
        run.live(trade(trade_id, price="1" if trade_id > 1_000_000 else "100.0"))
    run.history([trade(i) for i in range(104, 112)])
    run.tick(T0 + 2_000)
    origins = [("origin", str(i)) for i in script]
    assert sorted(run.settled) == sorted(origins)


# ---- unique ids with a time position (Upbit, Bithumb) ---------------------------------------------


def upbit_id(at: int, counter: int = 0) -> int:
    return at * 10_000 + counter


def timed(at: int, counter: int = 0, price: str = "100.0") -> MarketRecord:
    return trade(upbit_id(at, counter), price=price, at=at)


def unique(seeded: bool = True, **settings: Any) -> Run:
    engine = ContinuityEngine(
        "unique",
        position=lambda t: int(t.trade_id),
        consistent=lambda t: abs(int(t.trade_id) // 10_000 - t.trade_time) <= 60_000,
        settings=Settings(**settings),
    )
    if seeded:
        last = upbit_id(T0)
        engine.seed(
            {SYMBOL: Seed(last_position=last, last_price="100.0", last_time=T0, recent_ids=(str(last),))}
        )
    return Run(engine)


def test_unique_ids_in_order_are_published_at_once_and_duplicates_dropped() -> None:
    run = unique(seeded=False)
    for at in (T0 + 1, T0 + 2, T0 + 3):
        run.live(timed(at))
    run.live(timed(T0 + 2))
    assert run.published == [str(upbit_id(T0 + i)) for i in (1, 2, 3)] and run.dropped == 1
    assert run.requests == []


def test_after_a_restart_history_since_the_last_published_trade_comes_first() -> None:
    run = unique()
    run.live(timed(T0 + 500), connection="new")
    [request] = run.requests
    assert request.cursor is None  # the newest page
    page = [timed(T0), timed(T0 + 100), timed(T0 + 200), timed(T0 + 500)]
    run.history(page)
    assert run.published == [str(upbit_id(T0 + i)) for i in (100, 200, 500)]
    [gap] = run.gaps
    assert (gap.outcome, gap.missing) == ("repaired", 2)


def test_a_new_connection_pages_back_until_history_reaches_the_last_trade() -> None:
    run = unique()
    run.live(timed(T0 + 1), connection="c1")
    run.history([timed(T0), timed(T0 + 1)])  # the restart repair of c1
    run.live(timed(T0 + 9_000), connection="c2")  # a reconnect: 2..8999 may be missing
    run.history([timed(T0 + 8_000), timed(T0 + 9_000)], page_full=True)
    assert run.requests[-1].cursor == str(upbit_id(T0 + 8_000))
    run.history([timed(T0 + 1), timed(T0 + 4_000)], page_full=True)
    assert run.published[-3:] == [str(upbit_id(T0 + i)) for i in (4_000, 8_000, 9_000)]


def test_an_invented_unique_id_is_rejected_and_the_real_ones_kept() -> None:
    run = unique()
    run.live(timed(T0 + 1), connection="c1")
    run.history([timed(T0), timed(T0 + 1)])
    far = trade(90_000_000_000_000_425, price="1.00000000", at=T0 + 2)  # no time in its id, price 1
    run.live(far, connection="c1")
    run.live(timed(T0 + 3), connection="c1")
    run.history([timed(T0 + 1), timed(T0 + 3)])
    assert run.rejected == [("90000000000000425", UNCONFIRMED)]
    assert run.published[-1] == str(upbit_id(T0 + 3))


def test_a_lower_never_issued_id_is_rejected() -> None:
    run = unique()
    run.live(timed(T0 + 1), connection="c1")
    run.history([timed(T0), timed(T0 + 1)])
    run.live(timed(T0 + 5), connection="c1")
    run.live(timed(T0 + 2, counter=7), connection="c1")  # below the newest, never made
    run.history([timed(T0 + 1), timed(T0 + 5)])
    assert run.rejected == [(str(upbit_id(T0 + 2, 7)), UNCONFIRMED)]


def test_lost_frames_on_a_connection_make_its_symbols_check_history() -> None:
    run = unique()
    run.live(timed(T0 + 1), connection="c1")
    run.history([timed(T0), timed(T0 + 1)])
    requests = len(run.requests)
    run.engine.frames("c1", 0, 9, T0, T0 + 100)
    run.engine.frames("c1", 15, 20, T0 + 200, T0 + 300)  # frames 10..14 never arrived
    run.collect()
    assert len(run.requests) == requests + 1


def test_a_silence_far_longer_than_the_connection_pace_makes_its_symbols_check_history() -> None:
    run = unique()
    run.live(timed(T0 + 1), connection="c1")
    run.history([timed(T0), timed(T0 + 1)])
    requests = len(run.requests)
    for batch in range(20):  # a frame every 10 ms
        run.engine.frames("c1", batch * 10, batch * 10 + 9, T0 + batch * 100, T0 + batch * 100 + 90)
    run.engine.frames("c1", 200, 209, T0 + 2_000 + 10_000, T0 + 12_100)  # then 10 s of nothing
    run.collect()
    assert len(run.requests) == requests + 1


def test_history_that_does_not_reach_back_is_an_unrecoverable_time_window() -> None:
    run = unique(max_pages=2)
    run.live(timed(T0 + 60_000), connection="new")
    run.history([timed(T0 + 50_000), timed(T0 + 60_000)], page_full=True)
    run.history([timed(T0 + 40_000), timed(T0 + 45_000)], page_full=True)  # two pages, still not back
    [gap] = run.gaps
    assert gap.outcome == "unrecoverable" and (gap.after_time, gap.before_time) == (T0, T0 + 40_000)
    assert run.published[-1] == str(upbit_id(T0 + 60_000))


# ---- REST fallback while the stream is down -------------------------------------------------------


def test_while_the_stream_is_down_history_is_polled_and_published_in_order() -> None:
    run = increasing(poll_ms=1_000)
    run.engine.stream_down(GROUP, [SYMBOL], T0)
    run.collect()
    assert run.requests[-1].from_id == 101
    run.history([trade(i) for i in range(101, 105)])
    assert run.published == ids(101, 104)
    run.tick(T0 + 500)
    assert len(run.requests) == 1  # the next poll waits poll_ms
    run.tick(T0 + 1_000)
    assert run.requests[-1].from_id == 105
    run.history([trade(i) for i in range(105, 107)], now=T0 + 1_000)
    run.engine.stream_up(GROUP, [SYMBOL], T0 + 1_500)
    run.collect()
    run.live(trade(106), now=T0 + 1_600)  # the stream's copy of a trade the poll already published
    run.live(trade(107), now=T0 + 1_600)
    assert run.published == ids(101, 107) and run.dropped == 1
    assert only_gap(run) == ("repaired", "stream down", "101", "106")


def test_while_the_stream_is_down_unique_id_history_is_polled_too() -> None:
    run = unique(poll_ms=1_000)
    run.engine.stream_down(GROUP, [SYMBOL], T0)
    run.collect()
    run.history([timed(T0), timed(T0 + 300), timed(T0 + 600)])
    assert run.published == [str(upbit_id(T0 + 300)), str(upbit_id(T0 + 600))]
    run.tick(T0 + 1_000)
    run.history([timed(T0 + 600), timed(T0 + 900)], now=T0 + 1_000)
    assert run.published[-1] == str(upbit_id(T0 + 900))


# ---- a stream that comes up here (start, takeover) on a quiet symbol -------------------------------


def test_a_quiet_symbol_whose_stream_came_up_asks_history_for_what_it_missed() -> None:
    # Another worker published up to 100 and died; trades 101 and 102 were made before this worker
    # subscribed, and the symbol is quiet since: no live trade would ever show the gap.
    run = increasing(quiet_start_ms=10_000)
    run.engine.stream_up(GROUP, [SYMBOL], T0)
    run.tick(T0 + 9_999)
    assert run.requests == []
    run.tick(T0 + 10_000)
    [request] = run.requests
    assert (request.from_id, request.reason) == (101, "quiet start")
    run.history([trade(101), trade(102)], now=T0 + 10_100)
    run.live(trade(102), now=T0 + 10_200)  # the stream's copy, late
    run.live(trade(103), now=T0 + 10_300)
    assert run.published == ids(101, 103) and run.dropped == 1
    assert only_gap(run) == ("repaired", "quiet start", "101", "102")


@pytest.mark.parametrize("seeded", [True, False], ids=["busy symbol", "nothing published before"])
def test_a_symbol_that_trades_or_has_nothing_before_asks_no_history_on_start(seeded: bool) -> None:
    run = increasing(last=100 if seeded else None, quiet_start_ms=10_000)
    run.engine.stream_up(GROUP, [SYMBOL], T0)
    if seeded:
        run.live(trade(101), now=T0 + 2_000)  # follows on: nothing was missed
    run.tick(T0 + 10_000)
    run.tick(T0 + 60_000)
    assert run.requests == [] and run.gaps == []
    assert run.published == (["101"] if seeded else [])


def test_an_empty_answer_to_a_quiet_start_means_nothing_was_missed() -> None:
    run = increasing(quiet_start_ms=10_000)
    run.engine.stream_up(GROUP, [SYMBOL], T0)
    run.tick(T0 + 10_000)
    run.history([], now=T0 + 10_100)
    run.tick(T0 + 60_000)
    assert len(run.requests) == 1 and run.gaps == []
    run.live(trade(101), now=T0 + 60_000)
    assert run.published == ["101"] and len(run.requests) == 1


def test_a_quiet_unique_id_symbol_pages_history_back_to_its_last_trade() -> None:
    run = unique(quiet_start_ms=10_000)
    run.engine.stream_up(GROUP, [SYMBOL], T0 + 1_000)
    run.tick(T0 + 11_000)
    [request] = run.requests
    assert (request.cursor, request.reason) == (None, "quiet start")
    run.history([timed(T0), timed(T0 + 300), timed(T0 + 600)], now=T0 + 11_100)
    assert run.published == [str(upbit_id(T0 + 300)), str(upbit_id(T0 + 600))]
    [gap] = run.gaps
    assert (gap.outcome, gap.reason, gap.missing) == ("repaired", "quiet start", 2)


# ---- audits: where ids cannot show a gap, history is compared routinely ---------------------------


def audited(**settings: Any) -> Run:
    engine = ContinuityEngine(
        "unique",
        position=lambda t: int(t.trade_id),
        consistent=lambda t: True,
        settings=Settings(**settings),
        audits_per_second=1.0,
    )
    return Run(engine)


def test_an_audit_finds_trades_a_healthy_stream_skipped_and_publishes_them_late() -> None:
    run = audited(audit_min_ms=5_000)
    for at in (T0 + 1, T0 + 2, T0 + 5, T0 + 6):  # T0+3 and T0+4 were never delivered
        run.live(timed(at), now=T0)
    run.tick(T0)
    run.tick(T0 + 5_000)  # one audit a second across the exchange, each symbol every 5 s at most
    [request] = run.requests
    assert (request.cursor, request.reason) == (None, "audit")
    run.live(timed(T0 + 7), now=T0 + 5_000)  # trades keep flowing during the audit
    run.history([timed(T0 + i) for i in range(1, 9)], now=T0 + 5_100)
    later = [str(upbit_id(T0 + i)) for i in (3, 4)]
    assert run.published[-2:] == later  # late, but not lost; T0+8 is left to the stream
    assert str(upbit_id(T0 + 8)) not in run.published
    [gap] = run.gaps
    assert (gap.outcome, gap.reason, gap.missing) == ("repaired", "audit", 2)


def test_an_audit_never_republishes_and_never_reaches_before_the_line_began() -> None:
    run = audited()
    for at in (T0 + 10, T0 + 11):
        run.live(timed(at), now=T0)
    run.tick(T0)
    run.tick(T0 + 5_000)
    run.history([timed(T0 + i) for i in range(5, 12)], now=T0 + 5_000)  # history older than the start
    assert run.published == [str(upbit_id(T0 + 10)), str(upbit_id(T0 + 11))] and run.gaps == []


def test_exchanges_whose_ids_count_trades_are_never_audited() -> None:
    engine = ContinuityEngine("increasing", audits_per_second=5.0)
    assert engine.audits_per_second == 0.0
