"""ProduceSender's own bookkeeping, without a broker (its requests are tested in
tests/test_aiokafka_delivery.py against the embedded broker)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from aiokafka import errors as Errors

from agents.produce_sender import ProduceSender


def test_retries_are_logged_at_most_once_an_interval_with_what_came_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the broker gone a retry comes every 100 ms: one line per interval, counting them all."""
    producer = SimpleNamespace(client=None, _message_accumulator=SimpleNamespace(_compression_type=0))
    sender = ProduceSender(producer, 1024, 1000, lambda *_: None, lambda: None)  # type: ignore[arg-type]
    gone = Errors.NodeNotReadyError("node 1 is not ready")
    with caplog.at_level(logging.WARNING, "agents.produce_sender"):
        for _ in range(50):
            sender._log_retries(4, gone)
        sender._retry_logged_at -= ProduceSender.RETRY_LOG_INTERVAL  # an interval later
        sender._log_retries(2, None)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("kafka producer: 4 batches tried again") and "NodeNotReadyError" in lines[0]
    assert lines[1].startswith("kafka producer: 198 batches tried again"), lines[1]
