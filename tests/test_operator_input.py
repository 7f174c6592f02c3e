"""Operator input: bad configuration files through the real `collector worker` command, and hostile
subscription requests through `collector subscribe` and the web view.

tests/test_config.py checks the configuration rules through `load_config`; here the same kinds of
mistakes (and some nastier ones) go through the installed command, which must name the key, exit 2
and print no traceback. tests/test_subscriptions*.py cover ordinary bad requests; here they are hostile.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.embedded_broker import EmbeddedBroker
from tables.subscription_rules import Request, RequestError, parse_request
from tests.harness import COLLECTOR, REPO, Simulator, Worker, write_config

GOOD: dict[str, Any] = {
    "exchanges": {
        "binance": {
            "wsEndpoint": "ws://127.0.0.1:9",
            "restEndpoint": "http://127.0.0.1:9",
            "symbols": ["BTC/USDT"],
            "dataTypes": ["trade"],
        }
    }
}
BINANCE = ("exchanges", "binance")


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    document = json.loads(json.dumps(GOOD))
    node = document
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return document


def run_collector(*args: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "COLLECTOR_CONFIG": str(config), **env}
    environ.pop("COLLECTOR_KAFKA_BROKERS", None) if "COLLECTOR_KAFKA_BROKERS" not in env else None
    return subprocess.run(
        [COLLECTOR, *args], capture_output=True, text=True, env=environ, cwd=REPO, timeout=60
    )


# -- configuration files through `collector worker` -----------------------------------------------------

BILLION_LAUGHS = "\n".join(
    [f'l0: &l0 ["{"x" * 8}"]']
    + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)]
    + ["exchanges: {binance: {wsEndpoint: 'ws://h:1', restEndpoint: 'http://h:1', symbols: *l8,"
       " dataTypes: [trade]}}"]
)  # fmt: skip

CONFIG_FILES = [
    pytest.param(b"exchanges: [unclosed", "not valid YAML", id="malformed-yaml"),
    pytest.param(b"exchanges:\n\tbinance: {}\n", "not valid YAML", id="tab-indent"),
    pytest.param(b"exchanges:\n  binance:\n    symbols: [\xff\xfe]\n", "not UTF-8", id="non-utf8"),
    pytest.param(b"just a string\n", "top level must be a mapping", id="scalar"),
    pytest.param(b"exchanges: null\n", "exchanges:", id="null-exchanges"),
    pytest.param(b"exchanges: {binance: null}\n", "exchanges.binance:", id="null-exchange"),
    pytest.param(b"exchanges: {1: {}}\n", "exchanges.1:", id="non-string-exchange"),
    pytest.param(BILLION_LAUGHS.encode(), "exchanges.binance.symbols.0:", id="alias-bomb"),
    pytest.param(yaml.safe_dump(_with((*BINANCE, "symbols"), "BTC/USDT")).encode(),
                 "exchanges.binance.symbols:", id="string-for-list"),
    pytest.param(yaml.safe_dump(_with((*BINANCE, "symbols"), [["BTC/USDT"]])).encode(),
                 "exchanges.binance.symbols.0:", id="nested-list"),
    pytest.param(yaml.safe_dump(_with(("server", "port"), "eighty")).encode(), "server.port:",
                 id="port-text"),
    pytest.param(yaml.safe_dump(_with((*BINANCE, "symbols"), ["BTC/USDT\n"])).encode(),
                 "exchanges.binance.symbols:", id="symbol-with-newline"),
    pytest.param(yaml.safe_dump(_with(("server", "port"), 1e400)).encode(), "server.port:", id="port-inf"),
    pytest.param(yaml.safe_dump(_with(("exchanges", "kraken"), GOOD["exchanges"]["binance"])).encode(),
                 "exchanges.kraken: unknown exchange", id="unknown-exchange"),
    pytest.param(yaml.safe_dump(_with((*BINANCE, "dataTypes"), ["trades"])).encode(),
                 "exchanges.binance.dataTypes:", id="unknown-data-type"),
    pytest.param(yaml.safe_dump(_with((*BINANCE, "dataTypes"), ["trade", "kline_10m"])).encode(),
                 "exchanges.binance.dataTypes.1: binance does not offer data type kline_10m",
                 id="unsupported-data-type"),
    pytest.param(yaml.safe_dump(_with(("validation", "clockSkewSeconds"), -5)).encode(),
                 "validation.clockSkewSeconds:", id="negative-clock-skew"),
    pytest.param(yaml.safe_dump(_with(("validation", "clockSkewSeconds"), "5m")).encode(),
                 "validation.clockSkewSeconds:", id="clock-skew-text"),
    pytest.param(yaml.safe_dump(_with(("validation", "clockSkew"), 5)).encode(),
                 "validation.clockSkew: unknown key", id="clock-skew-typo"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "named"), CONFIG_FILES)
def test_a_bad_config_file_stops_the_worker_naming_the_key(
    tmp_path: Path, content: bytes, named: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    result = run_collector("worker", config=path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "collector: configuration error" in result.stderr
    assert named in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"COLLECTOR_SERVER_PORT": "eighty"}, "COLLECTOR_SERVER_PORT"),
        ({"COLLECTOR_SERVER_PORT": "99999"}, "server.port"),
        ({"COLLECTOR_KAFKA_BROKERS": "no-port-here"}, "kafka.brokers"),
    ],
)
def test_bad_environment_overrides_stop_the_worker(tmp_path: Path, env: dict[str, str], named: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = run_collector("worker", config=path, **env)
    assert result.returncode == 2 and named in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_config_path_that_is_a_directory_is_named(tmp_path: Path) -> None:
    result = run_collector("worker", config=tmp_path)
    assert result.returncode == 2 and "COLLECTOR_CONFIG: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


# -- `collector subscribe` with hostile arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("binance", "A" * 100_000 + "/USDT", "trade"), "BASE/QUOTE"),
        (("binance", "\uff22\uff34\uff23/USDT", "trade"), "BASE/QUOTE"),  # fullwidth letters
        (("binance", "BTC/USDT", "trade\u200b"), "unknown data type"),
        (("binance", "BTC/USDT", "kline_" + "9" * 5000 + "m"), "does not offer data type"),
        (("binance", "BTC/USDT", "trade", "--wait", "soon"), "--wait"),
        (("../../etc", "BTC/USDT", "trade"), "not configured"),
    ],
)
def test_hostile_cli_subscriptions_are_refused_with_a_message(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    # Refused before any broker is contacted: the address points nowhere.
    result = run_collector("subscribe", *args, config=path, COLLECTOR_KAFKA_BROKERS="127.0.0.1:9")
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- /subscriptions bodies ---------------------------------------------------------------------------------

json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)  # fmt: skip
request_like = st.fixed_dictionaries(
    {},
    optional={
        "exchange": st.sampled_from(["binance", "kraken", ""]) | json_bodies,
        "symbol": st.sampled_from(["BTC/USDT", "btc-usdt", "BTCUSDT"]) | json_bodies,
        "dataTypes": st.lists(st.sampled_from(["trade", "kline_1m", "depth", "x"]) | json_bodies, max_size=3)
        | json_bodies,
    },
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(body=json_bodies | request_like)
def test_any_json_body_is_a_request_or_a_request_error(body: Any) -> None:
    try:
        request = parse_request(body, ["binance"])
    except RequestError as error:
        assert str(error)
    else:
        assert isinstance(request, Request) and request.exchange == "binance" and request.data_types


def _http(method: str, url: str, raw: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=raw, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


GOOD_REQUEST = {"exchange": "binance", "symbol": "BTC/USDT", "dataTypes": ["trade"]}


@pytest.fixture(scope="module")
def subscriptions_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Worker]]:
    tmp_path = tmp_path_factory.mktemp("operator-web")
    with EmbeddedBroker() as broker:
        simulator = Simulator(["BTC/USDT"], rate=5)
        config = write_config(tmp_path / "c.yaml", simulator, ["BTC/USDT"], ["trade"])
        worker = Worker(config, broker.bootstrap, tmp_path)
        try:
            worker.wait_ready()
            yield f"http://127.0.0.1:{worker.port}/subscriptions", worker
        finally:
            worker.stop()
            simulator.stop()


def _assert_refused_and_still_serving(url: str, worker: Worker, cases: list[tuple[bytes, int]]) -> None:
    for raw, status in cases:
        for method in ("POST", "DELETE"):
            got, body = _http(method, url, raw)
            assert got == status, (method, raw[:40], got, body[:300])
            assert "error" in json.loads(body)
    assert worker.process.poll() is None
    # Still serving: a good request after all that is queued.
    got, body = _http("POST", url, json.dumps(GOOD_REQUEST).encode())
    assert got == 202 and json.loads(body)["symbol"] == "BTC/USDT", body
    assert "Traceback" not in worker.log(), worker.log()[-5000:]


@pytest.mark.e2e
def test_hostile_web_subscription_bodies_get_4xx_and_the_worker_stays_up(
    subscriptions_url: tuple[str, Worker],
) -> None:
    url, worker = subscriptions_url
    cases = [
        (b"\xff\xfe\x00\x81", 400),  # not UTF-8
        (json.dumps({**GOOD_REQUEST, "dataTypes": [1, None]}).encode(), 422),
        (json.dumps({**GOOD_REQUEST, "symbol": "A" * 1_000}).encode(), 422),
        (json.dumps({**GOOD_REQUEST, "exchange": {"$ne": None}}).encode(), 422),
        (b'{"exchange": "binance", "symbol": NaN, "dataTypes": ["trade"]}', 422),
        (b'"just a string"', 400),
        (b"", 400),
    ]
    _assert_refused_and_still_serving(url, worker, cases)
    got, _ = _http("POST", url, b'{"x": "' + b"y" * 3_000_000 + b'"}')
    assert 400 <= got < 500  # too large a body is refused, whatever the exact code


@pytest.mark.e2e
def test_json_nested_past_the_recursion_limit_gets_400(subscriptions_url: tuple[str, Worker]) -> None:
    url, worker = subscriptions_url
    cases = [(b"[" * 100_000 + b"]" * 100_000, 400), (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400)]
    _assert_refused_and_still_serving(url, worker, cases)
