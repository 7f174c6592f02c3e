"""Property tests: structurally mutated frames, the validator against a Decimal oracle, and garbage
interleaved with good frames through the Normalizer.

tests/test_binance_adapter.py already feeds the adapter byte-level mutations and arbitrary bytes; these
tests mutate the JSON structure (drop, retype, nest, add fields) and go on through validation and the
Normalizer.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.normalize import Normalizer
from agents.writer import TopicWriter
from streams.exchanges import adapters
from streams.exchanges.base import FrameError, Instrument
from streams.exchanges.binance import BinanceAdapter
from streams.records import MarketRecord, Trade, decode_record
from streams.validation import Validator
from tests.test_validation import NOW, _recorded_frames, kline, trade
from tests.test_validation_normalizer import TRADES_TOPIC, MemoryTopics, batch, trade_frame

ADAPTER_REASONS = {
    "invalid-json", "schema-mismatch", "unknown-stream", "unknown-event", "unsupported-data-type",
    "unknown-symbol", "symbol-mismatch",
}  # fmt: skip
VALIDATION_REASONS = {
    "invalid-price", "invalid-quantity", "invalid-volume", "implausible-timestamp", "inconsistent-kline",
    "crossed-book", "invalid-trade-id",
}  # fmt: skip
MARKETS = {"NKNUSDT": ("NKN", "USDT"), "BLZETH": ("BLZ", "ETH"), "LRCBTC": ("LRC", "BTC"),
           "RUNEEUR": ("RUNE", "EUR"), "BTCUSDT": ("BTC", "USDT"), "BNBBTC": ("BNB", "BTC")}  # fmt: skip
INSTRUMENTS = [Instrument(f"{b}/{q}", s, b, q) for s, (b, q) in MARKETS.items()]
_RECORDED = _recorded_frames()
# Recorded frames (every kind), documented payloads, and the simulator's trade frame, with receive times.
SAMPLES: list[tuple[int, Any]] = [(at, json.loads(frame)) for at, frame in _RECORDED[::7]] + [
    (NOW, json.loads(trade_frame(5))),
    (1672515782140, {"e": "24hrTicker", "E": 1672515782136, "s": "BNBBTC", "p": "0.0015", "P": "250.00",
                     "c": "0.0025", "b": "0.0024", "B": "10", "a": "0.0026", "A": "100", "o": "0.0010",
                     "h": "0.0025", "l": "0.0010", "v": "10000", "q": "18"}),
    (1672515782140, {"result": None, "id": 1}),
    (1672515782140, {"error": {"code": 2, "msg": "Invalid request"}, "id": 3}),
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


def _mutate(document: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    if not path:
        if action == "nest":
            return _NEST
        if action == "retype":
            return str(document) if not isinstance(document, str) else _number_or_text(document)
        return value
    head, rest = path[0], path[1:]
    if not rest and action == "drop":
        if isinstance(document, dict):
            return {k: v for k, v in document.items() if k != head}
        return document[:head] + document[head + 1 :]
    if not rest and action == "add" and isinstance(document, dict):
        return {**document, f"extra{len(document)}": value}
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[head] = _mutate(document[head], rest, action, value)
    return copy


_NEST = "\x00nest"


def _serialize(document: Any, inner: Any, depth: int) -> bytes:
    """JSON text with the `_NEST` placeholder replaced by `inner` inside `depth` levels of nesting
    (built as text: the json module cannot encode more levels than the recursion limit)."""
    text = json.dumps(inner)
    text = '{"k": ' * depth + text + "}" * depth if depth % 2 == 0 else "[" * depth + text + "]" * depth
    return json.dumps(document).replace(json.dumps(_NEST), text, 1).encode()


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def _number_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return len(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(SAMPLES),
    choice=st.integers(min_value=0),
    action=st.sampled_from(["replace", "drop", "add", "retype", "nest"]),
    value=json_values,
    depth=st.sampled_from([1, 2, 50, 5000]),
)
def test_structurally_mutated_frames_give_only_frame_errors_or_records_the_validator_accepts_or_rejects(
    sample: tuple[int, Any], choice: int, action: str, value: Any, depth: int
) -> None:
    received_at, document = sample
    paths = _paths(document)
    path = paths[choice % len(paths)]
    mutated = _mutate(document, path, action, value)
    payload = _serialize(
        mutated, _at(document, path), depth
    )  # NaN and Infinity tokens included: Binance never sends them
    adapter = BinanceAdapter(INSTRUMENTS)
    validator = Validator("binance", "increasing")
    try:
        items = adapter.parse_frame(payload, received_at)
    except FrameError as error:
        assert error.reason in ADAPTER_REASONS
        return
    for item in items:
        if isinstance(item, MarketRecord):
            problem = validator.check(item)
            assert problem is None or problem.reason in VALIDATION_REASONS


# -- the validator against an independent Decimal oracle ---------------------------------------------------

_PLAIN = re.compile(r"[0-9]*\.?[0-9]*")


def _oracle_positive(text: str) -> bool:
    if not (text.isascii() and _PLAIN.fullmatch(text) and any(c.isdigit() for c in text) and len(text) <= 64):
        return False
    try:
        return Decimal(text) > 0
    except InvalidOperation:
        return False


number_texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="0123456789.-+eE", max_size=12),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.floats().map(repr),
)


@settings(max_examples=500, deadline=None)
@given(price=number_texts, quantity=number_texts)
def test_trade_numbers_accepted_exactly_when_positive_plain_decimals(price: str, quantity: str) -> None:
    problem = Validator("binance", "none").check(trade(price=price, quantity=quantity))
    expected = (
        "invalid-price" if not _oracle_positive(price)
        else "invalid-quantity" if not _oracle_positive(quantity)
        else None
    )  # fmt: skip
    assert (problem.reason if problem else None) == expected


prices = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(10**9), places=12).map(
    lambda d: format(d.normalize(), "f")
)


@settings(max_examples=500, deadline=None)
@given(open_=prices, high=prices, low=prices, close=prices, near=st.booleans())
def test_kline_consistency_matches_decimal_arithmetic(
    open_: str, high: str, low: str, close: str, near: bool
) -> None:
    if near:  # values equal as floats but not as decimals
        high = open_ + "0000000000000000001" if "." in open_ else open_ + ".0000000000000000001"
    record = kline(open=open_, high=high, low=low, close=close)
    o, h, lo, c = map(Decimal, (open_, high, low, close))
    consistent = h >= max(o, c) and lo <= min(o, c)
    problem = Validator("binance", "none").check(record)
    assert (problem is None) == consistent, (problem, open_, high, low, close)
    if problem is not None:
        assert problem.reason == "inconsistent-kline"


@settings(max_examples=300, deadline=None)
@given(
    timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    trade_time=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    received_at=st.integers(min_value=0, max_value=2**62),
    trade_id=st.text(max_size=25) | st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
def test_validator_never_raises_on_any_times_and_ids(
    timestamp: int, trade_time: int, received_at: int, trade_id: str
) -> None:
    validator = Validator("binance", "increasing")
    for _ in range(2):
        record = trade(trade_id=trade_id, timestamp=timestamp, trade_time=trade_time, received_at=received_at)
        problem = validator.check(record)
        assert problem is None or problem.reason in VALIDATION_REASONS


# -- garbage interleaved with good frames through the Normalizer -------------------------------------------

garbage = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.sampled_from([
        b"[" * 50_000, b'{"a":' * 50_000, b"\xff" * 10, b'{"e":"trade"}', b'{"stream":"btcusdt@trade"}',
        trade_frame(1).replace(b'"p":"100.5"', b'"p":"-1"'), b"null", b"1e999999",
    ]),
    st.sampled_from(SAMPLES).map(lambda s: json.dumps(s[1]).encode()[: len(json.dumps(s[1])) // 2]),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    good_count=st.integers(min_value=1, max_value=30),
    junk=st.lists(st.tuples(st.floats(0, 1), garbage), max_size=30),
    cuts=st.lists(st.floats(0, 1), max_size=5),
)
def test_every_good_frame_is_delivered_exactly_once_among_garbage(
    good_count: int, junk: list[tuple[float, bytes]], cuts: list[float]
) -> None:
    good = [(True, trade_frame(1000 + n)) for n in range(good_count)]
    stream = list(good)
    for position, payload in junk:
        stream.insert(int(position * len(stream)), (False, payload))
    # Split into raw batches (each a Kafka record) at random places, sequence numbers running on.
    boundaries = sorted({0, len(stream), *(int(c * len(stream)) for c in cuts)})
    values = [
        batch(*(payload for _, payload in stream[a:b]), first_sequence=a)
        for a, b in itertools.pairwise(boundaries)
        if b > a
    ]
    memory = MemoryTopics()
    normalizer = Normalizer(BinanceAdapter(INSTRUMENTS), TopicWriter(memory.produce, memory.declare))
    asyncio.run(normalizer.handle(values))

    delivered = [decode_record(value) for _, value in memory.topics.get(TRADES_TOPIC, [])]
    assert [r.data.trade_id for r in delivered if isinstance(r.data, Trade)] == [
        str(1000 + n) for n in range(good_count)
    ]
    good_sequences = {n for n, (is_good, _) in enumerate(stream) if is_good}
    letters = memory.dead_letters()
    assert not [d for d in letters if d.sequence in good_sequences], "a good frame was dead-lettered"
    assert len(letters) <= len(junk)
    assert all(t.startswith(("market.", "deadletter.", "collector.events")) for t in memory.topics)


# -- every registered adapter, fed mutated frames of every recorded exchange ----------------------------


def _recorded(name: str, every: int) -> list[bytes]:
    frames = []
    for line in (RECORDED_DIR / name).read_text().splitlines():
        head, _, frame = line.partition(": ")
        if not frame or not head[:1].isdigit():
            continue  # a connection line or a message the client sent
        frames.append(ast.literal_eval(frame) if frame.startswith("b'") else frame.encode())
    return frames[::every]


RECORDED_DIR = Path(__file__).resolve().parent / "fixtures" / "recorded"
EVERY_EXCHANGE_FRAMES = (
    _recorded("BINANCE.ws.1.0", 40) + _recorded("BINANCE_FUTURES.ws.1.0", 60)
    + _recorded("UPBIT.ws.62.0", 20) + _recorded("BITHUMB.ws.1.0", 1)
)  # fmt: skip
FIXTURE_MARKETS = [
    ("NKNUSDT", "NKN", "USDT"), ("SUSHIUSDT", "SUSHI", "USDT"), ("CTKUSDT", "CTK", "USDT"),
    ("KRW-LAMB", "LAMB", "KRW"), ("KRW-WAVES", "WAVES", "KRW"), ("BTC-XTZ", "XTZ", "BTC"),
    ("GOM2_KRW", "GOM2", "KRW"), ("CON_KRW", "CON", "KRW"),
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    exchange=st.sampled_from(sorted(adapters())),
    frame=st.sampled_from(EVERY_EXCHANGE_FRAMES),
    position=st.floats(0, 1),
    cut=st.integers(0, 12),
    insert=st.binary(max_size=8)
    | st.sampled_from([b'"', b"{", b"]", b"null", b"-1", b"1e400", b'"\\ud800"']),
)
def test_every_adapter_raises_only_frame_error_on_any_exchanges_mutated_frames(
    exchange: str, frame: bytes, position: float, cut: int, insert: bytes
) -> None:
    adapter_type = adapters()[exchange]
    adapter = adapter_type([Instrument(f"{b}/{q}", s, b, q) for s, b, q in FIXTURE_MARKETS])
    validator = Validator(exchange, adapter_type.trade_ids)
    at = int(position * len(frame))
    for payload in (frame, frame[:at] + insert + frame[at + cut :]):
        try:
            items = adapter.parse_frame(payload, 1_700_000_000_000)
        except FrameError as error:
            assert error.reason and error.reason == error.reason.strip().lower()
            continue
        for item in items:
            if isinstance(item, MarketRecord):
                problem = validator.check(item)
                assert problem is None or problem.reason in VALIDATION_REASONS
        adapter.control_events(payload)
