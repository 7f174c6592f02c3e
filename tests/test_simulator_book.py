"""The simulator's ground-truth books (simulator/book.py), driven tick by tick without sockets."""

from __future__ import annotations

from simulator.book import DepthFeed, DiffEvent, Levels, TruthBook
from simulator.market import Instrument, Market

START = 1_800_000_000.0


def ticks_text(instrument: Instrument, ticks: int) -> str:
    return instrument.price(ticks)


def lots_text(instrument: Instrument, lots: int) -> str:
    return instrument.quantity(lots)


def market(seed: int = 4) -> tuple[Market, DepthFeed]:
    clock = [START]
    venue = Market(["BTC/USDT", "ETH/USDT"], seed=seed, trades_per_second=200, clock=lambda: clock[0])
    names = {"BTC/USDT": "BTC/USDT", "BTCUSDT": "BTC/USDT", "ETH/USDT": "ETH/USDT"}
    feed = DepthFeed(venue, names, ticks_text, lots_text, depth=50)
    feed.book("BTC/USDT")
    return venue, feed


def run(venue: Market, feed: DepthFeed, seconds: float, step: float = 0.01) -> list[int]:
    """Tick the market; returns the tick times."""
    times = []
    now = venue.clock()
    for _ in range(round(seconds / step)):
        now += step
        tick = venue.tick(now)
        feed.advance(tick)
        times.append(tick.time)
    return times


def full(book: TruthBook) -> tuple[Levels, Levels]:
    return book.top(book.depth)


def test_the_top_is_the_quote_and_the_book_never_crosses() -> None:
    venue, feed = market()
    book = feed.book("BTC/USDT")
    now = START
    for _ in range(300):
        now += 0.01
        tick = venue.tick(now)
        feed.advance(tick)
        quote = venue.quote("BTC/USDT")
        bids, asks = book.top(1)
        assert book.update_id == quote.update_id
        assert (bids[0], asks[0]) == ((quote.bid_ticks, quote.bid_lots), (quote.ask_ticks, quote.ask_lots))
        all_bids, all_asks = full(book)
        assert all_bids[0][0] < all_asks[0][0]
        assert len(all_bids) == len(all_asks) == 50
        assert [p for p, _ in all_bids] == sorted((p for p, _ in all_bids), reverse=True)


def test_diff_events_rebuild_the_book_and_chain() -> None:
    venue, feed = market()
    book = feed.book("BTC/USDT")
    feed.open_stream("btcusdt@depth@100ms", "BTC/USDT", 100)
    bids, asks = (dict(side) for side in full(book))
    last_u = book.update_id
    events = 0

    def apply(due: list[DiffEvent]) -> None:
        nonlocal last_u, events
        for event in due:
            assert (event.first_update_id, event.prev_update_id) == (last_u + 1, last_u)
            for side, changes in ((bids, event.bids), (asks, event.asks)):
                for price, lots in changes:
                    if lots:
                        side[price] = lots
                    else:  # it may never have been sent: added and gone again within the event
                        side.pop(price, None)
            last_u = event.last_update_id
            events += 1

    now = START
    for _ in range(300):
        now += 0.01
        tick = venue.tick(now)
        feed.advance(tick)
        apply(list(feed.due_events(tick.time)))
    apply(list(feed.due_events(int(now * 1000) + 1000)))  # what is still pending
    assert events >= 20 and last_u == book.update_id
    assert (sorted(bids.items(), reverse=True), sorted(asks.items())) == full(book)


def test_the_book_as_of_a_remembered_update_id_is_what_it_was() -> None:
    venue, feed = market()
    book = feed.book("BTC/USDT")
    seen = {book.update_id: full(book)}
    now = START
    for _ in range(200):
        now += 0.01
        feed.advance(venue.tick(now))
        seen[book.update_id] = full(book)
    assert len(seen) > 50
    for update_id, state in seen.items():
        assert book.as_of(update_id) == state
    assert book.as_of(book.update_id + 1) is None
    assert book.as_of(min(seen) - 1) is None


def test_many_ids_at_once_are_each_what_one_at_a_time_says() -> None:
    venue, feed = market()
    book = feed.book("BTC/USDT")
    run(venue, feed, 2.0)
    ids = [uid for uid, _ in book.states()] + [book.update_id]
    wanted = [*ids[::7], book.update_id, book.update_id + 1, ids[3]]
    tops = book.as_of_many(wanted, 10)
    assert set(tops) == {uid for uid in wanted if uid in ids}
    for uid, (bids, asks) in tops.items():
        everything = book.as_of(uid)
        assert everything is not None and (bids, asks) == (everything[0][:10], everything[1][:10])
    dialect_ids = [str(uid) for uid in wanted] + ["nonsense"]
    answers = feed.truths("BTCUSDT", dialect_ids, 10)
    assert answers is not None and len(answers) == len(dialect_ids)
    for dialect_id, answer in zip(dialect_ids, answers, strict=True):
        one = feed.truth("BTCUSDT", dialect_id, 10)
        assert one is not None and answer == (None if "error" in one else one)
    assert feed.truths("XRPUSDT", ["1"], 10) is None


def test_books_are_deterministic_and_their_own_per_symbol() -> None:
    first, first_feed = market(seed=9)
    second, second_feed = market(seed=9)
    run(first, first_feed, 1.0)
    run(second, second_feed, 1.0)
    assert full(first_feed.book("BTC/USDT")) == full(second_feed.book("BTC/USDT"))
    assert "ETH/USDT" not in first_feed.books  # made only when something asks for it


def test_skipped_events_and_stale_snapshots() -> None:
    venue, feed = market()
    feed.open_stream("btcusdt@depth@100ms", "BTC/USDT", 100)
    run(venue, feed, 1.0)
    list(feed.due_events(int(venue.clock() * 1000) + 1000))  # whatever is pending goes out now
    delivered_u = feed.streams["btcusdt@depth@100ms"].last_update_id  # the client's last u
    assert feed.skip("BTCUSDT", 1) and not feed.skip("NOPE", 1)
    sent = []
    now = venue.clock()
    while len(sent) < 2:
        now += 0.01
        tick = venue.tick(now)
        feed.advance(tick)
        sent += list(feed.due_events(tick.time))
    assert sent[0].first_update_id > delivered_u + 1  # the skipped event's updates are missing
    assert feed.counts["skippedDiffs"] == 1
    assert sent[1].prev_update_id == sent[0].last_update_id  # after the skipped one, the chain goes on
    book = feed.book("BTC/USDT")
    current = book.update_id
    feed.stale_snapshots, feed.stale_seconds = 1, 0.5
    stale_id, stale_time, _, _ = feed.snapshot_levels("BTC/USDT", 10)
    assert stale_id < current and stale_time <= book.time - 500
    assert feed.snapshot_levels("BTC/USDT", 10)[0] == current  # only `count` snapshots are stale
