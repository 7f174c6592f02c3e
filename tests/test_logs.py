"""Structured JSON logs (streams/logs.py)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
from pathlib import Path

from streams.config import LoggingConfig
from streams.logs import JsonFormatter, RepeatLimiter, logging_config


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.getLogger("agents.test").makeRecord(
        "agents.test", logging.WARNING, __file__, 1, message, args, None, extra=extra or None
    )
    made.created = 1_700_000_000.123
    return made


def test_a_log_line_is_one_json_object_with_time_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(
        record("connection %s lost\nreconnecting", "binance-0", connector="binance-0")
    )
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.123+00:00",
        "level": "warning",
        "logger": "agents.test",
        "message": "connection binance-0 lost\nreconnecting",
        "connector": "binance-0",
    }


def test_an_exception_travels_in_its_own_field() -> None:
    try:
        raise ValueError("bad frame")
    except ValueError:
        made = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    document = json.loads(JsonFormatter().format(made))
    assert document["message"] == "failed"
    assert document["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: bad frame" in document["exception"]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    document = json.loads(JsonFormatter().format(record("x", path=Path("/tmp/a"), size=3)))
    assert document["path"] == "/tmp/a" and document["size"] == 3


def test_the_worker_logging_config_writes_json_lines_at_the_configured_level() -> None:
    assert logging_config(LoggingConfig(level="info", format="text")) is None
    config = logging_config(LoggingConfig(level="warning", format="json"))
    assert config is not None
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        logging.config.dictConfig(config)
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        logging.getLogger("agents.source").info("not at warning level")
        logging.getLogger("agents.source").warning("slow %s", "consumer", extra={"lag": 12})
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        document = json.loads(lines[0])
        assert (document["level"], document["logger"], document["message"], document["lag"]) == (
            "warning", "agents.source", "slow consumer", 12,
        )  # fmt: skip
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_a_repeating_line_goes_through_once_an_interval_and_then_says_how_many_were_held() -> None:
    """A broker that is gone makes the Kafka clients log the same failure tens of times a second."""
    now = [0.0]
    limiter = RepeatLimiter(interval=30.0, clock=lambda: now[0])
    passed = []
    for step in range(100):  # 10 s of a line every 0.1 s, then once 25 s later
        now[0] = step * 0.1
        made = record("Unable connect to node with id %s: %s", 111, "refused")
        if limiter.filter(made):
            passed.append(made.getMessage())
    other = record("kafka raw producer: %s", "all brokers down")
    assert limiter.filter(other)  # another kind of line is its own
    now[0] = 35.0
    late = record("Unable connect to node with id %s: %s", 111, "refused")
    assert limiter.filter(late)
    assert passed == ["Unable connect to node with id 111: refused"]
    assert late.getMessage() == "Unable connect to node with id 111: refused (99 more like this held back)"
