"""The composition root builds a complete worker from its config, with nothing wired on import.

Building an app opens no socket: these tests only look at what was registered.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from agents import worker
from agents.worker import build_app
from agents.writer import RAW_LINGER_MS, RAW_SIDE_OUTPUT_LINGER_MS
from streams.config import parse_config

EXCHANGES = {
    "binance": {
        "wsEndpoint": "wss://stream.binance.com:9443",
        "restEndpoint": "https://api.binance.com",
        "symbols": ["BTC/USDT"],
        "dataTypes": ["trade", "bbo"],
    },
    "upbit": {
        "wsEndpoint": "wss://api.upbit.com",
        "restEndpoint": "https://api.upbit.com",
        "symbols": ["BTC/KRW"],
        "dataTypes": ["trade"],
    },
}


def _config(**extra: Any) -> Any:
    return parse_config({"exchanges": EXCHANGES, "kafka": {"brokers": ["127.0.0.1:19092"]}, **extra})


def _pages(app: Any) -> set[str]:
    return set(app.web.views)


def test_a_collecting_worker_has_every_agent_table_and_view() -> None:
    app = build_app(_config())
    agents = set(app.agents)
    assert {"normalize.binance", "normalize.upbit", "control.commands"} <= agents
    assert {"state.events", "state.flow", "state.alerts"} <= agents
    assert {"state-coins", "state-connectors", "state-collectors", "state-alerts", "subscriptions"} <= set(
        app.tables
    )
    assert {
        "/health",
        "/coins",
        "/connectors",
        "/collectors",
        "/alerts",
        "/subscriptions",
        "/metrics",
        "/",
    } <= (_pages(app))
    assert app.conf.broker[0].port == 19092
    assert app.embedded_broker is None


def test_a_worker_that_does_not_collect_runs_no_source_normalize_or_control_agent() -> None:
    app = build_app(_config(collection=False))
    agents = set(app.agents)
    assert not {name for name in agents if name.startswith(("normalize.", "control."))}
    assert {"state.events", "state.flow", "state.alerts"} <= agents
    assert "/health" in _pages(app)


def test_the_embedded_default_gives_the_app_a_broker_to_start_and_its_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "_port_is_free", lambda port: True)  # no socket in a unit test
    monkeypatch.setattr(worker.PortClaim, "take", lambda port: worker.PortClaim(-1))  # nor a worker's claim
    app = build_app(parse_config({"exchanges": EXCHANGES}))
    assert app.embedded_broker is not None
    assert app.conf.broker[0].port == app.embedded_broker.port == 9092
    assert app.embedded_broker.pid is None  # started by the app when it starts, not when built


def test_raw_batches_linger_only_where_the_raw_topic_is_a_side_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With its own broker a worker normalizes in-process and nothing waits for the raw topic; on a
    # cluster the normalize agent reads it back, so every millisecond there is latency.
    monkeypatch.setattr(worker, "_port_is_free", lambda port: True)
    monkeypatch.setattr(worker.PortClaim, "take", lambda port: worker.PortClaim(-1))
    embedded = build_app(parse_config({"exchanges": EXCHANGES}))
    cluster = build_app(_config())
    assert embedded.pipeline is not None and cluster.pipeline is not None
    assert embedded.pipeline.raw_linger_ms == RAW_SIDE_OUTPUT_LINGER_MS > 1
    assert cluster.pipeline.raw_linger_ms == RAW_LINGER_MS == 1
    assert build_app(_config(collection=False)).pipeline is None


def test_a_worker_starting_while_another_claims_9092_takes_a_free_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both would find 9092 free (neither broker has bound it yet); the claim decides before the app's
    # bootstrap address is fixed.
    monkeypatch.setattr(worker, "_port_is_free", lambda port: True)
    monkeypatch.setattr(worker, "free_port", lambda: 45_678)  # no socket in a unit test
    held = worker.PortClaim.take(9092)  # None: a worker of another test holds it, which is the same case
    try:
        app = build_app(parse_config({"exchanges": EXCHANGES}))
        assert app.embedded_broker is not None
        assert app.conf.broker[0].port == app.embedded_broker.port == 45_678
    finally:
        if held is not None:
            held.release()


def test_a_port_claim_is_exclusive_until_released() -> None:
    port = 100_000 + os.getpid()  # a name for the lock file only, so parallel tests do not meet
    first = worker.PortClaim.take(port)
    assert first is not None
    assert worker.PortClaim.take(port) is None
    first.release()
    first.release()  # idempotent
    again = worker.PortClaim.take(port)
    assert again is not None
    again.release()


def test_two_workers_can_be_built_in_one_process() -> None:
    first, second = build_app(_config()), build_app(_config(collection=False))
    assert first is not second
    assert "normalize.binance" in first.agents and "normalize.binance" not in second.agents
