"""The coin, connector and collector state machines (tables/state.py), driven by events and flow summaries."""

from __future__ import annotations

from typing import Any

import pytest

from streams.events import CollectorEvent
from streams.exchanges.base import DataType, Instrument
from streams.exchanges.binance import BinanceAdapter
from tables.records import BookFlow, CoinFlow, FlowSummary
from tables.state import (
    Changes,
    Row,
    Tables,
    apply_event,
    apply_flow,
    coin_key,
    connector_name,
    stream_index,
)
from tables.summary import collector_overview

CONNECTION = "binance-0-1700000000000-1"


class Rows:
    """The three tables as dicts; `play` applies events and summaries in offset order, like the agents."""

    def __init__(self) -> None:
        self.coins: dict[str, Row] = {}
        self.connectors: dict[str, Row] = {}
        self.collectors: dict[str, Row] = {}
        self.offsets = {"events": 0, "flow": 0}

    @property
    def tables(self) -> Tables:
        return Tables(
            coin=self.coins.get,
            connector=self.connectors.get,
            collector=self.collectors.get,
            connectors_of=lambda exchange: [r for r in self.connectors.values() if r["exchange"] == exchange],
        )

    def write(self, changes: Changes) -> None:
        self.coins.update(changes.coins)
        self.connectors.update(changes.connectors)
        self.collectors.update(changes.collectors)

    def event(self, kind: str, time: int, offset: int | None = None, **fields: Any) -> Changes:
        if offset is None:
            offset = self.offsets["events"]
            self.offsets["events"] += 1
        event = CollectorEvent(type=kind, exchange="binance", time=time, **fields)
        changes = apply_event(event, offset, self.tables, resolve_stream=STREAMS.get)
        self.write(changes)
        return changes

    def flow(self, summary: FlowSummary, offset: int | None = None) -> Changes:
        if offset is None:
            offset = self.offsets["flow"]
            self.offsets["flow"] += 1
        changes = apply_flow(summary, offset, self.tables)
        self.write(changes)
        return changes


STREAMS = {name: "BTC/USDT" for name in ("btcusdt@trade", "btcusdt@bbo", "btcusdt@ticker")} | {
    "ethusdt@trade": "ETH/USDT"
}


def summary(started: int, ended: int, worker: str = "w1", **coins: dict[str, int]) -> FlowSummary:
    return FlowSummary(
        exchange="binance",
        worker=worker,
        started_at=started,
        ended_at=ended,
        coins={
            symbol.replace("_", "/"): CoinFlow(
                records=counts, last_received_at=ended - 10, last_event_at=ended - 12
            )
            for symbol, counts in coins.items()
        },
        dead_letters={"schema-mismatch": 2},
        raw_bytes=4000,
        latency={"exchange_to_receive": [3, 1, 0]},
        process={"cpuPercent": 12.5, "rssBytes": 1e8},
    )


@pytest.mark.parametrize(
    ("connection_id", "detail", "expected"),
    [
        ("binance-0-1700000000000-1", {}, "binance-0"),
        ("binance-futures-3-1700000000000-12", {}, "binance-futures-3"),
        ("odd-id", {}, "odd-id"),
        (None, {"connector": "upbit-1"}, "upbit-1"),
        (None, {}, None),
    ],
)
def test_connector_name_comes_from_detail_or_connection_id(connection_id, detail, expected) -> None:
    event = CollectorEvent(
        type="connected", exchange="binance", time=1, connection_id=connection_id, detail=detail
    )
    assert connector_name(event) == expected


def test_connector_goes_through_its_states_and_counts_success_rates() -> None:
    rows = Rows()
    rows.event("connecting", 100, connection_id=CONNECTION)
    assert rows.connectors["binance-0"]["state"] == "connecting"
    rows.event("connected", 200, connection_id=CONNECTION, detail={"url": "ws://x"})
    row = rows.connectors["binance-0"]
    assert (row["state"], row["since"], row["connects"], row["open"]) == ("connected", 200, 1, True)
    assert rows.collectors["binance"]["state"] == "running"

    rows.event("subscribe-requested", 210, connection_id=CONNECTION, detail={"streams": ["btcusdt@trade"]})
    assert rows.connectors["binance-0"]["state"] == "subscription-requesting"
    assert rows.coins[coin_key("binance", "BTC/USDT")]["state"] == "requested"
    rows.event("subscribed", 220, connection_id=CONNECTION, detail={"streams": 1, "symbols": ["BTC/USDT"]})
    row = rows.connectors["binance-0"]
    assert (row["state"], row["subscribeOk"], row["streamsSubscribed"], row["coins"]) == (
        "connected", 1, 1, ["BTC/USDT"],
    )  # fmt: skip
    assert rows.coins["binance:BTC/USDT"]["state"] == "subscribed"
    assert rows.coins["binance:BTC/USDT"]["connector"] == "binance-0"

    rows.event("stale", 300, connection_id=CONNECTION, detail={"silentFor": 60})
    assert rows.connectors["binance-0"]["state"] == "failed"
    rows.event("disconnected", 301, connection_id=CONNECTION, detail={"reason": "TimeoutError"})
    row = rows.connectors["binance-0"]
    assert (row["state"], row["drops"], row["connectFailures"], row["open"]) == ("recovering", 1, 0, False)
    assert rows.collectors["binance"]["state"] == "stopped"
    # A reconnect attempt that fails before the connection opens is a connect failure, not a drop.
    rows.event("disconnected", 305, detail={"connector": "binance-0", "reason": "refused"})
    assert (rows.connectors["binance-0"]["drops"], rows.connectors["binance-0"]["connectFailures"]) == (1, 1)
    assert rows.connectors["binance-0"]["lastError"] == "refused"

    rows.event("connected", 400, connection_id="binance-0-1700000000400-2")
    row = rows.connectors["binance-0"]
    assert (row["state"], row["connects"], row["connectionId"], row["lastError"]) == (
        "connected", 2, "binance-0-1700000000400-2", None,
    )  # fmt: skip
    assert rows.collectors["binance"]["state"] == "running"
    assert rows.collectors["binance"]["events"] == {
        "connecting": 1, "connected": 2, "subscribe-requested": 1, "subscribed": 1, "stale": 1,
        "disconnected": 2,
    }  # fmt: skip


def test_a_recovery_counts_as_successful_when_the_connector_connects_again() -> None:
    rows = Rows()
    rows.event("connected", 100, connection_id=CONNECTION)
    rows.event("disconnected", 110, connection_id=CONNECTION)
    rows.event(
        "recover-requested", 200, connection_id=CONNECTION, detail={"connector": "binance-0", "attempt": 1}
    )
    rows.event(
        "recover-requested", 300, connection_id=CONNECTION, detail={"connector": "binance-0", "attempt": 2}
    )
    row = rows.connectors["binance-0"]
    assert (row["state"], row["recoveryRequests"], row["recoveryAttempts"], row["recoveryPending"]) == (
        "recovering", 2, 2, True,
    )  # fmt: skip
    assert row["lastRecoveryRequestAt"] == 300
    rows.event("connected", 350, connection_id="binance-0-1700000000350-2")
    row = rows.connectors["binance-0"]
    assert (row["recoveries"], row["recoveryAttempts"], row["recoveryPending"]) == (1, 0, False)
    rows.event("recovery-failed", 400, detail={"connector": "binance-0", "reason": "gave up"})
    assert rows.connectors["binance-0"]["state"] == "failed"
    assert rows.connectors["binance-0"]["lastError"] == "gave up"


def test_replayed_events_change_nothing() -> None:
    rows = Rows()
    rows.event("connected", 100, offset=0, connection_id=CONNECTION)
    rows.event("subscribe-failed", 110, offset=1, connection_id=CONNECTION,
               detail={"code": -1, "message": "bad stream", "streams": ["btcusdt@trade"]})  # fmt: skip
    before = (
        {k: dict(v) for k, v in rows.connectors.items()},
        {k: dict(v) for k, v in rows.coins.items()},
        {k: dict(v) for k, v in rows.collectors.items()},
    )
    # A rebalance replays both events: nothing may be counted twice.
    assert not rows.event("connected", 100, offset=0, connection_id=CONNECTION)
    failure = {"code": -1, "message": "bad stream", "streams": ["btcusdt@trade"]}
    assert not rows.event("subscribe-failed", 110, offset=1, connection_id=CONNECTION, detail=failure)
    assert (rows.connectors, rows.coins, rows.collectors) == before
    assert rows.connectors["binance-0"]["connects"] == 1
    assert rows.connectors["binance-0"]["subscribeFailed"] == 1
    coin = rows.coins["binance:BTC/USDT"]
    assert (coin["state"], coin["subscribeFailures"], coin["lastError"]) == ("stopped", 1, "bad stream")


def test_unknown_symbols_stop_their_coins_with_a_reason() -> None:
    rows = Rows()
    changes = rows.event("unknown-symbols", 100, detail={"symbols": ["FOO/USDT", "BAR/USDT"]})
    assert not changes.connectors
    assert {row["state"] for row in rows.coins.values()} == {"stopped"}
    assert set(rows.coins) == {"binance:FOO/USDT", "binance:BAR/USDT"}
    assert rows.coins["binance:FOO/USDT"]["lastError"] == "the exchange does not list this symbol"


def test_unsubscribe_stops_a_coin_and_removes_it_from_its_connector() -> None:
    rows = Rows()
    rows.event("subscribed", 100, connection_id=CONNECTION, detail={"symbols": ["BTC/USDT", "ETH/USDT"]})
    rows.event("unsubscribed", 200, connection_id=CONNECTION, detail={"symbols": ["ETH/USDT"]})
    assert rows.coins["binance:ETH/USDT"]["state"] == "stopped"
    assert rows.coins["binance:BTC/USDT"]["state"] == "subscribed"
    assert rows.connectors["binance-0"]["coins"] == ["BTC/USDT"]


def test_flow_summaries_fill_coin_counts_rates_and_the_collector() -> None:
    rows = Rows()
    rows.flow(summary(0, 2000, BTC_USDT={"trade": 100, "bbo": 60}, ETH_USDT={"trade": 20}))
    btc = rows.coins["binance:BTC/USDT"]
    assert btc["state"] == "subscribed"  # data flowing proves the subscription
    assert btc["records"] == {"trade": 100, "bbo": 60}
    assert (btc["recordsTotal"], btc["rate"], btc["avgReceiveIntervalMs"]) == (160, 80.0, 12.5)
    assert (btc["lastReceivedAt"], btc["lastEventAt"]) == (1990, 1988)
    collector = rows.collectors["binance"]
    assert collector["state"] == "running"
    assert (collector["recordsTotal"], collector["deadLetters"], collector["deadLettersTotal"]) == (
        180, {"schema-mismatch": 2}, 2,
    )  # fmt: skip
    assert collector["workers"]["w1"] == {
        "at": 2000, "rate": 90.0, "bytesPerSecond": 2000.0, "deadLettersPerSecond": 1.0,
        "latency": {"exchange_to_receive": [3, 1, 0]}, "cpuPercent": 12.5, "rssBytes": 1e8,
    }  # fmt: skip

    rows.flow(summary(2000, 4000, BTC_USDT={"trade": 40}))
    btc = rows.coins["binance:BTC/USDT"]
    assert (btc["records"], btc["recordsTotal"], btc["rate"]) == ({"trade": 140, "bbo": 60}, 200, 20.0)
    # The average receive interval moves a fifth of the way towards the newest interval (50 ms).
    assert btc["avgReceiveIntervalMs"] == 12.5 + 0.2 * (50.0 - 12.5)
    assert rows.coins["binance:ETH/USDT"]["recordsTotal"] == 20


def test_a_replayed_flow_summary_is_not_counted_twice() -> None:
    rows = Rows()
    first = summary(0, 2000, BTC_USDT={"trade": 100})
    rows.flow(first, offset=7)
    assert not rows.flow(first, offset=7)
    assert rows.coins["binance:BTC/USDT"]["recordsTotal"] == 100
    assert rows.collectors["binance"]["recordsTotal"] == 100
    assert rows.collectors["binance"]["deadLettersTotal"] == 2


def test_records_after_an_unsubscribe_resubscribe_the_coin_but_the_in_flight_tail_does_not() -> None:
    rows = Rows()
    rows.event("unsubscribed", 5000, detail={"symbols": ["BTC/USDT"]})
    # Records received before the stop (in flight when it happened) leave the coin stopped.
    rows.flow(summary(0, 4000, BTC_USDT={"trade": 3}))
    assert rows.coins["binance:BTC/USDT"]["state"] == "stopped"
    rows.flow(summary(4000, 9000, BTC_USDT={"trade": 3}))
    assert rows.coins["binance:BTC/USDT"]["state"] == "subscribed"


def test_stream_names_of_events_resolve_to_coins_through_the_exchange_adapter() -> None:
    adapter = BinanceAdapter(
        [
            Instrument(symbol="BTC/USDT", exchange_symbol="BTCUSDT", base="BTC", quote="USDT"),
            Instrument(symbol="1000SATS/USDT", exchange_symbol="1000SATSUSDT", base="1000SATS", quote="USDT"),
        ]
    )
    index = stream_index(adapter)
    for data_type in ("trade", "ticker", "bbo", "kline_1m", "kline_1M"):
        stream = adapter.stream_name(adapter.instruments["BTCUSDT"], DataType.parse(data_type))
        assert index[stream] == "BTC/USDT"
    assert (
        index[adapter.stream_name(adapter.instruments["1000SATSUSDT"], DataType("trade"))] == "1000SATS/USDT"
    )
    rows = Rows()
    streams = ["btcusdt@trade", "1000satsusdt@bookTicker", "nosuch@trade"]
    event = CollectorEvent(
        type="subscribed", exchange="binance", time=5, connection_id=CONNECTION, detail={"streams": streams}
    )
    rows.write(apply_event(event, 0, rows.tables, resolve_stream=index.get))
    assert sorted(rows.coins) == ["binance:1000SATS/USDT", "binance:BTC/USDT"]
    assert rows.connectors["binance-0"]["coins"] == ["1000SATS/USDT", "BTC/USDT"]
    assert rows.connectors["binance-0"]["streamsSubscribed"] == 3


def test_a_coin_stops_only_when_its_last_stream_is_unsubscribed() -> None:
    rows = Rows()
    rows.event(
        "subscribed", 100, connection_id=CONNECTION, detail={"streams": ["btcusdt@trade", "btcusdt@bbo"]}
    )
    rows.event("subscribe-requested", 150, connection_id=CONNECTION, detail={"streams": ["btcusdt@ticker"]})
    coin = rows.coins["binance:BTC/USDT"]
    assert (coin["state"], coin["subscribeRequests"]) == ("subscribed", 1)  # adding a type keeps it flowing
    rows.event("unsubscribed", 200, connection_id=CONNECTION, detail={"streams": ["btcusdt@trade"]})
    coin = rows.coins["binance:BTC/USDT"]
    assert (coin["state"], coin["streams"]) == ("subscribed", ["btcusdt@bbo"])
    assert rows.connectors["binance-0"]["coins"] == ["BTC/USDT"]
    rows.event("unsubscribed", 300, connection_id=CONNECTION, detail={"streams": ["btcusdt@bbo"]})
    assert rows.coins["binance:BTC/USDT"]["state"] == "stopped"
    assert rows.connectors["binance-0"]["coins"] == []


def test_flow_summaries_tell_each_connector_how_far_its_frames_were_received_and_normalized() -> None:
    rows = Rows()
    rows.event("connected", 100, connection_id=CONNECTION)
    heard = summary(1_000, 2_000)
    heard.connections = {"binance-0": 1_990, "binance-9": 1_990}  # binance-9 has no row: ignored
    heard.normalized = {CONNECTION: 1_500, "binance-0-1600000000000-1": 1_900}  # an older connection's
    rows.flow(heard)
    row = rows.connectors["binance-0"]
    assert (row["lastFrameAt"], row["normalizedThrough"]) == (1_990, 1_500)
    assert "binance-9" not in rows.connectors
    # Both only move forward: an older summary replayed after a rebalance changes nothing.
    older = summary(500, 1_000)
    older.connections, older.normalized = {"binance-0": 900}, {CONNECTION: 800}
    rows.flow(older)
    row = rows.connectors["binance-0"]
    assert (row["lastFrameAt"], row["normalizedThrough"]) == (1_990, 1_500)
    # A new connection of the connector: its own frames count once they are normalized.
    rows.event("connected", 3_000, connection_id="binance-0-1700000003000-2")
    later = summary(2_000, 4_000)
    later.connections, later.normalized = (
        {"binance-0": 3_990},
        {CONNECTION: 1_600, "binance-0-1700000003000-2": 3_950},
    )
    rows.flow(later)
    row = rows.connectors["binance-0"]
    assert (row["lastFrameAt"], row["normalizedThrough"]) == (3_990, 3_950)


def _upbit_event(rows: Rows, kind: str, time: int, **fields: Any) -> None:
    offset = rows.offsets["events"]
    rows.offsets["events"] += 1
    event = CollectorEvent(type=kind, exchange="upbit", time=time, **fields)
    rows.write(apply_event(event, offset, rows.tables))


def _upbit_flow(rows: Rows, started: int, ended: int, records: int) -> None:
    offset = rows.offsets["flow"]
    rows.offsets["flow"] += 1
    flow = FlowSummary(
        exchange="upbit", worker="w1", started_at=started, ended_at=ended,
        coins={"BTC/KRW": CoinFlow(records={"trade": records}, last_received_at=ended - 10,
                                   last_event_at=ended - 12)} if records else {},
    )  # fmt: skip
    rows.write(apply_flow(flow, offset, rows.tables))


def test_a_connector_of_an_exchange_that_never_acknowledges_is_subscribed_once_its_data_flows() -> None:
    rows = Rows()
    connection = "upbit-0-1700000000000-1"
    _upbit_event(rows, "connected", 1000, connection_id=connection)
    _upbit_event(rows, "subscribe-requested", 1100, connection_id=connection, detail={"symbols": ["BTC/KRW"]})
    assert rows.connectors["upbit-0"]["state"] == "subscription-requesting"
    _upbit_flow(rows, 0, 1050, records=0)  # nothing yet: still requesting
    assert rows.connectors["upbit-0"]["state"] == "subscription-requesting"
    _upbit_flow(rows, 1050, 3000, records=5)
    connector = rows.connectors["upbit-0"]
    assert (connector["state"], connector["since"], connector["subscribeOk"]) == ("connected", 2990, 1)
    assert rows.coins["upbit:BTC/KRW"]["state"] == "subscribed"
    _upbit_flow(rows, 3000, 5000, records=5)  # later data changes nothing more
    assert rows.connectors["upbit-0"]["subscribeOk"] == 1
    # A new request (Upbit replaces the whole set) is proven again by records received after it.
    _upbit_event(rows, "subscribe-requested", 6000, connection_id=connection, detail={"symbols": ["BTC/KRW"]})
    _upbit_flow(rows, 5000, 5900, records=3)  # received before the request: proves nothing
    assert rows.connectors["upbit-0"]["state"] == "subscription-requesting"
    _upbit_flow(rows, 5900, 7000, records=3)
    assert rows.connectors["upbit-0"]["state"] == "connected"


def test_a_connector_of_an_exchange_that_acknowledges_waits_for_the_acknowledgement() -> None:
    rows = Rows()
    rows.event("connected", 1000, connection_id=CONNECTION)
    rows.event("subscribe-requested", 1100, connection_id=CONNECTION, detail={"symbols": ["BTC/USDT"]})
    rows.flow(summary(1050, 3000, BTC_USDT={"trade": 5}))
    assert rows.connectors["binance-0"]["state"] == "subscription-requesting"


def test_flow_summaries_carry_each_order_book_s_state_to_its_coin_and_counts_to_the_collector() -> None:
    rows = Rows()
    first = summary(0, 2000, BTC_USDT={"trade": 5})
    first.books = {"BTC/USDT": BookFlow("syncing", 1500), "ETH/USDT": BookFlow("syncing", 1900)}
    changes = rows.flow(first)
    assert rows.coins["binance:BTC/USDT"]["book"] == "syncing"
    eth = rows.coins["binance:ETH/USDT"]  # a book before any record of its coin
    # A syncing book receives diffs but publishes nothing yet: its coin is not silent.
    assert (eth["book"], eth["lastReceivedAt"]) == ("syncing", 1900)
    assert set(changes.coins) == {"binance:BTC/USDT", "binance:ETH/USDT"}
    second = summary(2000, 4000)
    second.books = {"BTC/USDT": BookFlow("synced", 1990), "ETH/USDT": BookFlow("syncing", 1900)}
    changes = rows.flow(second)
    assert set(changes.coins) == {"binance:BTC/USDT"}  # only rows whose book changed are written
    assert rows.coins["binance:BTC/USDT"]["book"] == "synced"
    overview = collector_overview(rows.collectors["binance"], "binance", 4000)
    assert overview["books"] == {"synced": 1, "syncing": 1}
    assert collector_overview(rows.collectors["binance"], "binance", 60_000)["books"] == {
        "synced": 0,
        "syncing": 0,
    }
