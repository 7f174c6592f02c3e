"""`collector`: the Faust app's command line, plus `simulate`, `demo`, `tail`, `subscribe`, `unsubscribe`.

`collector worker` builds the worker with the composition root (agents/worker.py), exactly like
`faust -A agents.app worker`; `--no-collect` makes it a follower (`collection: false`).
"""

from __future__ import annotations

import sys

from streams.config import ConfigError, load_config

USAGE_EXTRA = """
Exchange Collector commands (besides Faust's):
  collector worker      run a worker (starts the embedded broker when no brokers are configured);
                        --no-collect: serve views, clients and sinks only, connect to no exchange
  collector simulate    run the local exchange simulator alone (see `collector simulate --help`)
  collector demo        run simulator, embedded broker and a worker together
  collector tail TOPIC  print a topic's records (--from-beginning, -n COUNT, --brokers)
  collector subscribe EXCHANGE SYMBOL DATA_TYPE...    subscribe at runtime (e.g. binance BTC/USDT trade)
  collector unsubscribe EXCHANGE SYMBOL DATA_TYPE...  unsubscribe at runtime
"""
NO_COLLECT = "--no-collect"
LOOP_OPTIONS = ("-L", "--loop")


def with_default_loop(args: list[str]) -> list[str]:
    """`collector worker` runs on uvloop where it is installed (about 6 % less CPU for a quiet worker,
    docs/benchmarks.md); `-L aio` (or any `--loop`) chooses otherwise."""
    if not args or args[0] != "worker" or any(a in LOOP_OPTIONS or a.startswith("--loop=") for a in args):
        return args
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return args
    return ["--loop", "uvloop", *args]


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
    if command == "worker" and NO_COLLECT in args:
        args = [arg for arg in args if arg != NO_COLLECT]
        config = config.model_copy(update={"collection": False})
    argv = with_default_loop(args)
    if argv[:2] == ["--loop", "uvloop"]:
        # Faust applies `--loop` when it is first imported, reading sys.argv: here the app (and so
        # Faust) comes before the command line it parses, so the loop is chosen before both.
        import mode.loop

        mode.loop.use("uvloop")
    from agents.worker import build_app

    app = build_app(config)
    sys.argv = ["collector", *argv]
    if not args or command in {"--help", "-h"}:
        print(USAGE_EXTRA, file=sys.stderr)
    try:
        app.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if app.embedded_broker is not None:
            app.embedded_broker.stop()  # idempotent; the app stops it itself on a clean shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())
