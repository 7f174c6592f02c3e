"""Subscription rules: connection groups, request validation, commands applied to rows, config seeding."""

from __future__ import annotations

import pytest

from streams.commands import SubscriptionCommand, decode_command, encode_command
from tables.subscription_rules import (
    COMMANDS_PARTITIONS,
    RECENT_COMMANDS,
    Request,
    RequestError,
    apply_command,
    check_request,
    group_index,
    group_of,
    group_partition,
    group_symbols,
    groups_per_exchange,
    is_seed,
    moved_row,
    new_command,
    normalize_symbol,
    parse_request,
    row_key,
    seed_commands,
)

CONFIGURED = {"binance"}


def command(
    action: str, types: list[str], command_id: str, symbol: str = "BTC/USDT", at: int = 1
) -> SubscriptionCommand:
    return SubscriptionCommand(
        action=action,  # type: ignore[arg-type]
        exchange="binance",
        symbol=symbol,
        data_types=types,
        command_id=command_id,
        requested_at=at,
    )


def seed(types: list[str], symbol: str = "BTC/USDT") -> SubscriptionCommand:
    (found,) = seed_commands({"binance": ([symbol], types)}, now_ms=5)
    return found


# -- groups ------------------------------------------------------------------------------------


def test_groups_follow_connections_max_up_to_the_partition_count() -> None:
    assert groups_per_exchange(1) == 1
    assert groups_per_exchange(5) == 5
    assert groups_per_exchange(1000) == COMMANDS_PARTITIONS


def test_a_symbol_always_maps_to_the_same_group_within_range() -> None:
    symbols = [f"S{i}/USDT" for i in range(200)]
    first = [group_of("binance", s, 5) for s in symbols]
    assert first == [group_of("binance", s, 5) for s in symbols]
    assert {group_partition(g) for g in first} == set(range(5)), "200 symbols should use every group"
    assert group_of("binance", "BTC/USDT", 5) == f"binance:{group_index('BTC/USDT', 5)}"
    assert all(group_partition(group_of("binance", s, 1)) == 0 for s in symbols)


def test_group_partition_reads_the_index_of_exchange_names_with_dashes() -> None:
    assert group_partition("binance-futures:3") == 3


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("BTC/USDT", "BTC/USDT"),
        ("btc/usdt", "BTC/USDT"),
        ("btc-usdt", "BTC/USDT"),
        ("1000SATS/USDT", "1000SATS/USDT"),
    ],
)
def test_symbols_are_normalized(text: str, expected: str) -> None:
    assert normalize_symbol(text) == expected


@pytest.mark.parametrize("text", ["BTCUSDT", "BTC/", "/USDT", "BTC/USDT/X", "BTC USDT", "", "BTC/US$T"])
def test_malformed_symbols_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(RequestError, match="BASE/QUOTE"):
        normalize_symbol(text)


def test_a_valid_request_is_normalized_and_deduplicated() -> None:
    body = {"exchange": "binance", "symbol": "eth-usdt", "dataTypes": ["trade", "kline_1m", "trade"]}
    assert parse_request(body, CONFIGURED) == Request("binance", "ETH/USDT", ["trade", "kline_1m"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (["binance"], "JSON object"),
        (None, "JSON object"),
        ({"exchange": "binance", "symbol": "BTC/USDT"}, "missing field.*dataTypes"),
        ({"symbol": "BTC/USDT", "dataTypes": ["trade"]}, "missing field.*exchange"),
        ({"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["trade"], "x": 1}, "unknown field.*x"),
        ({"exchange": "kraken", "symbol": "BTC/USDT", "dataTypes": ["trade"]}, "'kraken' is not configured"),
        ({"exchange": "binance", "symbol": "BTCUSDT", "dataTypes": ["trade"]}, "BASE/QUOTE"),
        ({"exchange": "binance", "symbol": 5, "dataTypes": ["trade"]}, "symbol must be a string"),
        ({"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": "trade"}, "list of strings"),
        ({"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": []}, "at least one data type"),
        (
            {"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["candles"]},
            "unknown data type 'candles'",
        ),
        (
            {"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["kline_7m"]},
            "does not offer data type kline_7m",
        ),
        (
            {"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["kline_10m"]},
            "does not offer data type kline_10m",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(body: object, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(body, CONFIGURED)


def test_new_commands_have_unique_ids_and_round_trip() -> None:
    request = check_request("binance", "BTC/USDT", ["trade"], CONFIGURED)
    first, second = new_command("subscribe", request, 10), new_command("subscribe", request, 10)
    assert first.command_id != second.command_id
    assert not is_seed(first)
    assert decode_command(encode_command(first)) == first


# -- applying commands -------------------------------------------------------------------------


def test_subscribe_and_unsubscribe_change_the_data_types() -> None:
    row = apply_command(None, command("subscribe", ["trade", "kline_1m"], "a"), "binance:2").row
    assert row["dataTypes"] == ["kline_1m", "trade"] and row["group"] == "binance:2"
    outcome = apply_command(row, command("unsubscribe", ["trade"], "b", at=7), "binance:2")
    assert outcome.changed and outcome.row["dataTypes"] == ["kline_1m"] and outcome.row["updatedAt"] == 7
    assert row["dataTypes"] == ["kline_1m", "trade"], "apply_command must not modify its input"


def test_a_command_that_changes_nothing_is_not_a_change() -> None:
    row = apply_command(None, command("subscribe", ["trade"], "a"), "binance:0").row
    outcome = apply_command(row, command("subscribe", ["trade"], "b"), "binance:0")
    assert not outcome.changed and not outcome.replayed


def test_a_replayed_command_is_skipped_even_after_later_commands() -> None:
    row = apply_command(None, command("subscribe", ["trade"], "a"), "binance:0").row
    row = apply_command(row, command("unsubscribe", ["trade"], "b"), "binance:0").row
    replay = apply_command(row, command("subscribe", ["trade"], "a"), "binance:0")
    assert replay.replayed and not replay.changed and replay.row["dataTypes"] == []


def test_rows_remember_a_bounded_number_of_command_ids() -> None:
    row = None
    for n in range(RECENT_COMMANDS + 10):
        row = apply_command(row, command("subscribe", ["trade"], f"c{n}"), "binance:0").row
    assert row is not None and len(row["recentCommands"]) == RECENT_COMMANDS
    assert row["recentCommands"][-1] == f"c{RECENT_COMMANDS + 9}"


# -- config seeding ----------------------------------------------------------------------------


def test_seeds_are_deterministic_and_recognisable() -> None:
    first = seed_commands({"binance": (["BTC/USDT", "ETH/USDT"], ["trade", "bbo"])}, now_ms=1)
    again = seed_commands({"binance": (["BTC/USDT", "ETH/USDT"], ["bbo", "trade"])}, now_ms=2)
    assert [c.command_id for c in first] == [c.command_id for c in again]
    assert all(is_seed(c) and c.action == "subscribe" for c in first)
    assert [c.symbol for c in first] == ["BTC/USDT", "ETH/USDT"]
    changed = seed_commands({"binance": (["BTC/USDT"], ["trade"])}, now_ms=1)
    assert changed[0].command_id != first[0].command_id


def test_first_seed_subscribes_the_config() -> None:
    row = apply_command(None, seed(["trade", "bbo"]), "binance:0").row
    assert row["dataTypes"] == ["bbo", "trade"] and row["seeded"] == ["bbo", "trade"]


def test_seeding_again_after_a_restart_does_not_undo_a_runtime_unsubscribe() -> None:
    row = apply_command(None, seed(["trade", "bbo"]), "binance:0").row
    row = apply_command(row, command("unsubscribe", ["bbo"], "u1"), "binance:0").row
    # The same seed again, and a seed that outlived the recent-id memory: both leave bbo off.
    assert apply_command(row, seed(["trade", "bbo"]), "binance:0").row["dataTypes"] == ["trade"]
    forgotten = {**row, "recentCommands": []}
    assert apply_command(forgotten, seed(["trade", "bbo"]), "binance:0").row["dataTypes"] == ["trade"]


def test_seeding_keeps_runtime_subscriptions_and_adds_what_the_config_gained() -> None:
    row = apply_command(None, seed(["trade"]), "binance:0").row
    row = apply_command(row, command("subscribe", ["kline_1m"], "s1"), "binance:0").row
    row = apply_command(row, command("unsubscribe", ["trade"], "u1"), "binance:0").row
    row = apply_command(row, seed(["trade", "ticker"]), "binance:0").row
    assert row["dataTypes"] == ["kline_1m", "ticker"], "trade stays off, ticker is new in the config"
    assert row["seeded"] == ["ticker", "trade"]


def test_removing_a_data_type_from_the_config_unsubscribes_nothing() -> None:
    row = apply_command(None, seed(["trade", "bbo"]), "binance:0").row
    row = apply_command(row, seed(["trade"]), "binance:0").row
    assert row["dataTypes"] == ["bbo", "trade"]


def test_a_runtime_subscribe_before_the_first_seed_is_kept() -> None:
    row = apply_command(None, command("subscribe", ["kline_5m"], "s1"), "binance:0").row
    row = apply_command(row, seed(["trade"]), "binance:0").row
    assert row["dataTypes"] == ["kline_5m", "trade"]


def test_group_symbols_lists_only_the_groups_rows_that_want_data() -> None:
    rows = [
        {"symbol": "BTC/USDT", "group": "binance:1", "dataTypes": ["trade"]},
        {"symbol": "ETH/USDT", "group": "binance:1", "dataTypes": []},
        {"symbol": "BNB/USDT", "group": "binance:2", "dataTypes": ["bbo"]},
    ]
    assert group_symbols(rows, "binance:1") == {"BTC/USDT": ["trade"]}


def test_a_row_moved_to_a_new_group_keeps_its_wishes_and_takes_the_seed_again() -> None:
    old = apply_command(None, seed(["trade", "bbo"]), "binance:4").row
    old = apply_command(old, command("unsubscribe", ["bbo"], "u1"), "binance:4").row
    assert row_key("binance:4", "BTC/USDT") == "binance:4|BTC/USDT"
    moved = moved_row(old, "binance:1")
    assert moved["group"] == "binance:1" and moved["dataTypes"] == ["trade"]
    # The same seed is applied again (its id is not remembered in the new group) and changes nothing.
    outcome = apply_command(moved, seed(["trade", "bbo"]), "binance:1")
    assert not outcome.replayed and outcome.row["dataTypes"] == ["trade"]
