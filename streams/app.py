"""The Faust app object and its settings, built from the configuration contract.

Importing this module loads the configuration (COLLECTOR_CONFIG and the environment overrides).
The embedded broker is started by `collector worker` before this module is imported, which then
finds its address in COLLECTOR_KAFKA_BROKERS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import faust

from streams.config import CollectorConfig, load_config
from streams.logs import logging_config

APP_ID = "exchange-collector"
RAW_PARTITIONS = 4


def broker_urls(config: CollectorConfig) -> str:
    # With `embedded`, `collector worker` has started the broker and passed its address in
    # COLLECTOR_KAFKA_BROKERS; other commands look for a running one at the usual address.
    return ";".join(f"kafka://{broker}" for broker in config.kafka.bootstrap_servers)


def faust_settings(config: CollectorConfig) -> dict[str, Any]:
    producer = config.kafka.producer
    return {
        "broker": broker_urls(config),
        "store": "memory://",
        "web_port": config.server.port,
        "datadir": Path(tempfile.gettempdir()) / f"{APP_ID}-{config.server.port}",
        # The broker holds a group join for session_timeout / 2: Faust's 60 s default means ~31 s
        # before a worker is ready; 6 s gives ~4.5 s (reference/platform.md).
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "producer_linger": producer.lingerMs / 1000.0,
        "producer_compression_type": None if producer.compression == "none" else producer.compression,
        "producer_max_request_size": 8 * 1024 * 1024,
        "consumer_max_fetch_size": 8 * 1024 * 1024,
        "topic_partitions": RAW_PARTITIONS,
        "topic_replication_factor": 1,
        "consumer_auto_offset_reset": "earliest",
        # The embedded broker answers ListOffsets(LATEST) with the first offset of the last batch + 1
        # (reference/platform.md), so a standby table that applied the whole last batch looks ahead of
        # the changelog's end, and this check crashed a worker at a rebalance. The tables live in
        # memory: their offsets come from the changelog itself and cannot really be ahead of it.
        "recovery_consistency_check": False,
        "loglevel": config.logging.level.upper(),
        "logging_config": logging_config(config.logging),  # JSON lines when logging.format is json
    }


def create_app(config: CollectorConfig) -> faust.App:
    app = faust.App(APP_ID, autodiscover=False, **faust_settings(config))
    app.collector_config = config  # type: ignore[attr-defined]
    return app


config = load_config()
app = create_app(config)
