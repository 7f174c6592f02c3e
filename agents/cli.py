"""`collector`: the Faust app's command line, plus `simulate` and `demo`.

`collector worker` starts the embedded broker first when no brokers are configured, and stops it
when the worker exits (Ctrl-C, SIGTERM, or an error).
"""

from __future__ import annotations

import gc
import os
import socket
import sys

from agents.embedded_broker import EmbeddedBroker
from streams.config import EMBEDDED_BROKER_PORT, ConfigError, load_config

USAGE_EXTRA = """
Exchange Collector commands (besides Faust's):
  collector worker      run a worker (starts the embedded broker when no brokers are configured)
  collector simulate    run the local exchange simulator alone (see `collector simulate --help`)
  collector demo        run simulator, embedded broker and a worker together
  collector tail TOPIC  print a topic's records (--from-beginning, -n COUNT, --brokers)
  collector subscribe EXCHANGE SYMBOL DATA_TYPE...    subscribe at runtime (e.g. binance BTC/USDT trade)
  collector unsubscribe EXCHANGE SYMBOL DATA_TYPE...  unsubscribe at runtime
"""


EMBEDDED_BROKER_LIMITS = (
    "collector: the embedded broker is for tests and demos: it keeps every record and its fetches slow"
    " down as partitions fill, so a busy worker falls behind within minutes (docs/benchmarks.md,"
    " 'How long the embedded broker lasts'); configure kafka.brokers for real use"
)


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _tune_interpreter() -> None:
    """Two interpreter settings that shorten the worker's latency tail (docs/benchmarks.md)."""
    # The modules and objects loaded so far live as long as the process: frozen, the collector's
    # full collections no longer walk them (p99 receipt→CreateTime 79-92 → 56-62 ms at 10 k/s).
    gc.freeze()
    # Faust's consumer runs in its own thread; with the default 5 ms switch interval every hand-over
    # between it and the event loop could wait that long for the GIL (p99 66 → 48-58 ms).
    sys.setswitchinterval(0.001)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    if command == "simulate":
        from simulator.__main__ import main as simulate

        return simulate(args[1:])
    if command == "demo":
        from agents.demo import main as demo

        return demo(args[1:])
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"collector: configuration error: {exc}", file=sys.stderr)
        return 2
    if command == "tail":
        from agents.tail import main as tail

        return tail(args[1:], ",".join(config.kafka.bootstrap_servers))
    if command in {"subscribe", "unsubscribe"}:
        from agents.subscribe import main as subscribe

        return subscribe("subscribe" if command == "subscribe" else "unsubscribe", args[1:], config)
    broker: EmbeddedBroker | None = None
    if command == "worker" and config.kafka.embedded:
        port = EMBEDDED_BROKER_PORT if _port_is_free(EMBEDDED_BROKER_PORT) else None
        try:
            broker = EmbeddedBroker(port=port).start()
        except RuntimeError as exc:
            print(f"collector: {exc}", file=sys.stderr)
            return 1
        os.environ["COLLECTOR_KAFKA_BROKERS"] = broker.bootstrap
        print(f"collector: embedded broker listening on {broker.bootstrap}", file=sys.stderr, flush=True)
        print(EMBEDDED_BROKER_LIMITS, file=sys.stderr, flush=True)
    try:
        import agents.pipeline  # noqa: F401 - registers the agents and services with the app
        from streams.app import app

        sys.argv = ["collector", *args]
        if command == "worker":
            _tune_interpreter()
        if not args or command in {"--help", "-h"}:
            print(USAGE_EXTRA, file=sys.stderr)
        app.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
