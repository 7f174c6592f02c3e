"""Command line: `python -m simulator --port 8765 --symbols BTC/USDT,ETH/USDT --rate 10 --seed 1`.

Prints `simulator listening on http://HOST:PORT (ws://HOST:PORT)` once it accepts connections, so a
parent process can wait for that line, and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from simulator.server import DEFAULT_SYMBOLS, Simulator, SimulatorConfig


def parse_args(argv: list[str] | None) -> SimulatorConfig:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="A local exchange speaking Binance spot's WebSocket and REST protocols.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    parser.add_argument("--symbols", default=",".join(DEFAULT_SYMBOLS), help="comma-separated BASE/QUOTE")
    parser.add_argument("--rate", type=float, default=10.0, help="trades per second per symbol")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds between server pings")
    parser.add_argument("--pong-timeout", type=float, default=60.0, help="seconds a client has to pong")
    parser.add_argument("--history-limit", type=int, default=None, help="trades kept per symbol")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    symbols = [symbol.strip() for symbol in args.symbols.split(",") if symbol.strip()]
    if not symbols:
        parser.error("--symbols must name at least one BASE/QUOTE symbol")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        symbols=symbols,
        trades_per_second=args.rate,
        seed=args.seed,
        ping_interval=args.ping_interval,
        pong_timeout=args.pong_timeout,
        history_limit=args.history_limit,
    )


async def serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    simulator = Simulator(config)
    try:
        port = await simulator.start()
        print(f"simulator listening on http://{config.host}:{port} (ws://{config.host}:{port})", flush=True)
        await stop.wait()
    finally:
        await simulator.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        asyncio.run(serve(config))
    except ValueError as error:  # a bad symbol list, for instance
        print(f"simulator: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the port is taken, for instance
        print(f"simulator: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
