"""ProduceSender without a broker (its requests are tested in tests/test_aiokafka_delivery.py against
the embedded broker): a client whose node never becomes ready, as when the broker is gone."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import errors as Errors

from agents.metrics import now_ms
from agents.produce_sender import ProduceSender
from streams.logs import RepeatLimiter


class GoneBroker:
    """aiokafka's client as the sender uses it, for a broker that never answers."""

    def __init__(self) -> None:
        self.cluster = SimpleNamespace(leader_for_partition=lambda tp: 1)
        self.requests = 0

    async def send(self, node: int, request: Any) -> Any:
        self.requests += 1
        raise Errors.NodeNotReadyError(f"node {node} is not ready")

    def force_metadata_update(self) -> None:
        pass


async def test_retries_while_the_broker_is_gone_are_logged_once_an_interval_through_the_repeat_filter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the broker gone a batch is tried again every 100 ms: one line per interval, naming the
    error, until the request timeout settles the batch as failed."""
    client = GoneBroker()
    producer = SimpleNamespace(client=client, _message_accumulator=SimpleNamespace(_compression_type=0))
    settled: list[BaseException | None] = []
    sender = ProduceSender(
        producer,  # type: ignore[arg-type]
        1024, 1000, lambda batch, error, offset: settled.append(error), lambda: None,
    )  # fmt: skip
    limiter = RepeatLimiter(interval=30.0)
    logger = logging.getLogger("agents.produce_sender")
    logger.addFilter(limiter)
    try:
        with caplog.at_level(logging.WARNING, "agents.produce_sender"):
            sender.enqueue("market.trade.gone.btc-usdt", 0, [(b"k", b"v", now_ms(), None)])
            sender.pump()
            for _ in range(100):  # the request timeout (1 s) settles it after ~10 tries
                if settled:
                    break
                await asyncio.sleep(0.05)
    finally:
        logger.removeFilter(limiter)
    lines = [record.getMessage() for record in caplog.records]
    assert settled and isinstance(settled[0], Errors.NodeNotReadyError) and client.requests >= 5
    assert len(lines) == 1, lines
    assert lines[0].startswith("kafka producer: 1 batches are tried again"), lines
    assert "NodeNotReadyError" in lines[0]
