"""The Faust app's settings, built from the configuration contract.

Nothing here builds an app on import: the composition root (agents/worker.py) builds one worker
from its config, and `agents.app` is the module `faust -A` names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from streams.config import CollectorConfig
from streams.logs import logging_config

APP_ID = "exchange-collector"
# Raw topics have as many partitions as `collector.commands`: Faust's assignor gives partition n of
# topics with the same partition count to the same worker, so the worker that runs connection group n
# also normalizes its raw partition (tables/subscription_rules.py).
RAW_PARTITIONS = 8


def broker_urls(bootstrap_servers: list[str]) -> str:
    return ";".join(f"kafka://{broker}" for broker in bootstrap_servers)


def faust_settings(config: CollectorConfig, bootstrap_servers: list[str]) -> dict[str, Any]:
    producer = config.kafka.producer
    return {
        "broker": broker_urls(bootstrap_servers),
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
