"""Market topics are created the first time a record goes to them, many in one request.

Faust's `Topic.maybe_declare` fetches the metadata of every topic in the cluster for each topic it
creates. With 1,000 symbols, trades and bbo, that is quadratic: decoding those answers took 60 % of
the worker for minutes after it subscribed, and every record waited behind it (docs/benchmarks.md).
Here the topics one normalize step needs go out in one CreateTopics request, through librdkafka.
"""

from __future__ import annotations

import asyncio
import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from agents.writer import LIBRDKAFKA_LOGGING

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # seconds, as Faust's own topic creation waits


class TopicDeclarer:
    """`declare(name)` returns once the topic exists; calls made together share one request."""

    def __init__(self, bootstrap_servers: str, partitions: int, replication: int = 1) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.partitions = partitions
        self.replication = replication
        self.requests = 0
        self._admin: AdminClient | None = None
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._creating: asyncio.Task[None] | None = None

    async def declare(self, name: str) -> None:
        future = self._pending.get(name)
        if future is None:
            future = self._pending[name] = asyncio.get_running_loop().create_future()
            if self._creating is None or self._creating.done():
                self._creating = asyncio.ensure_future(self._create_pending())
        await asyncio.shield(future)

    async def _create_pending(self) -> None:
        await asyncio.sleep(0)  # the other topics of the same step join this request
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await self._create(list(batch))
            except (RuntimeError, KafkaException) as exc:  # each caller gets the failure
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future in batch.values():
                if not future.done():
                    future.set_result(None)

    async def _create(self, names: list[str]) -> None:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, **LIBRDKAFKA_LOGGING})
        self.requests += 1
        topics = [NewTopic(name, self.partitions, self.replication) for name in names]
        try:
            futures = self._admin.create_topics(topics, request_timeout=REQUEST_TIMEOUT)
        except (KafkaException, ValueError) as exc:
            raise RuntimeError(f"cannot create topics {names[:3]}...: {exc}") from None
        for name, future in futures.items():
            try:
                await asyncio.wrap_future(future)
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise RuntimeError(f"cannot create topic {name}: {error}") from None
