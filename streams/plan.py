"""Spreading subscribed streams over connections within the exchange's and the config's limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streams.exchanges.base import DataType, ExchangeAdapter, Instrument


@dataclass(frozen=True)
class ConnectionPlan:
    """One WebSocket connection: its group number, URL path and the streams it carries."""

    group: int
    route: str
    streams: tuple[str, ...]


class PlanError(ValueError):
    pass


def plan_connections(
    adapter: ExchangeAdapter,
    instruments: Sequence[Instrument],
    data_types: Sequence[DataType],
    *,
    max_connections: int,
    streams_per_connection: int,
) -> list[ConnectionPlan]:
    per_connection = min(streams_per_connection, adapter.limits.max_streams_per_connection)
    by_route: dict[str, list[str]] = {}
    for instrument in instruments:
        for data_type in data_types:
            stream = adapter.stream_name(instrument, data_type)
            by_route.setdefault(adapter.route(data_type), []).append(stream)
    plans: list[ConnectionPlan] = []
    for route, streams in by_route.items():
        for start in range(0, len(streams), per_connection):
            plans.append(ConnectionPlan(len(plans), route, tuple(streams[start : start + per_connection])))
    if len(plans) > max_connections:
        needed = sum(len(streams) for streams in by_route.values())
        raise PlanError(
            f"{adapter.name}: {needed} streams need {len(plans)} connections of at most "
            f"{per_connection} streams, but connections.max is {max_connections}"
        )
    return plans
