"""The Faust tables of coin, connector, collector and alert state, and the topics that feed them.

All state topics have one partition keyed by exchange, and so do the tables (Faust writes a table
change to the partition of the record being processed): the tables are co-partitioned with their
sources, and every key lives on the worker that owns partition 0. Other workers keep standby copies
and forward table-backed web requests to the owner.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from streams.app import app, config
from streams.topics import EVENTS
from tables.records import ALERTS, FLOW
from tables.state import Row, Tables

STATE_PARTITIONS = 1
WORKER = f"{socket.gethostname()}:{config.server.port}"  # names this worker in flow summaries and views
RECENT_ALERTS = "recent"  # the one key of the alerts table

# Keys are strings, values JSON objects (the app's default value serializer).
_options: dict[str, Any] = {"partitions": STATE_PARTITIONS, "key_type": str}
coins = app.Table("state-coins", help="Coin state and flow, key exchange:symbol", **_options)
connectors = app.Table("state-connectors", help="Connector (connection group) state", **_options)
collectors = app.Table("state-collectors", help="Collector state per exchange", **_options)
alerts = app.Table("state-alerts", help="Open and recent alerts", **_options)

# internal: Faust creates them (with one partition) before subscribing; a topic the broker created
# on first use would get the broker's default partition count and break co-partitioning.
_topic_options: dict[str, Any] = {
    "partitions": STATE_PARTITIONS,
    "key_serializer": "raw",
    "value_serializer": "raw",
    "internal": True,
}
events_topic = app.topic(EVENTS, **_topic_options)
flow_topic = app.topic(FLOW, **_topic_options)
alerts_topic = app.topic(ALERTS, **_topic_options)


def rows(table: Any) -> Iterator[Row]:
    for value in table.values():
        if isinstance(value, dict):
            yield value


def current_tables() -> Tables:
    return Tables(
        coin=coins.get,
        connector=connectors.get,
        collector=collectors.get,
        connectors_of=lambda exchange: [row for row in rows(connectors) if row.get("exchange") == exchange],
    )


def owns_state() -> bool:
    """Whether this worker holds the active (not standby) partition of the state tables."""
    topic = coins.changelog_topic.get_topic_name()
    return any(tp.topic == topic for tp in app.assignor.assigned_actives())
