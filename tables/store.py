"""The Faust tables of coin, connector, collector and alert state, and the topics that feed them.

All state topics have one partition keyed by exchange, and so do the tables (Faust writes a table
change to the partition of the record being processed): the tables are co-partitioned with their
sources, and every key lives on the worker that owns partition 0. Other workers keep standby copies
and forward table-backed web requests to the owner.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust

from streams.topics import EVENTS
from tables.records import ALERTS, FLOW
from tables.state import Row, Tables

STATE_PARTITIONS = 1
RECENT_ALERTS = "recent"  # the one key of the alerts table


def rows(table: Any) -> Iterator[Row]:
    for value in table.values():
        if isinstance(value, dict):
            yield value


class StateStore:
    """One worker's state tables and the topics they are built from."""

    def __init__(self, app: faust.App, worker: str) -> None:
        self.app = app
        self.worker = worker  # names this worker in flow summaries and views
        # Keys are strings, values JSON objects (the app's default value serializer).
        options: dict[str, Any] = {"partitions": STATE_PARTITIONS, "key_type": str}
        self.coins = app.Table("state-coins", help="Coin state and flow, key exchange:symbol", **options)
        self.connectors = app.Table("state-connectors", help="Connector (connection group) state", **options)
        self.collectors = app.Table("state-collectors", help="Collector state per exchange", **options)
        self.alerts = app.Table("state-alerts", help="Open and recent alerts", **options)
        # internal: Faust creates them (with one partition) before subscribing; a topic the broker
        # created on first use would get the broker's default partition count and break co-partitioning.
        topic_options: dict[str, Any] = {
            "partitions": STATE_PARTITIONS,
            "key_serializer": "raw",
            "value_serializer": "raw",
            "internal": True,
        }
        self.events_topic = app.topic(EVENTS, **topic_options)
        self.flow_topic = app.topic(FLOW, **topic_options)
        self.alerts_topic = app.topic(ALERTS, **topic_options)

    def current_tables(self) -> Tables:
        connectors = self.connectors
        return Tables(
            coin=self.coins.get,
            connector=connectors.get,
            collector=self.collectors.get,
            connectors_of=lambda exchange: [
                row for row in rows(connectors) if row.get("exchange") == exchange
            ],
        )

    def recent_alerts(self) -> dict[str, Any]:
        return self.alerts.get(RECENT_ALERTS) or {}

    def owns_state(self) -> bool:
        """Whether this worker holds the active (not standby) partition of the state tables."""
        topic = self.coins.changelog_topic.get_topic_name()
        return any(tp.topic == topic for tp in self.app.assignor.assigned_actives())
