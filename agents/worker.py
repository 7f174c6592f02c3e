"""The composition root: one function builds a complete worker from its config.

Every part gets what it needs passed in here, so nothing is wired on import and nothing depends on
import order. `build_app` is used by `collector worker` (agents/cli.py) and by `faust -A agents.app
worker`; with `kafka.brokers: embedded` the app starts the embedded broker itself, first thing when
it starts, and stops it last.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from agents import faust_patches, metrics
from agents.adapters import AdapterDirectory
from agents.broker_watch import BrokerWatch
from agents.control import Control, install_control
from agents.distribution import install_distribution
from agents.embedded_broker import EmbeddedBroker, PortClaim, free_port
from agents.pipeline import Pipeline, install_pipeline
from agents.sinks import Sinks, build_sinks, install_sink_views
from agents.sinks.health import RedisReachability
from agents.state import Manager, StateAgents, event_emitter, install_state, recovery_sender
from streams.app import APP_ID, faust_settings
from streams.config import EMBEDDED_BROKER_PORT, CollectorConfig
from streams.logs import limit_repeating_lines
from tables.books import install_book_views
from tables.manager import ManagerSettings
from tables.store import StateStore
from tables.subscriptions import Subscriptions, install_subscription_views
from tables.views import StateViews, install_views

log = logging.getLogger(__name__)

# How long a stopping worker waits for the broker to acknowledge what its streams are still working
# on, and for it to take the buffered table changes and events. A rebalance waits for all of it
# (Faust's own wait); a stop whose broker is gone waited forever.
STOP_WAIT_SECONDS = 8.0
# A stop still not done this long after it began is stuck (Faust's and aiokafka's own stops wait for
# a broker that is gone): the worker exits with STUCK_STOP_EXIT_CODE. Within Kubernetes' default grace.
STOP_DEADLINE_SECONDS = 30.0
STUCK_STOP_EXIT_CODE = 3

EMBEDDED_BROKER_LIMITS = (
    "the embedded broker is for a single machine: it keeps every market record in memory (about"
    " 250 MB per million) and each fetch of a market topic gets slower as the topic grows; run a"
    " Kafka cluster (kafka.brokers) for production (README, 'The embedded broker')"
)


def _tune_interpreter() -> None:
    """Two interpreter settings that shorten the worker's latency tail (docs/benchmarks.md)."""
    # The modules and objects loaded so far live as long as the process: frozen, the collector's
    # full collections no longer walk them (p99 receipt→CreateTime 79-92 → 56-62 ms at 10 k/s).
    gc.freeze()
    # Faust's consumer runs in its own thread; with the default 5 ms switch interval every hand-over
    # between it and the event loop could wait that long for the GIL (p99 66 → 48-58 ms).
    sys.setswitchinterval(0.001)


class CollectorApp(faust.App):
    """The Faust app of one worker; owns the embedded broker when the config asks for one."""

    def __init__(self, config: CollectorConfig, embedded: EmbeddedBroker | None, **settings: Any) -> None:
        super().__init__(APP_ID, autodiscover=False, **settings)
        self.collector_config = config
        self.embedded_broker = embedded
        self.sinks: Sinks | None = None  # set by build_app; its `health` feeds /health and /sinks
        self.pipeline: Pipeline | None = None  # set by build_app on a worker that collects
        # host:port list every other Kafka client of this worker connects to (the embedded broker's
        # actual address when it runs one).
        self.bootstrap_servers = (
            [embedded.bootstrap] if embedded is not None else config.kafka.bootstrap_servers
        )
        # How long the Faust consumer's fetches may wait (agents/faust_patches.py): short where raw
        # topics are read back through it, longer where nothing latency-bound is.
        reads_raw = config.collection and embedded is None
        self.fetch_max_wait_ms = (
            faust_patches.FETCH_MAX_WAIT_MS if reads_raw else faust_patches.RELAXED_FETCH_MAX_WAIT_MS
        )
        self.stopping_worker = False  # set when the worker's stop begins (not at a rebalance)
        self.stop_deadline: threading.Timer | None = None  # exits the process if the stop gets stuck

    async def on_first_start(self) -> None:
        # Before the producer and consumer (children of the app) start connecting to it.
        if self.embedded_broker is not None:
            self.embedded_broker.start()
            log.info("embedded broker listening on %s", self.embedded_broker.bootstrap)
            log.warning(EMBEDDED_BROKER_LIMITS)
        if self.in_worker:
            _tune_interpreter()
        await super().on_first_start()

    async def on_stop(self) -> None:
        self.stopping_worker = True  # before Faust's own stop, which waits for the streams
        if self.in_worker and self.stop_deadline is None:
            self.stop_deadline = _exit_unless_stopped_within(STOP_DEADLINE_SECONDS)
        await super().on_stop()

    # The next two override Faust 0.15.3's own steps of a stop (and of a rebalance, left as they are).
    # tests/test_e2e_stop.py fails if the first is no longer called (its last commit never returns
    # without a broker); the stop deadline bounds both in any case.
    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        if not self.stopping_worker:  # a rebalance: wait for every open record
            await super()._consumer_wait_empty(consumer, logger)
            return
        # Their offsets stay uncommitted: whoever runs their partitions next normalizes them again.
        await _within_stop_bound(
            super()._consumer_wait_empty(consumer, logger),
            lambda: (
                f"the consumer's last commit, and {len(consumer._unacked_messages)} raw records whose"
                " market records are not acknowledged; what is not committed is normalized again where"
                " its partitions go next"
            ),
        )

    async def _producer_flush(self, logger: Any) -> None:
        if not self.stopping_worker:
            await super()._producer_flush(logger)
            return
        await _within_stop_bound(
            super()._producer_flush(logger),
            lambda: "the broker did not take the table changes and events still buffered; dropped",
        )

    async def maybe_start_producer(self) -> Any:
        # Faust asks this before every record it publishes (each table change is a changelog record),
        # and its stampede guard yields to the event loop three times per call: three more loop turns
        # for every record, once the producer has long been running.
        if not self.in_transaction and self.producer.started:
            return self.producer
        return await super().maybe_start_producer()

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        if self.stop_deadline is not None:
            self.stop_deadline.cancel()
        # Last: the producer and the agents have flushed into it by now.
        if self.embedded_broker is not None:
            self.embedded_broker.stop()


async def _within_stop_bound(work: Awaitable[None], left: Callable[[], str]) -> None:
    """Await a stopping worker's flush for STOP_WAIT_SECONDS at most; past that, say what is left."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_SECONDS)
    if done:
        task.result()
        return
    what = left()  # before the cancel: what was still waiting
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)  # a flush that ignores its cancel is left behind
    log.warning("stopping: no answer from the broker for %.0f s: %s", STOP_WAIT_SECONDS, what)


def _exit_unless_stopped_within(seconds: float) -> threading.Timer:
    """A thread, so that it fires however stuck the event loop's stop is."""

    def stuck() -> None:
        log.error(
            "stopping: not stopped %.0f s after the stop began (a Kafka client still waits for a broker"
            " that does not answer); exiting with code %d", seconds, STUCK_STOP_EXIT_CODE,
        )  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(STUCK_STOP_EXIT_CODE)

    timer = threading.Timer(seconds, stuck)
    timer.daemon = True
    timer.start()
    return timer


def embedded_broker_for(config: CollectorConfig) -> EmbeddedBroker | None:
    """The broker to start when none is configured: 127.0.0.1:9092, or a free port if that is taken
    (or claimed by another worker starting on this host at the same time)."""
    if not config.kafka.embedded:
        return None
    claim = PortClaim.take(EMBEDDED_BROKER_PORT)
    if claim is not None and _port_is_free(EMBEDDED_BROKER_PORT):
        return EmbeddedBroker(port=EMBEDDED_BROKER_PORT, claim=claim)
    if claim is not None:
        claim.release()
    return EmbeddedBroker(port=free_port())


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def build_app(config: CollectorConfig) -> CollectorApp:
    """A complete worker: state tables and views, subscriptions and control, sources and normalize
    agents (unless `collection` is off), the configured sinks, live distribution to WebSocket clients,
    metrics."""
    faust_patches.apply()
    limit_repeating_lines()
    embedded = embedded_broker_for(config)
    bootstrap = [embedded.bootstrap] if embedded is not None else config.kafka.bootstrap_servers
    app = CollectorApp(config, embedded, **faust_settings(config, bootstrap))
    worker_name = f"{socket.gethostname()}:{config.server.port}"

    store = StateStore(app, worker_name)
    emit_event = event_emitter(store)
    adapters = AdapterDirectory(config.exchanges, emit_event)
    if config.collection:  # a follower needs no instrument lists
        app.service(adapters)  # type: ignore[arg-type]  # an instance: Faust starts it as is
    frames_heard: dict[str, Any] = {}

    subscriptions = Subscriptions(
        app, config.exchanges, group_report=lambda: control.ownership.report() if control else {}
    )
    install_subscription_views(app, subscriptions)
    control: Control | None = None
    if config.collection:
        control = Control(config.exchanges, subscriptions, adapters.get, emit_event)
        install_control(app, control)

    state_agents = StateAgents(config, store, adapters.get if config.collection else None, frames_heard)
    manager = Manager(
        ManagerSettings.from_alerts(config.monitoring.alerts), store, emit_event,
        recovery_sender(app, subscriptions), config.monitoring.alerts.webhookUrl,
    )  # fmt: skip
    install_state(app, state_agents, manager)
    sinks = build_sinks(config, bootstrap, APP_ID)  # none configured: an empty service
    app.sinks = sinks
    app.service(sinks)  # type: ignore[arg-type]  # an instance: Faust starts it as is
    install_sink_views(app, sinks.health)
    health = sinks.health if sinks.services else None
    watch = None
    if embedded is not None:
        watch = BrokerWatch(embedded.exit_code, lambda: embedded.pid)
        app.service(watch)  # type: ignore[arg-type]  # an instance: Faust starts it as is
    views = StateViews(
        app, config, store, health, local_spool=metrics.spool_usage,
        local_reasons=watch.reasons if watch is not None else None,
    )  # fmt: skip
    install_views(app, views)

    local_book = None
    if control is not None:
        pipeline = Pipeline(
            app,
            config,
            adapters,
            emit_event,
            control.ownership,
            frames_heard,
            bootstrap,
            embedded is not None,
        )
        install_pipeline(app, pipeline)
        app.pipeline = pipeline

        def local_book(exchange: str, symbol: str, levels: int) -> dict[str, Any] | None:
            normalizer = pipeline.normalizers.get(exchange)
            return None if normalizer is None else normalizer.book_view(symbol, levels)

    install_book_views(app, config, subscriptions, local_book)

    redis_sink = config.sinks.redis
    redis_state = RedisReachability(redis_sink.url) if redis_sink is not None else None
    install_distribution(app, config, bootstrap, redis_state)  # every worker serves clients, followers too
    return app
