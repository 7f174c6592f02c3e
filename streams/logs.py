"""Structured JSON logs (`logging.format: json`): one JSON object per line.

Every line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`; fields
passed with `extra=` are added as they are, and an exception adds `exception` with its traceback.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from streams.config import LoggingConfig

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage().strip(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in document:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def logging_config(settings: LoggingConfig) -> dict[str, Any] | None:
    """A `logging.config.dictConfig` document for the worker, or None to keep Faust's text logs."""
    if settings.format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
        },
        "root": {"level": settings.level.upper(), "handlers": ["default"]},
    }


# Kafka clients log each failed attempt to reach a broker that is gone, tens of times a second
# (aiokafka's connection and fetch errors, librdkafka's, the raw producer's error callback, the market
# producer's retries).
REPEATING_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.sender",
    "librdkafka",
    "agents.writer",
    "agents.produce_sender",  # its batches tried again every 100 ms
)


class RepeatLimiter(logging.Filter):
    """Lets a logger's line of one kind (its message template and level) through at most once per
    `interval` seconds; the next one through says how many were held back meanwhile."""

    MAX_KINDS = 1000

    def __init__(self, interval: float = 30.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._kinds: dict[tuple[str, int, object], tuple[float, int]] = {}  # → last let through, held

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, record.msg)
        now = self.clock()
        if len(self._kinds) > self.MAX_KINDS:  # messages built without a template are each a kind
            self._kinds.clear()
        last, held = self._kinds.get(kind, (-float("inf"), 0))
        if now - last < self.interval:
            self._kinds[kind] = (last, held + 1)
            return False
        self._kinds[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like this held back)", None
        return True


def limit_repeating_lines(names: tuple[str, ...] = REPEATING_LOGGERS) -> None:
    """Install a RepeatLimiter on each named logger, once per process."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatLimiter) for f in logger.filters):
            logger.addFilter(RepeatLimiter())
