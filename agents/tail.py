"""`collector tail TOPIC`: print a topic's records, for a look at what the collector publishes."""

from __future__ import annotations

import argparse
import sys

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition


def main(argv: list[str], default_brokers: str) -> int:
    parser = argparse.ArgumentParser(prog="collector tail", description=__doc__)
    parser.add_argument("topic")
    parser.add_argument("--brokers", default=default_brokers, help="host:port[,host:port]")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("-n", "--count", type=int, default=0, help="stop after this many records")
    args = parser.parse_args(argv)
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": "collector-tail",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if args.from_beginning else "latest",
        }
    )
    shown = 0
    try:
        # Assigning partitions directly skips a consumer-group join, which the broker may hold for seconds.
        topic = consumer.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            print(f"collector tail: no topic {args.topic}", file=sys.stderr)
            return 1
        start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
        consumer.assign([TopicPartition(args.topic, p, start) for p in topic.partitions])
        while not args.count or shown < args.count:
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                print(f"collector tail: {message.error()}", file=sys.stderr)
                continue
            value = message.value() or b""
            print(value.decode("utf-8", errors="replace"), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    except KafkaException as exc:
        print(f"collector tail: {exc}", file=sys.stderr)
        return 1
    finally:
        consumer.close()
    return 0
