"""The configuration contract: valid files load, every bad key is named, env overrides apply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streams.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "server": {"port": 6066},
    "exchanges": {
        "binance": {
            "wsEndpoint": "wss://stream.binance.com:9443",
            "restEndpoint": "https://api.binance.com",
            "symbols": ["BTC/USDT", "ETH/USDT"],
            "dataTypes": ["trade", "kline_1m", "ticker", "bbo"],
            "connections": {"max": 5, "streamsPerConnection": 1000},
        }
    },
    "kafka": {"brokers": ["localhost:9092"], "producer": {"lingerMs": 5, "compression": "lz4"}},
    "monitoring": {"prometheus": {"enabled": True}},
    "logging": {"level": "info", "format": "json"},
}


def _with(path: tuple[str, ...], value: object) -> dict:
    document = yaml.safe_load(yaml.safe_dump(GOOD))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


def test_the_shipped_default_config_is_valid() -> None:
    config = load_config({"COLLECTOR_CONFIG": str(REPO / "config" / "default.yaml")})
    assert config.exchanges["binance"].symbols == ["BTC/USDT", "ETH/USDT", "BNB/USDT"]
    assert config.kafka.embedded
    assert [str(d) for d in config.exchanges["binance"].data_types] == [
        "trade", "kline_1m", "kline_5m", "kline_1h", "ticker", "bbo",
    ]  # fmt: skip


def test_a_full_valid_document_keeps_every_value() -> None:
    config = parse_config(GOOD)
    assert config.server.port == 6066
    assert config.kafka.brokers == ["localhost:9092"]
    assert config.kafka.producer.lingerMs == 5
    assert config.exchanges["binance"].connections.streamsPerConnection == 1000
    assert config.logging.format == "json"


def test_endpoints_lose_their_trailing_slash() -> None:
    config = parse_config(_with(("exchanges", "binance", "restEndpoint"), "http://127.0.0.1:8080/"))
    assert config.exchanges["binance"].restEndpoint == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("path", "value", "named_key", "words"),
    [
        (("exchanges", "binance", "bogus"), 1, "exchanges.binance.bogus", "unknown key"),
        (("surprise",), {}, "surprise", "unknown key"),
        (("server", "port"), 70000, "server.port", "less than or equal"),
        (("server", "port"), "http", "server.port", "integer"),
        (("exchanges", "binance", "wsEndpoint"), "http://x", "exchanges.binance.wsEndpoint", "ws://"),
        (("exchanges", "binance", "restEndpoint"), "ftp://x", "exchanges.binance.restEndpoint", "http://"),
        (("exchanges", "binance", "symbols"), ["btcusdt"], "exchanges.binance.symbols", "BASE/QUOTE"),
        (("exchanges", "binance", "symbols"), [], "exchanges.binance.symbols", "at least 1"),
        (
            ("exchanges", "binance", "dataTypes"),
            ["trades"],
            "exchanges.binance.dataTypes",
            "unknown data type",
        ),
        (("exchanges", "binance", "dataTypes"), ["kline_7m"], "exchanges.binance.dataTypes.0", "kline_7m"),
        (("exchanges", "binance", "dataTypes"), ["trade", "kline_2m"], "exchanges.binance.dataTypes.1", "2m"),
        (("exchanges", "binance", "connections", "max"), 0, "exchanges.binance.connections.max", "greater"),
        (
            ("exchanges", "binance", "connections", "streamsPerConnection"),
            5000,
            "exchanges.binance.connections.streamsPerConnection",
            "at most 1024",
        ),
        (
            ("exchanges", "binance", "connections", "quietFlushMs"),
            1,
            "exchanges.binance.connections.quietFlushMs",
            "greater than or equal to 5",
        ),
        (("exchanges", "krakenish"), GOOD["exchanges"]["binance"], "exchanges.krakenish", "unknown exchange"),
        (("kafka", "brokers"), ["localhost"], "kafka.brokers", "host:port"),
        (("kafka", "brokers"), "somewhere", "kafka.brokers", "embedded"),
        (("kafka", "producer", "compression"), "brotli", "kafka.producer.compression", "lz4"),
        (("logging", "level"), "loud", "logging.level", "info"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(path, value, named_key, words) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(_with(path, value))
    message = str(raised.value)
    assert f"{named_key}:" in message
    assert words in message


def test_environment_overrides_brokers_and_port(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    environ = {
        "COLLECTOR_CONFIG": str(path),
        "COLLECTOR_KAFKA_BROKERS": "k1:9092, k2:9093",
        "COLLECTOR_SERVER_PORT": "7000",
    }
    config = load_config(environ)
    assert config.kafka.brokers == ["k1:9092", "k2:9093"]
    assert config.server.port == 7000
    assert load_config({**environ, "COLLECTOR_KAFKA_BROKERS": "embedded"}).kafka.embedded


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("exchanges: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("", "exchanges: Field required"),
    ],
)
def test_unusable_files_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config({"COLLECTOR_CONFIG": str(path)})


def test_bad_environment_values_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    with pytest.raises(ConfigError, match="COLLECTOR_SERVER_PORT"):
        load_config({"COLLECTOR_CONFIG": str(path), "COLLECTOR_SERVER_PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"kafka\.brokers"):
        load_config({"COLLECTOR_CONFIG": str(path), "COLLECTOR_KAFKA_BROKERS": "nohostport"})
    with pytest.raises(ConfigError, match="COLLECTOR_CONFIG: cannot read"):
        load_config({"COLLECTOR_CONFIG": str(tmp_path / "missing.yaml")})


def test_the_command_refuses_to_start_with_a_message_and_non_zero_exit(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(("exchanges", "binance", "symbols"), ["BTC-USDT"])))
    result = subprocess.run(
        [sys.executable, "-m", "agents.cli", "worker"],
        cwd=REPO,
        env={"COLLECTOR_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "exchanges.binance.symbols" in result.stderr
    assert "Traceback" not in result.stderr
