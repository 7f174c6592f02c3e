"""Validation of order book input (streams/validation.py `depth_problem`) and of depth records."""

from __future__ import annotations

import pytest

from streams.depth import DepthBook, DepthDiff, DepthSnapshot
from streams.records import Depth, MarketRecord
from streams.validation import Validator, depth_problem

NOW = 1_700_000_000_000
Levels = list[tuple[str, str]]


def diff(
    bids: Levels | None = None,
    asks: Levels | None = None,
    first: int = 5,
    last: int = 7,
    prev: int | None = None,
) -> DepthDiff:
    return DepthDiff("BTC/USDT", NOW, NOW, first, last, prev, bids or [], asks or [])


def whole(bids: Levels, asks: Levels, kind: str) -> DepthBook | DepthSnapshot:
    if kind == "book":
        return DepthBook("BTC/KRW", NOW, NOW, 1783657882348968, bids, asks)
    return DepthSnapshot("BTC/USDT", NOW, NOW, 160, 100, bids, asks)


DIFF_CASES = [
    pytest.param(diff([("100.5", "1")], [("100.6", "0")]), None, id="ok-with-removal"),
    pytest.param(diff([("100.5", "0.00000000")]), None, id="zero-spelled-out"),
    pytest.param(diff([("100.5", "-1")]), "invalid-quantity", id="negative-size"),
    pytest.param(diff(asks=[("100.5", "1e3")]), "invalid-quantity", id="exponent-size"),
    pytest.param(diff(asks=[("100.5", "NaN")]), "invalid-quantity", id="nan-size"),
    pytest.param(diff([("abc", "1")]), "invalid-price", id="non-decimal-price"),
    pytest.param(diff([("-100.5", "1")]), "invalid-price", id="negative-price"),
    pytest.param(diff([("0", "1")]), "invalid-price", id="zero-price"),
    pytest.param(diff([("1." + "1" * 19, "1")]), "invalid-price", id="19-decimals"),
    pytest.param(diff([("1" * 65, "1")]), "invalid-price", id="absurdly-long"),
    pytest.param(diff(first=8, last=7), "invalid-update-id", id="first-after-last"),
    pytest.param(diff(first=-1, last=7), "invalid-update-id", id="negative-id"),
    pytest.param(diff(prev=-3), "invalid-update-id", id="negative-previous-id"),
    pytest.param(diff(first=7, last=7, prev=6), None, id="one-update"),
]


@pytest.mark.parametrize(("item", "reason"), DIFF_CASES)
def test_diffs(item: DepthDiff, reason: str | None) -> None:
    problem = depth_problem(item)
    assert (problem.reason if problem else None) == reason


WHOLE_CASES = [
    pytest.param([("100", "1"), ("99", "2")], [("101", "1")], None, id="ok"),
    pytest.param([("100", "1")], [("100", "1")], "crossed-book", id="locked"),
    pytest.param([("99", "1"), ("101", "1")], [("100.5", "1")], "crossed-book", id="crossed-below-the-top"),
    pytest.param([("100", "0")], [("101", "1")], "invalid-quantity", id="zero-in-a-whole-book"),
    pytest.param([("100", "1")], [("101", "-2")], "invalid-quantity", id="negative"),
    pytest.param([("1,5", "1")], [("101", "1")], "invalid-price", id="comma"),
    pytest.param([], [], None, id="empty"),
]


@pytest.mark.parametrize("kind", ["book", "snapshot"])
@pytest.mark.parametrize(("bids", "asks", "reason"), WHOLE_CASES)
def test_whole_books_and_snapshots(bids: Levels, asks: Levels, reason: str | None, kind: str) -> None:
    problem = depth_problem(whole(bids, asks, kind))
    assert (problem.reason if problem else None) == reason


def record(data: Depth, received_at: int = NOW) -> MarketRecord:
    return MarketRecord("binance", "BTC/USDT", "depth", NOW - 3, received_at, data)


RECORD_CASES = [
    pytest.param(Depth(True, "9", "9", None, [("100", "1")], [("101", "1")]), None, id="snapshot"),
    pytest.param(Depth(False, "10", "12", "9", [("100", "0")], []), None, id="update"),
    pytest.param(Depth(True, "9", "9", "8", [("101", "1")], [("100", "1")]), "crossed-book",
                 id="crossed-snapshot"),
    pytest.param(Depth(True, "9", "9", None, [("100", "0")], []), "invalid-quantity", id="zero-in-snapshot"),
    pytest.param(Depth(False, "10", "12", "9", [("x", "0")], []), "invalid-price", id="bad-price"),
    pytest.param(Depth(False, "10", "12", "9", [], [("100", "-0.1")]), "invalid-quantity", id="negative"),
    pytest.param(Depth(False, "13", "12", "9", [], []), "invalid-update-id", id="first-after-last"),
    pytest.param(Depth(False, "1x", "12", "9", [], []), "invalid-update-id", id="not-a-number"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "reason"), RECORD_CASES)
def test_depth_records(data: Depth, reason: str | None) -> None:
    problem = Validator("binance", "increasing").check(record(data))
    assert (problem.reason if problem else None) == reason


def test_depth_record_times_are_checked_like_every_record() -> None:
    data = Depth(False, "10", "12", "9", [], [])
    problem = Validator("binance").check(record(data, received_at=NOW + 3_600_000))
    assert problem is not None and problem.reason == "implausible-timestamp"
