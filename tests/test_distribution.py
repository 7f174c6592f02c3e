"""Live distribution without sockets: filters, client messages, frames, the hub's routing and buffers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import MultiDict

from agents.distribution import CLOSE_TOO_SLOW, Client, Hub, ws_url
from streams.distribution import (
    EVERYTHING,
    MAX_VALUES,
    Filter,
    FilterError,
    RateMeter,
    TopicKey,
    apply_change,
    is_text,
    parse_client_message,
    parse_market_topic,
    parse_query,
    symbol_name,
    symbol_token,
    text_frame,
)

EXCHANGES = ["binance", "binance-futures", "bithumb", "upbit"]


def query(**values: str) -> MultiDict[str]:
    return MultiDict(values)


# ---- topics and symbols ------------------------------------------------------------------------------


def test_market_topics_name_type_exchange_and_symbol() -> None:
    assert parse_market_topic("market.trade.binance-futures.btc-usdt") == TopicKey(
        "trade", "binance-futures", "btc-usdt"
    )
    for other in ("raw.binance", "market.trade.binance", "market..binance.btc-usdt", "collector.events"):
        assert parse_market_topic(other) is None


def test_symbols_are_accepted_in_both_spellings() -> None:
    assert symbol_token("BTC/USDT") == symbol_token("btc-usdt") == "btc-usdt"
    assert symbol_name("btc-krw") == "BTC/KRW"
    for bad in ("BTCUSDT", "BTC/", "BTC/USDT/X", "bt c/usdt", ""):
        with pytest.raises(FilterError, match="not a symbol"):
            symbol_token(bad)


# ---- filters from query parameters -------------------------------------------------------------------


def test_no_query_parameters_mean_the_full_stream() -> None:
    assert parse_query(query(), EXCHANGES) == EVERYTHING
    assert EVERYTHING.matches(TopicKey("depth", "upbit", "btc-krw"))


def test_query_parameters_set_each_dimension() -> None:
    found = parse_query(
        query(exchanges="binance,upbit", symbols="BTC/USDT,krw-btc", types="trade, bbo"), EXCHANGES
    )
    assert found == Filter(
        frozenset({"binance", "upbit"}), frozenset({"btc-usdt", "krw-btc"}), frozenset({"trade", "bbo"})
    )
    assert found.matches(TopicKey("trade", "binance", "btc-usdt"))
    assert not found.matches(TopicKey("kline", "binance", "btc-usdt"))
    assert not found.matches(TopicKey("trade", "bithumb", "btc-usdt"))
    assert not found.matches(TopicKey("trade", "binance", "eth-usdt"))
    assert found.describe() == {
        "exchanges": ["binance", "upbit"],
        "symbols": ["BTC/USDT", "KRW/BTC"],
        "types": ["bbo", "trade"],
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"type": "trade"}, "unknown query parameter 'type'"),
        ({"types": "trades"}, "unknown type 'trades'"),
        ({"types": "kline_1m"}, "every kline interval comes as kline"),
        ({"exchanges": "kraken"}, "unknown exchange 'kraken'"),
        ({"exchanges": "bin ance"}, "not an exchange name"),
        ({"symbols": "BTCUSDT"}, "not a symbol"),
        ({"symbols": ","}, "lists nothing"),
        ({"symbols": ""}, "lists nothing"),
    ],
)
def test_bad_query_parameters_are_refused_with_the_reason(params: dict[str, str], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_query(query(**params), EXCHANGES)


def test_a_repeated_query_parameter_is_refused() -> None:
    with pytest.raises(FilterError, match="given twice"):
        parse_query(MultiDict([("types", "trade"), ("types", "bbo")]), EXCHANGES)


def test_too_many_values_are_refused() -> None:
    many = ",".join(f"A{i}/USDT" for i in range(MAX_VALUES + 1))
    with pytest.raises(FilterError, match=f"at most {MAX_VALUES}"):
        parse_query(query(symbols=many), EXCHANGES)


# ---- client messages ---------------------------------------------------------------------------------


def change(current: Filter, message: dict[str, Any]) -> Filter:
    return apply_change(current, parse_client_message(json.dumps(message), EXCHANGES))


def test_subscribe_narrows_every_value_to_the_list_then_adds() -> None:
    only_btc = change(EVERYTHING, {"op": "subscribe", "symbols": ["BTC/USDT"]})
    assert only_btc == Filter(symbols=frozenset({"btc-usdt"}))
    both = change(only_btc, {"op": "subscribe", "symbols": ["eth-usdt"], "types": ["trade"]})
    assert both == Filter(symbols=frozenset({"btc-usdt", "eth-usdt"}), types=frozenset({"trade"}))
    assert change(both, {"op": "subscribe", "symbols": None}) == Filter(types=frozenset({"trade"}))


def test_unsubscribe_removes_values_and_an_emptied_dimension_matches_nothing() -> None:
    current = Filter(symbols=frozenset({"btc-usdt", "eth-usdt"}))
    fewer = change(current, {"op": "unsubscribe", "symbols": ["ETH/USDT"]})
    assert fewer == Filter(symbols=frozenset({"btc-usdt"}))
    none = change(fewer, {"op": "unsubscribe", "symbols": ["BTC/USDT"]})
    assert not none.matches(TopicKey("trade", "binance", "btc-usdt"))
    assert none.describe()["symbols"] == []


def test_unsubscribing_from_every_value_is_an_error() -> None:
    with pytest.raises(FilterError, match="takes every value"):
        change(EVERYTHING, {"op": "unsubscribe", "types": ["bbo"]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a JSON object"),
        ("[1, 2]", "bad message"),
        ('{"symbols": ["BTC/USDT"]}', "bad message"),
        ('{"op": "subscribe", "symbol": ["BTC/USDT"]}', "bad message"),
        ('{"op": "subscribe", "symbols": "BTC/USDT"}', "bad message"),
        ('{"op": "replace", "symbols": ["BTC/USDT"]}', "unknown op 'replace'"),
        ('{"op": "subscribe"}', "names none of"),
        ('{"op": "subscribe", "types": []}', "lists nothing"),
        ('{"op": "subscribe", "types": ["candles"]}', "unknown type 'candles'"),
        ('{"op": "unsubscribe", "types": null}', "not null"),
        ('{"op": "subscribe", "exchanges": ["ftx"]}', "unknown exchange 'ftx'"),
        ("x" * 70_000, "longer than"),
    ],
)
def test_bad_client_messages_get_the_reason(text: str, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_client_message(text, EXCHANGES)


# ---- frames ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "header"), [(5, b"\x81\x05"), (126, b"\x81\x7e\x00\x7e"), (70_000, None)])
def test_text_frames_carry_the_payload_after_rfc_6455_length_headers(size: int, header: bytes | None) -> None:
    payload = b"a" * size
    frame = text_frame(payload)
    if header is None:
        header = b"\x81\x7f" + size.to_bytes(8, "big")
    assert frame == header + payload


def test_only_utf8_values_go_out_as_text() -> None:
    assert is_text('{"symbol": "BTC/KRW", "note": "원"}'.encode())
    assert not is_text(b"\xff\xfe")


def test_rate_meter_counts_the_last_window() -> None:
    now = [100.0]
    meter = RateMeter(window=10, clock=lambda: now[0])
    meter.add(50)
    now[0] = 105.5
    meter.add(50)
    assert meter.rate() == 10.0
    now[0] = 112.0
    assert meter.rate() == 5.0
    now[0] = 200.0
    assert meter.rate() == 0.0


def test_worker_urls_become_websocket_urls() -> None:
    assert ws_url("http://host:6066", "/ws/exchange") == "ws://host:6066/ws/exchange"
    assert ws_url("https://host/", "/ws/exchange") == "wss://host/ws/exchange"


# ---- the hub -----------------------------------------------------------------------------------------


class Buffer:
    """An in-memory transport: what a client's socket was given, and how much of it is unsent."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.unsent = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data
        self.unsent += len(data)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing

    def messages(self) -> list[Any]:
        found, data = [], bytes(self.written)
        while data:
            assert data[0] == 0x81
            size, start = data[1], 2
            if size == 126:
                size, start = int.from_bytes(data[2:4], "big"), 4
            elif size == 127:
                size, start = int.from_bytes(data[2:10], "big"), 10
            found.append(json.loads(data[start : start + size]))
            data = data[start + size :]
        return found


class Closed:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def __call__(self, code: int, message: str) -> None:
        self.calls.append((code, message))


def connect(
    hub: Hub, client_id: int, subscribe: Filter, limit: int = 1 << 20
) -> tuple[Client, Buffer, Closed]:
    buffer, closed = Buffer(), Closed()
    client = Client(client_id, buffer, limit, closed)
    hub.connect(client)
    hub.set_filter(client, subscribe)
    return client, buffer, closed


def record(topic: str, n: int) -> bytes:
    key = parse_market_topic(topic)
    assert key is not None
    return json.dumps({"exchange": key.exchange, "type": key.type, "n": n}).encode()


BTC_TRADES = "market.trade.binance.btc-usdt"
ETH_TRADES = "market.trade.binance.eth-usdt"
BTC_BBO = "market.bbo.binance.btc-usdt"


def test_each_client_gets_its_reply_first_then_exactly_the_records_its_filter_matches_in_order() -> None:
    hub = Hub()
    hub.learn([BTC_TRADES, ETH_TRADES, BTC_BBO, "collector.events"])
    everything, all_buffer, _ = connect(hub, 1, EVERYTHING)
    btc, btc_buffer, _ = connect(hub, 2, Filter(symbols=frozenset({"btc-usdt"}), types=frozenset({"trade"})))
    assert hub.needed() == {BTC_TRADES, ETH_TRADES, BTC_BBO}

    sent = hub.dispatch(
        {BTC_TRADES: [record(BTC_TRADES, 1), record(BTC_TRADES, 2)], ETH_TRADES: [record(ETH_TRADES, 3)]}
    )
    assert sent == 5
    assert [m.get("n", m.get("op")) for m in all_buffer.messages()] == ["subscribed", 1, 2, 3]
    assert [m.get("n", m.get("op")) for m in btc_buffer.messages()] == ["subscribed", 1, 2]
    assert (everything.sent, btc.sent) == (3, 2)


def test_a_filter_change_takes_effect_between_two_rounds_and_a_gone_client_gets_nothing() -> None:
    hub = Hub()
    hub.learn([BTC_TRADES, BTC_BBO])
    client, buffer, _ = connect(hub, 1, Filter(types=frozenset({"trade"})))
    hub.dispatch({BTC_TRADES: [record(BTC_TRADES, 1)], BTC_BBO: [record(BTC_BBO, 2)]})
    hub.set_filter(client, Filter(types=frozenset({"bbo"})))
    hub.dispatch({BTC_TRADES: [record(BTC_TRADES, 3)], BTC_BBO: [record(BTC_BBO, 4)]})
    hub.disconnect(client, "client")
    hub.dispatch({BTC_BBO: [record(BTC_BBO, 5)]})
    assert [m.get("n", m.get("op")) for m in buffer.messages()] == ["subscribed", 1, "subscribed", 4]
    assert hub.needed() == set()


def test_topics_learned_later_reach_the_clients_that_want_them() -> None:
    hub = Hub()
    _, buffer, _ = connect(hub, 1, Filter(symbols=frozenset({"sol-usdt"})))
    assert hub.needed() == set()
    hub.learn(["market.trade.binance.sol-usdt", BTC_TRADES])
    assert hub.needed() == {"market.trade.binance.sol-usdt"}
    assert hub.needed([Filter(types=frozenset({"trade"}))]) == {"market.trade.binance.sol-usdt", BTC_TRADES}
    hub.dispatch({"market.trade.binance.sol-usdt": [record("market.trade.binance.sol-usdt", 7)]})
    assert buffer.messages()[-1]["n"] == 7


def test_a_client_whose_buffer_would_overflow_is_closed_too_slow_and_the_others_keep_everything() -> None:
    hub = Hub()
    hub.learn([BTC_TRADES])
    slow, slow_buffer, slow_closed = connect(hub, 1, EVERYTHING, limit=64 * 1024)
    fast, fast_buffer, _ = connect(hub, 2, EVERYTHING, limit=64 * 1024)
    for n in range(100):
        hub.dispatch({BTC_TRADES: [record(BTC_TRADES, n) + b" " * 900]})
        fast_buffer.unsent = 0  # the fast client reads everything at once
    assert slow_closed.calls == [(CLOSE_TOO_SLOW, "too slow")]
    assert slow.dropped == "too-slow"
    assert len(slow_buffer.written) <= 64 * 1024  # never more than its buffer
    assert [m["n"] for m in fast_buffer.messages()[1:]] == list(range(100))
    hub.disconnect(slow, "too-slow")
    assert hub.dropped == 1
    assert fast.dropped is None


def test_a_client_that_has_read_everything_takes_a_round_larger_than_its_buffer() -> None:
    hub = Hub()
    hub.learn([BTC_TRADES])
    client, buffer, closed = connect(hub, 1, EVERYTHING, limit=64 * 1024)
    buffer.unsent = 0
    burst = [record(BTC_TRADES, n) + b" " * 900 for n in range(100)]  # ~100 KB in one round
    assert hub.dispatch({BTC_TRADES: burst}) == 100
    assert not closed.calls
    hub.dispatch({BTC_TRADES: [record(BTC_TRADES, 100)]})  # but nothing more while it is unread
    assert closed.calls == [(CLOSE_TOO_SLOW, "too slow")] and client.dropped == "too-slow"
