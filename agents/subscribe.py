"""`collector subscribe|unsubscribe EXCHANGE SYMBOL DATA_TYPE...`: produce a subscription command.

The command goes to its connection group's partition of `collector.commands`; the worker owning
that partition applies it. By default the command line then waits for the worker's answer on
`collector.events` (`subscription-changed`, `subscription-unchanged` or `subscribe-rejected`).

Exit codes: 0 applied, 1 rejected or not delivered, 2 bad arguments, 3 queued but no worker answered
within --wait seconds (the command stays queued and is applied when a worker takes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.commands import SubscriptionCommand, encode_command
from streams.config import CollectorConfig
from streams.topics import COMMANDS, EVENTS
from tables.subscription_rules import (
    COMMANDS_PARTITIONS,
    Action,
    RequestError,
    check_request,
    group_of,
    group_partition,
    groups_per_exchange,
    new_command,
)

ANSWERS = {"subscription-changed", "subscription-unchanged", "subscribe-rejected"}
METADATA_TIMEOUT = 10.0


class CommandFailed(RuntimeError):
    pass


def _parser(action: Action, default_brokers: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"collector {action}",
        description=f"{action.capitalize()} data types of one symbol at runtime.",
        epilog="example: collector subscribe binance BTC/USDT trade kline_1m",
    )
    parser.add_argument("exchange", help="a configured exchange, e.g. binance")
    parser.add_argument("symbol", help="BASE/QUOTE, e.g. BTC/USDT (or btc-usdt)")
    parser.add_argument(
        "data_types", nargs="+", metavar="DATA_TYPE", help="trade, ticker, bbo, kline_1m, ..."
    )
    parser.add_argument("--brokers", default=default_brokers, help="host:port[,host:port]")
    parser.add_argument(
        "--wait", type=float, default=15.0, help="seconds to wait for a worker's answer (0: do not wait)"
    )
    return parser


def ensure_commands_topic(brokers: str) -> None:
    """Create `collector.commands` with its partition count if no worker has yet; refuse a wrong one."""
    admin = AdminClient({"bootstrap.servers": brokers})
    topic = admin.list_topics(COMMANDS, timeout=METADATA_TIMEOUT).topics.get(COMMANDS)
    if topic is not None and topic.error is None and topic.partitions:
        if len(topic.partitions) != COMMANDS_PARTITIONS:
            raise CommandFailed(
                f"{COMMANDS} has {len(topic.partitions)} partitions; "
                f"the collector needs {COMMANDS_PARTITIONS}"
            )
        return
    futures = admin.create_topics(
        [NewTopic(COMMANDS, COMMANDS_PARTITIONS, 1)], request_timeout=METADATA_TIMEOUT
    )
    try:
        futures[COMMANDS].result(timeout=METADATA_TIMEOUT)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a worker created it meanwhile: fine
            raise CommandFailed(f"cannot create {COMMANDS}: {exc}") from None


class AnswerWatcher:
    """Reads `collector.events` from its current end, looking for the answer to one command."""

    def __init__(self, brokers: str) -> None:
        self.consumer = Consumer(
            {"bootstrap.servers": brokers, "group.id": "collector-subscribe", "enable.auto.commit": False}
        )
        topic = self.consumer.list_topics(EVENTS, timeout=METADATA_TIMEOUT).topics.get(EVENTS)
        self.available = topic is not None and topic.error is None and bool(topic.partitions)
        if self.available:
            # Start at today's end offsets, resolved now: an answer written right after we produce
            # must not fall before a lazily resolved "end".
            partitions = []
            for partition in topic.partitions:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(EVENTS, partition), timeout=METADATA_TIMEOUT
                )
                partitions.append(TopicPartition(EVENTS, partition, high))
            self.consumer.assign(partitions)

    def wait(self, command_id: str, seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while self.available and time.monotonic() < deadline:
            message = self.consumer.poll(min(0.5, max(deadline - time.monotonic(), 0.01)))
            if message is None or message.error():
                continue
            try:
                event = json.loads(message.value() or b"{}")
            except ValueError:
                continue
            detail = event.get("detail") or {}
            if event.get("type") in ANSWERS and detail.get("commandId") == command_id:
                return dict(event)
        return None

    def close(self) -> None:
        self.consumer.close()


def produce(brokers: str, command: SubscriptionCommand, partition: int) -> None:
    producer = Producer({"bootstrap.servers": brokers})
    problems: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            problems.append(str(error))

    producer.produce(
        COMMANDS, encode_command(command), command.symbol.encode(), partition, on_delivery=delivered
    )
    remaining = producer.flush(METADATA_TIMEOUT)
    if remaining or problems:
        raise CommandFailed(f"the command was not delivered: {', '.join(problems) or 'timed out'}")


def main(action: Action, argv: list[str], config: CollectorConfig) -> int:
    prog = f"collector {action}"
    args = _parser(action, ",".join(config.kafka.bootstrap_servers)).parse_args(argv)
    try:
        request = check_request(args.exchange, args.symbol, args.data_types, config.exchanges)
    except RequestError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    command = new_command(action, request, time.time_ns() // 1_000_000)
    groups = groups_per_exchange(config.exchanges[request.exchange].connections.max)
    group = group_of(request.exchange, request.symbol, groups)
    watcher: AnswerWatcher | None = None
    try:
        ensure_commands_topic(args.brokers)
        watcher = AnswerWatcher(args.brokers) if args.wait > 0 else None
        produce(args.brokers, command, group_partition(group))
        what = f"{action} {request.exchange} {request.symbol} {' '.join(request.data_types)}"
        print(f"{prog}: queued {what} as command {command.command_id} (group {group})", flush=True)
        if watcher is None:
            return 0
        answer = watcher.wait(command.command_id, args.wait)
    except (CommandFailed, KafkaException) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        if watcher is not None:
            watcher.close()
    if answer is None:
        print(f"{prog}: no worker answered within {args.wait:g} s; the command stays queued", file=sys.stderr)
        return 3
    detail = answer.get("detail") or {}
    if answer["type"] == "subscribe-rejected":
        print(f"{prog}: rejected: {detail.get('reason')}", file=sys.stderr)
        return 1
    now = ", ".join(detail.get("subscribed") or []) or "nothing"
    change = "applied" if answer["type"] == "subscription-changed" else "nothing to change"
    print(f"{prog}: {change}; {request.exchange} {request.symbol} now has: {now}")
    return 0
