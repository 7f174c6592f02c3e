"""The pure order book of streams/book.py: exact keys, levels, bounds, crossing, views and diffs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.book import (
    BookView,
    OrderBook,
    diff_views,
    is_zero,
    price_key,
    snapshot_data,
    update_data,
)
from streams.records import Depth, MarketRecord, decode_record, encode_record


def levels(side: dict[int, tuple[str, str]]) -> list[tuple[str, str]]:
    return list(side.values())


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("0.1", "0.10000000000000001"),  # 0.1 and its float neighbour are different prices
        ("1.01", "1.1"),
        ("9.99999999", "10"),
        ("0.00000001", "0.00000002"),
        ("123456789012345678901234567890", "123456789012345678901234567891"),
        ("5.", "5.000000000000000001"),
        (".5", "0.6"),
    ],
)
def test_price_keys_order_decimals_exactly(smaller: str, larger: str) -> None:
    assert price_key(smaller) < price_key(larger)


@pytest.mark.parametrize(
    ("a", "b"), [("7.611", "7.6110"), ("100", "100.00000000"), ("0.5", ".5"), ("5", "5.")]
)
def test_spellings_of_one_price_share_a_key(a: str, b: str) -> None:
    assert price_key(a) == price_key(b)


@pytest.mark.parametrize(
    "bad", ["", ".", "abc", "1e5", "-1", "+1", "1.2.3", "NaN", "Infinity", " 1", "١٢", "0." + "1" * 19]
)
def test_price_keys_refuse_what_is_not_a_plain_decimal(bad: str) -> None:
    with pytest.raises(ValueError):
        price_key(bad)


@pytest.mark.parametrize(
    ("quantity", "zero"),
    [("0", True), ("0.00000000", True), ("0.", True), ("10", False), ("0.001", False), ("100.0", False)],
)
def test_zero_quantities_remove(quantity: str, zero: bool) -> None:
    assert is_zero(quantity) is zero


@pytest.mark.parametrize("bad", ["-0", "-1", "x", "", "1e3"])
def test_quantities_must_be_plain_decimals(bad: str) -> None:
    with pytest.raises(ValueError):
        is_zero(bad)


# (starting bids, asks), diff (bids, asks), expected (bids, asks) best first.
APPLY_CASES = [
    pytest.param(([("10", "1"), ("9", "2")], [("11", "1")]), ([("9.5", "3")], [("12", "4")]),
                 ([("10", "1"), ("9.5", "3"), ("9", "2")], [("11", "1"), ("12", "4")]), id="insert-in-order"),
    pytest.param(([("10", "1")], [("11", "1")]), ([("10", "5")], [("11", "0.5")]),
                 ([("10", "5")], [("11", "0.5")]), id="replace-quantity"),
    pytest.param(([("10", "1"), ("9", "2")], [("11", "1")]), ([("10", "0")], [("11", "0.000")]),
                 ([("9", "2")], []), id="remove"),
    pytest.param(([("10", "1")], [("11", "1")]), ([("8", "0")], [("13", "0")]),
                 ([("10", "1")], [("11", "1")]), id="remove-absent-is-normal"),
    pytest.param(([("10.0", "1")], [("11", "1")]), ([("10.00", "2")], []),
                 ([("10.00", "2")], [("11", "1")]), id="other-spelling-same-level-latest-text"),
    pytest.param(([("10", "1")], [("11", "1")]), ([("10", "0"), ("10", "7")], []),
                 ([("10", "7")], [("11", "1")]), id="later-level-in-a-diff-wins"),
]  # fmt: skip


@pytest.mark.parametrize(("start", "diff", "expected"), APPLY_CASES)
def test_apply(
    start: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    diff: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    expected: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> None:
    book = OrderBook(10)
    book.replace(*start, update_id=1)
    book.apply(*diff, update_id=2)
    view = book.top(10)
    assert (levels(view.bids), levels(view.asks)) == expected
    assert book.update_id == 2 == view.update_id


def test_a_full_side_drops_its_worst_level_and_forgets_what_lies_past_it() -> None:
    book = OrderBook(3)
    book.replace([("10", "1"), ("9", "1"), ("8", "1")], [("11", "1")], update_id=1)
    assert book.complete == (True, True)
    book.apply([("9.5", "2")], [], update_id=2)  # a fourth bid: 8 no longer fits
    assert levels(book.top(5).bids) == [("10", "1"), ("9.5", "2"), ("9", "1")]
    assert book.complete == (False, True)
    book.apply([("8.5", "1"), ("8", "1"), ("7", "1")], [], update_id=3)  # at or past the dropped 8: unknown
    assert levels(book.top(5).bids) == [("10", "1"), ("9.5", "2"), ("9", "1")]
    book.apply([("10", "0")], [], update_id=4)  # the side shrinks; it cannot know what lies past 9
    assert levels(book.top(5).bids) == [("9.5", "2"), ("9", "1")]
    assert not book.holds(3) and book.holds(2)
    book.apply([("9.7", "4")], [], update_id=5)  # a new level before the limit is known again
    assert levels(book.top(5).bids) == [("9.7", "4"), ("9.5", "2"), ("9", "1")]


@pytest.mark.parametrize(
    ("truncated_at", "complete", "ignored_far_bid"),
    [(None, (True, True), False), (3, (False, True), True), (4, (True, True), False)],
)
def test_a_snapshot_that_fills_its_limit_may_be_cut_short(
    truncated_at: int | None, complete: tuple[bool, bool], ignored_far_bid: bool
) -> None:
    book = OrderBook(100)
    book.replace([("10", "1"), ("9", "1"), ("8", "1")], [("11", "1"), ("12", "1")], 5, truncated_at)
    assert book.complete == complete
    book.apply([("7", "3")], [], update_id=6)
    assert (("7", "3") not in levels(book.top(10).bids)) is ignored_far_bid


def test_a_snapshot_bigger_than_the_book_keeps_the_best_levels() -> None:
    book = OrderBook(2)
    book.replace([("8", "1"), ("10", "1"), ("9", "1")], [("12", "1"), ("11", "1"), ("13", "1")], 7)
    assert levels(book.top(5).bids) == [("10", "1"), ("9", "1")]
    assert levels(book.top(5).asks) == [("11", "1"), ("12", "1")]
    assert book.complete == (False, False) and book.depth == (2, 2)


@pytest.mark.parametrize(
    ("bids", "asks", "crossed"),
    [
        ([("10", "1")], [("11", "1")], False),
        ([("11", "1")], [("11", "1")], True),  # locked counts: no exchange has it
        ([("11.5", "1")], [("11", "1")], True),
        ([("0.30000000000000001", "1")], [("0.3", "1")], True),
        ([], [("11", "1")], False),
        ([("10", "1")], [], False),
    ],
)
def test_crossed(bids: list[tuple[str, str]], asks: list[tuple[str, str]], crossed: bool) -> None:
    book = OrderBook(10)
    book.replace(bids, asks, update_id=1)
    assert book.crossed() is crossed


def test_best_levels_and_an_empty_book() -> None:
    book = OrderBook(5)
    assert book.best_bid() is None and book.best_ask() is None and book.update_id is None
    book.replace([("1", "2"), ("3", "4")], [("5", "6")], update_id=9)
    assert book.best_bid() == ("3", "4") and book.best_ask() == ("5", "6")
    book.clear()
    assert book.depth == (0, 0) and book.update_id is None


def view(update_id: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> BookView:
    book = OrderBook(100)
    book.replace(bids, asks, update_id)
    return book.top(100)


DIFF_CASES = [
    pytest.param([("10", "1"), ("9", "1")], [("10", "1"), ("9", "1")], [], id="unchanged"),
    pytest.param([("10", "1")], [("10", "2")], [("10", "2")], id="changed"),
    pytest.param([("10", "1")], [("10.5", "1"), ("10", "1")], [("10.5", "1")], id="added"),
    pytest.param([("10", "1"), ("9", "1")], [("10", "1")], [("9", "0")], id="removed"),
    pytest.param([("10", "1"), ("9", "1")], [("11", "1"), ("10", "2")],
                 [("11", "1"), ("10", "2"), ("9", "0")], id="best-first"),
]  # fmt: skip


@pytest.mark.parametrize(("before", "after", "changes"), DIFF_CASES)
def test_diff_views(
    before: list[tuple[str, str]], after: list[tuple[str, str]], changes: list[tuple[str, str]]
) -> None:
    assert diff_views(view(1, before, []), view(2, after, [])) == (changes, [])


def test_ask_changes_are_best_first_too() -> None:
    before = view(1, [], [("11", "1"), ("12", "1")])
    after = view(2, [], [("10.5", "2"), ("12", "3")])
    assert diff_views(before, after) == ([], [("10.5", "2"), ("11", "0"), ("12", "3")])


def test_a_level_pushed_out_of_the_view_is_removed_in_the_update() -> None:
    book = OrderBook(10)
    book.replace([("10", "1"), ("9", "1")], [("11", "1")], update_id=1)
    before = book.top(2)
    book.apply([("10.5", "1")], [], update_id=2)  # 9 is still in the book but not in a 2-level view
    data = update_data(before, book.top(2), first_update_id=2)
    assert data.bids == [("10.5", "1"), ("9", "0")] and data.asks == []
    assert (data.first_update_id, data.last_update_id, data.prev_update_id) == ("2", "2", "1")


def test_records_round_trip_and_carry_the_contract_fields() -> None:
    book = OrderBook(10)
    book.replace([("16578.50", "0.0130")], [("16578.60", "1.2")], update_id=159)
    data = snapshot_data(book.top(5), prev_update_id=None)
    record = MarketRecord("binance", "BTC/USDT", "depth", 1672515782136, 1672515782140, data)
    assert decode_record(encode_record(record)) == record
    assert json.loads(encode_record(record))["data"] == {
        "snapshot": True, "firstUpdateId": "159", "lastUpdateId": "159", "prevUpdateId": None,
        "bids": [["16578.50", "0.0130"]], "asks": [["16578.60", "1.2"]]}  # fmt: skip
    assert record.natural_id == "159:snapshot"
    update = MarketRecord("binance", "BTC/USDT", "depth", 1, 2, Depth(False, "160", "172", "159", [], []))
    assert update.natural_id == "172"
    with pytest.raises(ValueError):
        snapshot_data(OrderBook(1).top(1), None)


# -- properties: a bounded book against the whole book, and a consumer rebuilding from records --------

PRICES = st.integers(min_value=1, max_value=60)
QUANTITIES = st.sampled_from(["0", "0.00", "1", "2.5", "3.000", "10"])


def spell(price: int, variant: int) -> str:
    """A price in one of several spellings of the same value (`1.5`, `1.50`, `1.500`)."""
    text = f"{price // 10}.{price % 10}"
    return text + "0" * variant


LEVEL = st.tuples(PRICES, st.integers(0, 2), QUANTITIES)
DIFF = st.tuples(st.lists(LEVEL, max_size=6), st.lists(LEVEL, max_size=6))


def model_apply(model: dict[int, tuple[str, str]], changes: list[tuple[int, int, str]]) -> None:
    for price, variant, quantity in changes:
        if is_zero(quantity):
            model.pop(price, None)
        else:
            model[price] = (spell(price, variant), quantity)


def as_levels(changes: list[tuple[int, int, str]]) -> list[tuple[str, str]]:
    return [(spell(price, variant), quantity) for price, variant, quantity in changes]


def best_first(model: dict[int, tuple[str, str]], descending: bool) -> list[tuple[str, str]]:
    return [model[price] for price in sorted(model, reverse=descending)]


@settings(max_examples=300, deadline=None)
@given(
    snapshot=DIFF,
    limit=st.integers(1, 8),
    capacity=st.integers(1, 8),
    published=st.integers(1, 5),
    diffs=st.lists(DIFF, max_size=25),
)
def test_a_bounded_book_holds_exactly_the_best_known_levels_and_records_rebuild_its_view(
    snapshot: tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]],
    limit: int,
    capacity: int,
    published: int,
    diffs: list[tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]],
) -> None:
    # The exchange's whole book (bids and asks on one price grid: crossing does not matter here).
    whole_bids: dict[int, tuple[str, str]] = {}
    whole_asks: dict[int, tuple[str, str]] = {}
    model_apply(whole_bids, [level for level in snapshot[0] if not is_zero(level[2])])
    model_apply(whole_asks, [level for level in snapshot[1] if not is_zero(level[2])])
    # Its REST snapshot, cut at `limit` levels per side.
    book = OrderBook(capacity)
    book.replace(best_first(whole_bids, True)[:limit], best_first(whole_asks, False)[:limit], 1, limit)
    consumer: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
    first = snapshot_data(book.top(published), None)
    for side in ("bids", "asks"):
        consumer[side] = dict(getattr(first, side))
    previous = book.top(published)
    for update_id, (bids, asks) in enumerate(diffs, start=2):
        model_apply(whole_bids, bids)
        model_apply(whole_asks, asks)
        book.apply(as_levels(bids), as_levels(asks), update_id)
        # The book holds the whole book's best levels, as many as it holds: never a wrong one.
        for whole, held, descending, complete in (
            (whole_bids, book.top(capacity).bids, True, book.complete[0]),
            (whole_asks, book.top(capacity).asks, False, book.complete[1]),
        ):
            expected = best_first(whole, descending)
            assert levels(held) == expected[: len(held)]
            if complete:
                assert len(held) == min(len(expected), capacity)
        # A consumer applying the update records holds exactly the published view.
        current = book.top(published)
        record = update_data(previous, current, update_id)
        assert record.prev_update_id == str(previous.update_id)
        for side, changes in (("bids", record.bids), ("asks", record.asks)):
            for price, quantity in changes:
                if quantity == "0":
                    consumer[side].pop(price)  # only levels it holds are ever removed
                else:
                    same = [p for p in consumer[side] if price_key(p) == price_key(price)]
                    for spelling in same:  # another spelling of the price: the same level
                        del consumer[side][spelling]
                    consumer[side][price] = quantity
        for side, held in (("bids", current.bids), ("asks", current.asks)):
            assert consumer[side] == dict(held.values())
        previous = current
