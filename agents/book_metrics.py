"""Order book metrics (README, "Metrics"), in the registry of agents/metrics.py.

Counters are counted by the normalize agents as the engine reports resyncs and crossed books; the
gauges are computed at scrape time from the books each normalize agent of this worker holds, so a
book this worker no longer owns (partitions moved, depth unsubscribed) stops being reported at once.
The names are the ones deploy/prometheus/collector-recording-rules.yml and the alert rules read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agents.metrics import REGISTRY, now_ms

BookAges = Callable[[int], Iterable[tuple[str, str, float]]]  # now → (symbol, state, age seconds)
STATES = ("synced", "syncing")

BOOK_RESYNCS = Counter(
    "collector_book_resyncs",
    "Order books that started syncing (again), by reason: start, rebalance, new-connection, lost-frames, "
    "sequence-break, stale-snapshot, crossed-book, invalid-item, book-short.",
    ["exchange", "reason"],
    registry=REGISTRY,
)
BOOKS_CROSSED = Counter(
    "collector_books_crossed",
    "Crossed order books found (a diff that crossed the book, a crossed whole book or snapshot); each "
    "is dead-lettered and the book resynced.",
    ["exchange"],
    registry=REGISTRY,
)

_sources: dict[str, BookAges] = {}


def register_books(exchange: str, ages: BookAges) -> None:
    """The books of one exchange's normalize agent (replacing an earlier agent's)."""
    _sources[exchange] = ages


def book_resynced(exchange: str, reason: str) -> None:
    BOOK_RESYNCS.labels(exchange, reason).inc()


def book_crossed(exchange: str) -> None:
    BOOKS_CROSSED.labels(exchange).inc()


class BookGauges(Collector):
    """`collector_books{exchange,state}` and `collector_book_age_seconds{exchange,symbol}`."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        books = GaugeMetricFamily(
            "collector_books",
            "Order books this worker keeps, by state (synced, syncing).",
            labels=["exchange", "state"],
        )
        ages = GaugeMetricFamily(
            "collector_book_age_seconds",
            "Seconds since the order book last applied an update (or, syncing, since it last had one).",
            labels=["exchange", "symbol"],
        )
        now = now_ms()
        for exchange, source in sorted(_sources.items()):
            counts = dict.fromkeys(STATES, 0)
            for symbol, state, age in source(now):
                counts[state] = counts.get(state, 0) + 1
                ages.add_metric([exchange, symbol], age)
            for state, count in counts.items():
                books.add_metric([exchange, state], count)
        yield books
        yield ages

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("collector_books", "", labels=["exchange", "state"])
        yield GaugeMetricFamily("collector_book_age_seconds", "", labels=["exchange", "symbol"])


REGISTRY.register(BookGauges())
