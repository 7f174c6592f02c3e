"""`collector demo`: the simulator, the embedded broker and a worker together, for a first look."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from agents.embedded_broker import die_with_parent, free_port
from agents.sinks.localservers import LocalPostgres, LocalRedis

DEMO_SYMBOLS = ["BTC/USDT", "ETH/USDT", "BNB/USDT"]
DEMO_DATA_TYPES = ["trade", "kline_1s", "kline_1m", "ticker", "bbo"]
KRW_SYMBOLS = [symbol.replace("/USDT", "/KRW") for symbol in DEMO_SYMBOLS]  # the simulator's Korean markets


def demo_exchanges(sim_port: int) -> dict[str, dict[str, object]]:
    """All four exchanges against the one simulator: each dialect lives under its own paths."""
    base = f"127.0.0.1:{sim_port}"
    return {
        "binance": {"wsEndpoint": f"ws://{base}", "restEndpoint": f"http://{base}",
                    "symbols": DEMO_SYMBOLS, "dataTypes": DEMO_DATA_TYPES},
        "binance-futures": {"wsEndpoint": f"ws://{base}", "restEndpoint": f"http://{base}",
                            "symbols": DEMO_SYMBOLS, "dataTypes": ["trade", "kline_1m", "ticker", "bbo"],
                            # bookTicker (/public) and the rest (/market) never share a connection
                            "connections": {"max": 10, "streamsPerConnection": 1000}},
        "upbit": {"wsEndpoint": f"ws://{base}/upbit", "restEndpoint": f"http://{base}/upbit",
                  "symbols": KRW_SYMBOLS, "dataTypes": ["trade", "kline_1s", "kline_1m", "ticker", "bbo"]},
        "bithumb": {"wsEndpoint": f"ws://{base}/bithumb", "restEndpoint": f"http://{base}/bithumb",
                    "symbols": KRW_SYMBOLS, "dataTypes": ["trade", "ticker", "bbo"]},
    }  # fmt: skip


def _start_sinks(servers: list[LocalPostgres | LocalRedis]) -> tuple[dict[str, object], str]:
    """Throwaway PostgreSQL and Redis servers (Debian's binaries, temporary folders, free ports), the
    sinks' config section for them, and how to look inside."""
    postgres = LocalPostgres()
    servers.append(postgres)
    postgres.start()
    redis = LocalRedis()
    servers.append(redis)
    redis.start()
    dsn = postgres.create_database("collector")
    sinks = {"postgres": {"dsn": dsn}, "redis": {"url": redis.url, "streamMaxLen": 10_000}}
    text = f"""  PostgreSQL (history)               psql {dsn}
                                     e.g. SELECT count(*) FROM trades;  (README "Sinks" has the queries)
  Redis (latest state)               redis-cli -p {redis.port} HGETALL collector:latest:binance:btc-usdt
                                     redis-cli -p {redis.port} PSUBSCRIBE 'market.trade.*'
"""
    return sinks, text


def _wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="collector demo", description=__doc__)
    parser.add_argument("--rate", type=float, default=5.0, help="trades per second per symbol")
    parser.add_argument("--port", type=int, default=6066, help="the worker's web port")
    parser.add_argument(
        "--sinks", action="store_true",
        help="also start throwaway PostgreSQL and Redis servers and store into them (README 'Sinks')",
    )  # fmt: skip
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="collector-demo-"))
    sim_port = free_port()
    sim_log = workdir / "simulator.log"
    worker_log = workdir / "worker.log"
    simulator = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(sim_port),
         "--symbols", ",".join(DEMO_SYMBOLS), "--rate", str(args.rate)],
        stdout=sim_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    servers: list[LocalPostgres | LocalRedis] = []
    try:
        sinks, sinks_text = _start_sinks(servers) if args.sinks else ({}, "")
        if not _wait_for_line(sim_log, "listening", simulator, 30):
            print(f"demo: the simulator did not start; see {sim_log}", file=sys.stderr)
            return 1
        config_path = workdir / "demo.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "server": {"port": args.port},
                    "exchanges": demo_exchanges(sim_port),
                    "kafka": {"brokers": "embedded"},
                    "logging": {"level": "info", "format": "json"},
                    **({"sinks": sinks} if sinks else {}),
                }
            )
        )
        env = {**os.environ, "COLLECTOR_CONFIG": str(config_path)}
        env.pop("COLLECTOR_KAFKA_BROKERS", None)
        env.pop("COLLECTOR_SERVER_PORT", None)
        worker = subprocess.Popen(
            [sys.executable, "-m", "agents.cli", "worker", "-l", "info"],
            stdout=worker_log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )  # fmt: skip
        if not _wait_for_line(worker_log, "Worker ready", worker, 90):
            print(f"demo: the worker did not start; see {worker_log}", file=sys.stderr)
            return 1
        listening = re.search(r"embedded broker listening on ([0-9.]+:[0-9]+)", worker_log.read_text())
        if listening is None:  # guessing 9092 could point readers at another collector's broker
            print(f"demo: the worker did not say where its broker listens; see {worker_log}", file=sys.stderr)
            return 1
        broker = listening.group(1)
        print(
            f"""
Exchange Collector demo is running (Ctrl-C stops everything).
  simulator (Binance spot and USD-M futures, Upbit under /upbit, Bithumb under /bithumb)
                                     ws://127.0.0.1:{sim_port}  http://127.0.0.1:{sim_port}/_sim/stats
  embedded Kafka broker              {broker}
  worker web server                  http://127.0.0.1:{args.port}/
  market topics                      market.<trade|kline|ticker|bbo>.<binance|binance-futures>.<btc-usdt|...>
                                     market.<trade|kline|ticker|bbo>.<upbit|bithumb>.<btc-krw|eth-krw|bnb-krw>
  read one                           collector tail market.trade.binance.btc-usdt --brokers {broker}
                                     collector tail market.trade.upbit.btc-krw --brokers {broker}
  logs                               {worker_log}  {sim_log}
{sinks_text}""",
            flush=True,
        )
        stop = {"now": False}

        def request_stop(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop["now"] and worker.poll() is None and simulator.poll() is None:
            time.sleep(0.2)
        return 0
    finally:
        if worker is not None:
            _stop(worker)
        _stop(simulator)
        for server in servers:
            server.close()
