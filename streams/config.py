"""The YAML configuration contract (DESIGN.md), validated with pydantic.

`load_config` reads `COLLECTOR_CONFIG` (default `config/default.yaml`) and applies the environment
overrides `COLLECTOR_KAFKA_BROKERS` (comma list, or `embedded`), `COLLECTOR_SERVER_PORT`,
`COLLECTOR_COLLECTION` (`true`/`false`), `COLLECTOR_POSTGRES_DSN` and `COLLECTOR_REDIS_URL` (the
sinks' addresses). Any
unknown key or bad value raises ConfigError whose message names the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streams.depth import DepthSettings
from streams.exchanges import adapter_class
from streams.exchanges.base import DataType, DepthSettingError

DEFAULT_CONFIG_PATH = Path("config/default.yaml")
EMBEDDED: Literal["embedded"] = "embedded"
EMBEDDED_BROKER_PORT = 9092  # where `collector worker` starts the embedded broker when the port is free
_SYMBOL = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")
_BROKER = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    port: Annotated[int, Field(ge=1, le=65535)] = 6066


class ConnectionsConfig(_Strict):
    max: Annotated[int, Field(ge=1, le=1000)] = 5
    streamsPerConnection: Annotated[int, Field(ge=1)] = 1000
    # A subscribed connection that receives no frame for this long is recycled.
    silenceTimeoutSeconds: Annotated[float, Field(gt=0)] = 60.0
    # A connection silent this many of its usual gaps between frames (at least 2 s) has stalled and is
    # replaced make-before-break (streams/liveness.py); 0 leaves only silenceTimeoutSeconds.
    stallAfterGaps: Annotated[float, Field(ge=0, le=1000)] = 8.0
    # Roll connections over (make-before-break) after this long; default: the exchange's limit less 15 min.
    lifetimeSeconds: Annotated[float | None, Field(gt=0)] = None
    # Frames are batched for 5 ms while they come fast (3,200 a second and more), and for this long at
    # 500 a second and below (agents/connection.py, `flush_window`); 5 keeps every batch at 5 ms.
    quietFlushMs: Annotated[float, Field(ge=5, le=1000)] = 50.0


class DepthConfig(_Strict):
    """Order books; each key left out takes the exchange's default (README, "Order books")."""

    levels: Annotated[int | None, Field(ge=1)] = None  # levels per side in depth records
    speed: str | None = None  # the diff stream's speed, e.g. 100ms
    snapshotIntervalSeconds: Annotated[float | None, Field(gt=0)] = None  # a snapshot record this often


class ExchangeConfig(_Strict):
    wsEndpoint: str
    restEndpoint: str
    symbols: Annotated[list[str], Field(min_length=1)]
    dataTypes: Annotated[list[str], Field(min_length=1)]
    connections: ConnectionsConfig = ConnectionsConfig()
    depth: DepthConfig = DepthConfig()

    @field_validator("wsEndpoint")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        if not re.match(r"^wss?://[^/\s]+", value):
            raise ValueError("must be a ws:// or wss:// URL")
        return value.rstrip("/")

    @field_validator("restEndpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        for symbol in value:
            if not _SYMBOL.fullmatch(symbol):
                raise ValueError(f"symbol {symbol!r} is not BASE/QUOTE in capitals, e.g. BTC/USDT")
        if len(set(value)) != len(value):
            raise ValueError("symbols are listed twice")
        return value

    @field_validator("dataTypes")
    @classmethod
    def _data_types(cls, value: list[str]) -> list[str]:
        for text in value:
            DataType.parse(text)
        if len(set(value)) != len(value):
            raise ValueError("data types are listed twice")
        return value

    @property
    def data_types(self) -> list[DataType]:
        return [DataType.parse(text) for text in self.dataTypes]


class ProducerConfig(_Strict):
    # Longer than Kafka clients' usual few ms: every market produce request costs the embedded broker
    # ~0.1 ms per partition it touches, so fewer, fuller requests keep it (and so latency) unloaded.
    lingerMs: Annotated[int, Field(ge=0, le=10_000)] = 25
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # Which client carries the market records. aiokafka puts every partition into one produce
    # request; librdkafka sends a request per partition, which the embedded broker pays for at
    # 1,000 symbols (docs/benchmarks.md). The raw side output always goes through librdkafka.
    client: Literal["aiokafka", "librdkafka"] = "aiokafka"


MIB = 1024 * 1024


class SpoolConfig(_Strict):
    """Raw batches the broker has not taken: kept in memory, then on disk, then dropped (newest first)."""

    memoryBytes: Annotated[int, Field(ge=MIB)] = 64 * MIB
    diskBytes: Annotated[int, Field(ge=0)] = 1024 * MIB  # 0: no disk, drop past memoryBytes
    directory: str | None = None  # default: raw-spool in the worker's data directory


class KafkaConfig(_Strict):
    brokers: list[str] | Literal["embedded"] = EMBEDDED
    producer: ProducerConfig = ProducerConfig()
    spool: SpoolConfig = SpoolConfig()

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: list[str] | Literal["embedded"]) -> list[str] | Literal["embedded"]:
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one host:port, or say embedded")
            for broker in value:
                if not _BROKER.fullmatch(broker):
                    raise ValueError(f"broker {broker!r} is not host:port")
        return value

    @property
    def embedded(self) -> bool:
        return self.brokers == EMBEDDED

    @property
    def bootstrap_servers(self) -> list[str]:
        """host:port list; the embedded broker's usual address when none are configured."""
        if isinstance(self.brokers, list):
            return self.brokers
        return [f"127.0.0.1:{EMBEDDED_BROKER_PORT}"]


class PrometheusConfig(_Strict):
    enabled: bool = True


class AlertsConfig(_Strict):
    webhookUrl: str | None = None  # alerts are POSTed here as JSON when set
    staleAfterSeconds: Annotated[float, Field(gt=0)] = 60.0  # a subscribed coin silent this long is stale
    stuckAfterSeconds: Annotated[float, Field(gt=0)] = 60.0  # a connector down this long gets a recovery
    recoveryAttempts: Annotated[int, Field(ge=1, le=100)] = 3  # recoveries before recovery-failed
    # records trailing their connection's frames by longer than this: pipeline-behind
    behindAfterSeconds: Annotated[float, Field(gt=0)] = 10.0
    # an exchange's raw spool holding more than this (bytes the broker has not taken): spool-growing
    spoolAlertBytes: Annotated[int, Field(gt=0)] = 16 * MIB

    @field_validator("webhookUrl")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class MonitoringConfig(_Strict):
    prometheus: PrometheusConfig = PrometheusConfig()
    alerts: AlertsConfig = AlertsConfig()


class ValidationConfig(_Strict):
    # How far an exchange's event time may be from our receive time before a record is refused.
    clockSkewSeconds: Annotated[float, Field(gt=0, le=86_400)] = 300.0


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["json", "text"] = "json"


SinkType = Literal["trade", "kline", "ticker", "bbo"]
SINK_TYPES: tuple[SinkType, ...] = ("trade", "kline", "ticker", "bbo")  # what sinks store (depth: later)


def _unique_types(value: list[SinkType]) -> list[SinkType]:
    if len(set(value)) != len(value):
        raise ValueError("types are listed twice")
    return value


class PostgresSinkConfig(_Strict):
    # Required, but COLLECTOR_POSTGRES_DSN can supply it, so a file need not hold the password.
    dsn: Annotated[str, Field(min_length=1)]
    types: Annotated[list[SinkType], Field(min_length=1)] = list(SINK_TYPES)
    batchRows: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # records per database transaction
    batchMs: Annotated[int, Field(ge=1, le=60_000)] = 500  # longest a record waits for its batch

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if not (re.match(r"^postgres(ql)?://", value) or "=" in value):
            raise ValueError("must be a postgresql:// URL or a libpq key=value string")
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[SinkType]) -> list[SinkType]:
        return _unique_types(value)


class RedisSinkConfig(_Strict):
    url: Annotated[str, Field(min_length=1)]  # or COLLECTOR_REDIS_URL
    types: Annotated[list[SinkType], Field(min_length=1)] = list(SINK_TYPES)
    streamMaxLen: Annotated[int | None, Field(ge=1)] = None  # a stream per symbol, trimmed ~ this; None: none
    ttlSeconds: Annotated[int | None, Field(ge=1)] = None  # keys expire this long after their last write
    batchRows: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    batchMs: Annotated[int, Field(ge=1, le=60_000)] = 100

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^(rediss?|unix)://", value):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[SinkType]) -> list[SinkType]:
        return _unique_types(value)


class SinksConfig(_Strict):
    postgres: PostgresSinkConfig | None = None
    redis: RedisSinkConfig | None = None


class DistributionConfig(_Strict):
    """`distribution:` live delivery to `/ws/exchange` clients (agents/distribution.py)."""

    # A client whose unsent data would pass this is closed with 1008 "too slow".
    maxBufferBytes: Annotated[int, Field(ge=64 * 1024, le=1024**3)] = 4 * 1024 * 1024
    pingIntervalSeconds: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # How long a fetch of the market topics may wait for data. The embedded broker holds every fetch
    # this long, so it is the latency it adds there (and each fetch costs it CPU); Kafka answers at once.
    fetchMaxWaitMs: Annotated[int, Field(ge=1, le=10_000)] = 25


class CollectorConfig(_Strict):
    server: ServerConfig = ServerConfig()
    # false: this worker connects to no exchange and normalizes nothing; it serves the views, clients
    # and sinks from Kafka (a follower). `collector worker --no-collect` sets it too.
    collection: bool = True
    exchanges: Annotated[dict[str, ExchangeConfig], Field(min_length=1)]
    kafka: KafkaConfig = KafkaConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    logging: LoggingConfig = LoggingConfig()
    validation: ValidationConfig = ValidationConfig()
    sinks: SinksConfig = SinksConfig()

    distribution: DistributionConfig = DistributionConfig()

    @model_validator(mode="after")
    def _exchanges_known(self) -> CollectorConfig:
        for name, exchange in self.exchanges.items():
            try:
                adapter = adapter_class(name)
            except KeyError as exc:
                raise _KeyedError(("exchanges", name), str(exc.args[0])) from None
            for index, data_type in enumerate(exchange.data_types):
                if not adapter.supports(data_type):
                    raise _KeyedError(
                        ("exchanges", name, "dataTypes", index),
                        f"{name} does not offer data type {data_type}",
                    )
            limit = adapter.limits.max_streams_per_connection
            if exchange.connections.streamsPerConnection > limit:
                raise _KeyedError(
                    ("exchanges", name, "connections", "streamsPerConnection"),
                    f"{name} allows at most {limit} streams per connection",
                )
            if exchange.depth != DepthConfig():
                try:
                    self.depth_settings(name)
                except DepthSettingError as exc:
                    raise _KeyedError(("exchanges", name, "depth", exc.key), str(exc)) from None
        return self

    def depth_settings(self, exchange: str) -> DepthSettings:
        """The exchange's depth settings: the config's values, the exchange's defaults for the rest."""
        depth = self.exchanges[exchange].depth
        adapter = adapter_class(exchange)
        return adapter.depth_settings(depth.levels, depth.speed, depth.snapshotIntervalSeconds)


class _KeyedError(ValueError):
    """A cross-field error that knows which key it is about."""

    def __init__(self, location: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.location = location


_MISSING_HINTS = {
    ("sinks", "postgres", "dsn"): "required: write it here or set COLLECTOR_POSTGRES_DSN",
    ("sinks", "redis", "url"): "required: write it here or set COLLECTOR_REDIS_URL",
}


def _dotted(location: tuple[str | int, ...]) -> str:
    # pydantic adds union member tags such as "list[str]" to locations; they are not keys.
    keys = [str(part) for part in location if not (isinstance(part, str) and "[" in part)]
    return ".".join(keys) or "(top level)"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyedError):
            location, message = cause.location, str(cause)
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing" and location in _MISSING_HINTS:
            message = _MISSING_HINTS[location]
        else:
            message = item["msg"].removeprefix("Value error, ")
        line = f"{_dotted(location)}: {message}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def parse_config(document: Any, source: str = "configuration") -> CollectorConfig:
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        return CollectorConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _apply_environment(document: dict[str, Any], environ: os._Environ[str] | dict[str, str]) -> None:
    brokers = environ.get("COLLECTOR_KAFKA_BROKERS", "").strip()
    if brokers:
        kafka = document.setdefault("kafka", {}) or {}
        if not isinstance(kafka, dict):
            raise ConfigError("kafka: must be a mapping")
        kafka["brokers"] = EMBEDDED if brokers == EMBEDDED else [b.strip() for b in brokers.split(",")]
        document["kafka"] = kafka
    collect = environ.get("COLLECTOR_COLLECTION", "").strip().lower()
    if collect:
        if collect not in ("true", "false"):
            raise ConfigError(f"COLLECTOR_COLLECTION: {collect!r} is not true or false")
        document["collection"] = collect == "true"
    port = environ.get("COLLECTOR_SERVER_PORT", "").strip()
    if port:
        if not port.isdigit():
            raise ConfigError(f"COLLECTOR_SERVER_PORT: {port!r} is not a port number")
        server = document.setdefault("server", {}) or {}
        if not isinstance(server, dict):
            raise ConfigError("server: must be a mapping")
        server["port"] = int(port)
        document["server"] = server


_SINK_SECRETS = (("COLLECTOR_POSTGRES_DSN", "postgres", "dsn"), ("COLLECTOR_REDIS_URL", "redis", "url"))


def _apply_sink_secrets(document: dict[str, Any], environ: os._Environ[str] | dict[str, str]) -> None:
    """COLLECTOR_POSTGRES_DSN / COLLECTOR_REDIS_URL set the sink's address, and so turn the sink on."""
    for variable, sink, key in _SINK_SECRETS:
        value = environ.get(variable, "").strip()
        if not value:
            continue
        sinks = document.get("sinks") or {}
        if not isinstance(sinks, dict):
            raise ConfigError("sinks: must be a mapping")
        section = sinks.get(sink) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"sinks.{sink}: must be a mapping")
        section[key] = value
        sinks[sink] = section
        document["sinks"] = sinks


def load_config(environ: os._Environ[str] | dict[str, str] | None = None) -> CollectorConfig:
    environ = os.environ if environ is None else environ
    path = Path(environ.get("COLLECTOR_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"COLLECTOR_CONFIG: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    _apply_environment(document, environ)
    _apply_sink_secrets(document, environ)
    return parse_config(document, str(path))
