"""The broker end-to-end tests share (tests/conftest.py's `shared_broker`), and its one rule: a test
writes only topics no other test has written."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import EmbeddedBroker, _answers_kafka


class SharedBroker:
    """One embedded broker for the tests of one process, and which test first wrote each topic."""

    def __init__(self) -> None:
        self.broker: EmbeddedBroker | None = None
        self.owners: dict[str, str] = {}  # topic → the test that first wrote it

    def running(self) -> EmbeddedBroker:
        """The broker, started on first use; a fresh one if a test stopped it (and failed for it)."""
        if self.broker is None or not self.answers():
            self.stop()
            self.broker = EmbeddedBroker().start()
            self.owners.clear()
        return self.broker

    def answers(self) -> bool:
        broker = self.broker
        return broker is not None and broker.pid is not None and _answers_kafka(broker.host, broker.port)

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def end_offsets(self) -> dict[str, int]:
        """Topic → the sum of its partitions' end offsets."""
        assert self.broker is not None
        consumer = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": "test-end-offsets"})
        try:
            ends = {}
            for name, metadata in consumer.list_topics(timeout=10).topics.items():
                if not name.startswith("__"):
                    ends[name] = sum(
                        consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                        for p in metadata.partitions
                    )
            return ends
        finally:
            consumer.close()

    def claim(self, written: set[str], test: str) -> dict[str, str]:
        """`test` wrote these topics: it owns those nobody wrote before; returns topic → owner of the
        ones another test wrote first."""
        for topic in written:
            self.owners.setdefault(topic, test)
        return {topic: self.owners[topic] for topic in sorted(written) if self.owners[topic] != test}
