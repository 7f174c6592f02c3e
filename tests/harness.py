"""Real processes for end-to-end tests: simulator, embedded broker, collector workers, topic reader.

Every wait polls a real condition with a deadline; nothing sleeps for a fixed time to "let it settle".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec
import yaml
from confluent_kafka import Consumer, TopicPartition

from agents.embedded_broker import die_with_parent, free_port
from streams.records import Bbo, Kline, MarketRecord, Ticker, Trade, decode_record

REPO = Path(__file__).resolve().parents[1]
COLLECTOR = str(Path(sys.executable).with_name("collector"))
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# Seconds a simulator control request may take. Two clean-clone runs in a slow phase of the 2-core
# machine had a book ground-truth request pass 10 s.
CONTROL_TIMEOUT = 30


class Simulator:
    """`collector simulate` in its own process; controlled over its /_sim/ endpoints."""

    def __init__(self, symbols: list[str], rate: float, seed: int = 7, extra: Iterable[str] = ()) -> None:
        self.port = free_port()
        self.log_path = Path(f"/tmp/collector-sim-{self.port}.log")
        command = [
            COLLECTOR, "simulate", "--host", "127.0.0.1", "--port", str(self.port),
            "--symbols", ",".join(symbols), "--rate", str(rate), "--seed", str(seed), *extra,
        ]  # fmt: skip
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        # 0.9 s on an idle machine; a clean-clone `make test` in a slow phase of this 2-core machine, with
        # every xdist process starting brokers, simulators and workers at once, took over 30 s twice.
        try:
            wait_for(lambda: "listening" in self.log_path.read_text() or self._died(), 90, "the simulator")
        except TimeoutError as exc:
            self.process.kill()
            raise TimeoutError(f"{exc}; its log: {self.log_path.read_text()[-2000:]!r}") from None
        if self.process.poll() is not None:
            raise RuntimeError(f"simulator exited: {self.log_path.read_text()[-2000:]}")

    def _died(self) -> bool:
        return self.process.poll() is not None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def get(self, path: str, exact_numbers: bool = False) -> Any:
        """GET a simulator path; `exact_numbers` reads JSON floats as Decimal (Upbit/Bithumb prices)."""
        with urllib.request.urlopen(self.http + path, timeout=CONTROL_TIMEOUT) as response:
            return json.loads(response.read(), parse_float=Decimal if exact_numbers else float)

    def post(self, path: str, body: dict[str, Any] | None = None, exact_numbers: bool = False) -> Any:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.http + path, data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=CONTROL_TIMEOUT) as response:
            return json.loads(response.read() or b"{}", parse_float=Decimal if exact_numbers else float)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def write_config(
    path: Path,
    simulator: Simulator,
    symbols: list[str],
    data_types: list[str],
    *,
    exchange: str = "binance",
    route: str = "",
    **extra: Any,
) -> Path:
    """A worker config for one simulated exchange; `route` is its dialect's path prefix (`/upbit`)."""
    document = {
        "exchanges": {
            exchange: {
                "wsEndpoint": simulator.ws + route,
                "restEndpoint": simulator.http + route,
                "symbols": symbols,
                "dataTypes": data_types,
                "connections": {"max": 5, "streamsPerConnection": 1000},
            }
        },
        "kafka": {"brokers": "embedded", "producer": {"lingerMs": 5, "compression": "lz4"}},
        "logging": {"level": "info", "format": "json"},
        **extra,
    }
    path.write_text(yaml.safe_dump(document))
    return path


# Warnings, errors and tracebacks, and the order books' resyncs (an info line each).
NOTABLE_LOG_LINE = re.compile(
    r'"level": "(warning|error|critical)"|WARNING|ERROR|CRITICAL|Traceback|^\s+File |order book resyncs'
)


class Worker:
    """`collector worker` in its own process, with its own web port and log file."""

    # Every worker started in this process, for the failure report (`notable_log_lines`).
    started_here: list[Worker] = []

    READY = re.compile(r"Worker ready|\[\^Worker\]: Ready")

    PORT_ATTEMPTS = 3

    def __init__(self, config_path: Path, brokers: str | None, log_dir: Path, name: str = "worker") -> None:
        self.config_path, self.brokers, self.log_dir, self.name = config_path, brokers, log_dir, name
        self._start()
        self.ready_after: float | None = None

    def _start(self) -> None:
        # A free port is picked from the ephemeral range, where another process's outgoing connection
        # may take it before the worker binds it: wait_ready then starts the worker on another.
        self.port = free_port()
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"
        env = {
            **os.environ,
            "COLLECTOR_CONFIG": str(self.config_path),
            "COLLECTOR_SERVER_PORT": str(self.port),
        }
        if self.brokers:
            env["COLLECTOR_KAFKA_BROKERS"] = self.brokers
        else:
            env.pop("COLLECTOR_KAFKA_BROKERS", None)
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.started_at = time.time()
        Worker.started_here.append(self)
        self.process = subprocess.Popen(
            [COLLECTOR, "worker", "-l", "info"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def notable_log_lines(self, count: int = 40) -> list[str]:
        """The log's last notable lines: what a failed end-to-end test shows of it."""
        return [line for line in self.log().splitlines() if NOTABLE_LOG_LINE.search(line)][-count:]

    def wait_ready(self, timeout: float = 60) -> float:
        attempts = self.PORT_ATTEMPTS

        def ready() -> bool:
            nonlocal attempts
            if self.process.poll() is not None:
                log = self.log()
                attempts -= 1
                if f"attempting to bind on address ('0.0.0.0', {self.port})" in log and attempts > 0:
                    self._log.close()
                    self._start()
                    return False
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{log[-4000:]}")
            return bool(self.READY.search(self.log()))

        wait_for(ready, timeout, "the worker to be ready")
        self.ready_after = time.monotonic() - self.started
        return self.ready_after

    def request(self, path: str, method: str = "GET") -> tuple[int, Any]:
        """(HTTP status, body: JSON decoded, else text) of the worker's web server."""
        http_request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(http_request, timeout=10) as response:
                body, status = response.read(), response.status
        except urllib.error.HTTPError as error:
            body, status = error.read(), error.code
        text = body.decode()
        return status, (json.loads(text) if text.startswith(("{", "[")) else text)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait(timeout=10)
        self._log.close()
        return code


class TopicReader:
    """Reads whole topics back from the broker with confluent-kafka."""

    def __init__(self, brokers: str) -> None:
        self.brokers = brokers
        self.consumer = Consumer(
            {
                "bootstrap.servers": brokers,
                "group.id": f"test-reader-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.assigned: set[str] = set()
        self.records: dict[str, list[Any]] = {}

    def topics(self, prefix: str) -> list[str]:
        metadata = self.consumer.list_topics(timeout=10)
        return sorted(name for name in metadata.topics if name.startswith(prefix))

    def follow(self, prefix: str) -> None:
        """Assign every partition of every topic with this prefix not yet assigned."""
        metadata = self.consumer.list_topics(timeout=10)
        partitions = []
        for name, topic in metadata.topics.items():
            if name.startswith(prefix) and name not in self.assigned:
                self.assigned.add(name)
                self.records.setdefault(name, [])
                partitions += [TopicPartition(name, p, 0) for p in topic.partitions]
        if partitions:
            self.consumer.incremental_assign(partitions)

    def poll(self, seconds: float = 0.5) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = self.consumer.consume(num_messages=10000, timeout=0.1)
            for message in messages:
                if message.error():
                    continue
                self.records.setdefault(message.topic(), []).append(message)
                count += 1
        return count

    def close(self) -> None:
        self.consumer.close()


def trades_made_until(
    simulator: Simulator, before: dict[str, int], per_symbol: int, exchange_symbols: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Wait until the running market made `per_symbol` trades of every symbol since `before` (its
    `tradesGenerated` counts), pause it, and return each symbol's trades made since."""
    wait_for(
        lambda: all(
            n - before[s] >= per_symbol for s, n in simulator.get("/_sim/stats")["tradesGenerated"].items()
        ),
        60,
        f"{per_symbol} trades per symbol",
    )
    simulator.post("/_sim/pause")
    return {
        symbol: simulator.get(f"/_sim/trades?symbol={exchange_symbol}")[before[symbol] :]
        for symbol, exchange_symbol in exchange_symbols.items()
    }


class SimulatedExchange:
    """One exchange's market in a running simulator, read through `/_sim/` with exact numbers."""

    def __init__(self, simulator: Simulator, exchange: str) -> None:
        self.simulator = simulator
        self.exchange = exchange

    def stats(self) -> dict[str, Any]:
        return self.simulator.get(f"/_sim/stats?exchange={self.exchange}", exact_numbers=True)

    def subscriptions(self) -> dict[str, list[str]]:
        """Connection id → the streams subscribed on it."""
        return self.stats()["subscriptions"]

    def subscribed_streams(self) -> int:
        return sum(len(streams) for streams in self.subscriptions().values())

    def subscribed_connections(self) -> set[str]:
        return {cid for cid, streams in self.subscriptions().items() if streams}

    def trades_generated(self) -> dict[str, int]:
        return self.stats()["tradesGenerated"]

    def trades_made(self, symbol: str) -> list[dict[str, Any]]:
        return self.simulator.get(
            f"/_sim/trades?exchange={self.exchange}&symbol={symbol}", exact_numbers=True
        )

    def disconnect(self) -> int:
        """Drops every connection to this exchange; returns how many there were."""
        return self.simulator.post(f"/_sim/disconnect?exchange={self.exchange}")["disconnected"]


@dataclass
class CollectorRun:
    """A worker collecting one simulated exchange into the broker, and a reader of what it published."""

    market: SimulatedExchange
    worker: Worker
    reader: TopicReader
    generated_before: dict[str, int]

    def records(self, kind: str, symbol: str) -> list[MarketRecord]:
        topic = f"market.{kind}.{self.market.exchange}.{symbol.replace('/', '-').lower()}"
        return [decode_record(m.value()) for m in self.reader.records.get(topic, [])]


@contextmanager
def collecting(
    exchange: str,
    symbols: list[str],
    data_types: list[str],
    bootstrap: str,
    tmp_path: Path,
    *,
    route: str = "",
    rate: float = 30,
) -> Iterator[CollectorRun]:
    """A simulator paused until the test resumes it, and a worker collecting `symbols` from it.

    When the block ends without an error, the worker must have stopped with code 0 and no traceback.
    """
    # `--symbols` names the spot market; the Korean venues trade the same bases against KRW.
    simulator = Simulator([s.replace("/KRW", "/USDT") for s in symbols], rate=rate)
    market = SimulatedExchange(simulator, exchange)
    simulator.post(f"/_sim/pause?exchange={exchange}")
    before = market.trades_generated()
    config = write_config(
        tmp_path / f"{exchange}.yaml", simulator, symbols, data_types, exchange=exchange, route=route
    )
    worker = Worker(config, bootstrap, tmp_path)
    reader = TopicReader(bootstrap)
    try:
        yield CollectorRun(market, worker, reader, before)
    finally:
        reader.close()
        code = worker.stop()
        simulator.stop()
    assert_clean_exit(worker, code)


def assert_clean_exit(worker: Worker, code: int) -> None:
    assert code == 0, worker.log()[-3000:]
    assert "Traceback" not in worker.log(), worker.log()[-5000:]


class ExpectedTrade(NamedTuple):
    """A trade's fields as the market record must carry them."""

    trade_id: str
    price: str
    quantity: str
    side: str
    trade_time: int


@dataclass
class ExactlyOnceResult:
    """Trades checked, connections dropped, and connection id → streams once all were subscribed."""

    trades: int
    dropped_connections: int
    subscriptions: dict[str, list[str]]


SCHEMA_OF_KIND = {"kline": Kline, "ticker": Ticker, "bbo": Bbo}


def run_exactly_once(
    exchange: str,
    symbols: list[str],
    data_types: list[str],
    bootstrap: str,
    tmp_path: Path,
    *,
    expected_trade: Callable[[dict[str, Any]], ExpectedTrade],
    trades_per_symbol: int,
    route: str = "",
    drop_halfway: bool = False,
) -> ExactlyOnceResult:
    """Every trade made once the worker has subscribed every stream arrives exactly once with the
    simulator's values (`expected_trade` reads them from the simulator's trade row), every other data
    type arrives in its schema, and the worker breaks no exchange limit.

    With `drop_halfway` every connection is dropped after half the trades, so that the trades made
    while the worker was away are in the count too.
    """
    with collecting(exchange, symbols, data_types, bootstrap, tmp_path, route=route) as run:
        market, reader, before = run.market, run.reader, run.generated_before
        every_stream = len(symbols) * len(data_types)
        run.worker.wait_ready()
        wait_for(lambda: market.subscribed_streams() == every_stream, 30, "all subscriptions")
        subscriptions = market.subscriptions()
        market.simulator.post("/_sim/resume")

        def generated_at_least(count: int) -> bool:
            return all(n - before[s] >= count for s, n in market.trades_generated().items())

        dropped = 0
        if drop_halfway:
            wait_for(lambda: generated_at_least(trades_per_symbol // 2), 30, "trades before the drop")
            dropped = market.disconnect()
            assert dropped == len(subscriptions)
        wait_for(lambda: generated_at_least(trades_per_symbol), 30, f"{trades_per_symbol} trades per symbol")
        if drop_halfway:
            wait_for(lambda: market.subscribed_streams() == every_stream, 30, "resubscribed")
        market.simulator.post("/_sim/pause")
        truth = {symbol: market.trades_made(symbol)[before[symbol] :] for symbol in symbols}
        expected_total = sum(len(trades) for trades in truth.values())

        def delivered() -> int:
            reader.follow("market.")
            reader.poll(0.3)
            return sum(len(r) for t, r in reader.records.items() if t.startswith(f"market.trade.{exchange}."))

        wait_for(lambda: delivered() >= expected_total, 45, f"{expected_total} trades in Kafka")
        reader.poll(1.0)  # anything beyond the expected count would be a duplicate

        for symbol in symbols:
            expected = {trade.trade_id: trade for trade in map(expected_trade, truth[symbol])}
            _assert_each_trade_once(run.records("trade", symbol), exchange, symbol, expected)
        for kind in sorted({data_type.split("_")[0] for data_type in data_types} - {"trade"}):
            for symbol in symbols:
                records = run.records(kind, symbol)
                assert records, f"no {kind} records for {symbol}"
                assert all(
                    isinstance(r.data, SCHEMA_OF_KIND[kind]) and r.exchange == exchange for r in records
                )
        final = market.stats()
        assert final["violations"] == 0, final["violationsByReason"]
    return ExactlyOnceResult(expected_total, dropped, subscriptions)


def _assert_each_trade_once(
    records: list[MarketRecord], exchange: str, symbol: str, expected: dict[str, ExpectedTrade]
) -> None:
    for record in records:
        assert (record.exchange, record.symbol, record.type) == (exchange, symbol, "trade")
    published = [published_trade(record) for record in records]
    ids = Counter(trade.trade_id for trade in published)
    assert not [i for i, n in ids.items() if n > 1], f"{symbol}: duplicated trade ids"
    assert set(ids) == set(expected), f"{symbol}: {len(set(expected) - set(ids))} missing"
    for trade in published:
        assert trade == expected[trade.trade_id]


def published_trade(record: MarketRecord) -> ExpectedTrade:
    """The trade fields of a record read from a trade topic."""
    data = record.data
    assert isinstance(data, Trade), f"a {type(data).__name__} record on a trade topic"
    return ExpectedTrade(data.trade_id, data.price, data.quantity, data.side, data.trade_time)


# -- Faults the collector's fault suite inflicts from outside the simulator: a paused broker and a
# killed worker, and the tally of what every fault cost. ------------------------------------------------


def embedded_broker_pid(worker: Worker, timeout: float = 20) -> int:
    """The broker a worker started itself (`kafka.brokers: embedded` and no COLLECTOR_KAFKA_BROKERS)."""

    def find() -> int | None:
        for child in child_pids(worker.process.pid):
            try:
                if b"tansu" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
            except OSError:
                continue
        return None

    pid = wait_for(find, timeout, "the worker's embedded broker")
    assert pid is not None
    return pid


def broker_pid(broker: Any) -> int:
    """The process id of a broker: a test's own `EmbeddedBroker`, a worker's embedded one, or a pid."""
    if isinstance(broker, int):
        return broker
    if isinstance(broker, Worker):
        return embedded_broker_pid(broker)
    pid = getattr(broker, "pid", None)  # an EmbeddedBroker
    if not isinstance(pid, int):
        raise ValueError(f"{broker!r} is not a running broker")
    return pid


@dataclass
class BrokerPause:
    """A broker stopped with SIGSTOP: it keeps its sockets open and answers nothing until SIGCONT."""

    pid: int
    started: float  # epoch seconds
    ended: float | None = None

    def resume(self) -> None:
        if self.ended is None:
            os.kill(self.pid, signal.SIGCONT)
            self.ended = time.time()


def pause_broker(broker: Any) -> BrokerPause:
    """SIGSTOP the broker (see `broker_pid`); call `resume()` on the answer, or use `broker_paused`."""
    pid = broker_pid(broker)
    os.kill(pid, signal.SIGSTOP)
    # The signal is delivered asynchronously: the pause begins when the kernel shows it stopped.
    wait_for(lambda: _process_state(pid) in {"T", "t"}, 5, "the broker to stop")
    return BrokerPause(pid, time.time())


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@contextmanager
def broker_paused(broker: Any) -> Iterator[BrokerPause]:
    """The broker is stopped inside the block and continued when it ends, whatever happens in it."""
    pause = pause_broker(broker)
    try:
        yield pause
    finally:
        pause.resume()


def kill_and_restart(worker: Worker, down_for: float, *, ready_timeout: float = 60) -> Worker:
    """SIGKILL the worker, keep it down `down_for` seconds (the fault itself, not a settling time), and
    start it again with the same config, brokers and log folder; returns the new worker once ready.

    A worker running its own embedded broker takes the broker (and everything in it) down with it, so a
    test that checks continuity across a restart runs its own broker and passes it as `brokers`.
    """
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    worker._log.close()
    time.sleep(down_for)
    restarted = Worker(worker.config_path, worker.brokers, worker.log_dir, name=f"{worker.name}-restarted")
    restarted.wait_ready(ready_timeout)
    return restarted


TradeKey = tuple[str, Decimal, Decimal]  # trade id, price, quantity: what tells a trade from an invented one
# Where each dialect's ground-truth rows (`/_sim/trades`, `/_sim/invented`) keep id, price and quantity.
TRUTH_FIELDS = {
    "binance": ("id", "price", "qty"),
    "binance-futures": ("a", "p", "q"),
    "upbit": ("sequential_id", "trade_price", "trade_volume"),
    "bithumb": ("sequential_id", "trade_price", "trade_volume"),
}


def truth_key(exchange: str, row: dict[str, Any]) -> TradeKey:
    trade_id, price, quantity = TRUTH_FIELDS[exchange]
    return str(row[trade_id]), Decimal(str(row[price])), Decimal(str(row[quantity]))


def record_key(record: MarketRecord) -> TradeKey:
    trade = published_trade(record)
    return trade.trade_id, Decimal(trade.price), Decimal(trade.quantity)


@dataclass
class Sighting:
    """How often a trade was on its topic, and when the tally first read it (epoch seconds)."""

    copies: int
    first_seen: float


@dataclass(frozen=True)
class FaultCounts:
    generated: int  # trades the market made in the window
    delivered: int  # of those, how many reached the topic at least once
    missing: int
    duplicated: int  # extra copies of those
    invented: int  # records of trades the simulator invented in the window (or, overall: of any
    # trade the market never made)
    repair_seconds: float | None  # fault end → the window's last trade on the topic; None: still missing

    def __add__(self, other: FaultCounts) -> FaultCounts:
        repairs = (self.repair_seconds, other.repair_seconds)
        return FaultCounts(
            self.generated + other.generated,
            self.delivered + other.delivered,
            self.missing + other.missing,
            self.duplicated + other.duplicated,
            self.invented + other.invented,
            None if None in repairs else max(r for r in repairs if r is not None),
        )


NO_TRADES = FaultCounts(0, 0, 0, 0, 0, 0.0)


def count_window(
    window: list[TradeKey], seen: dict[TradeKey, Sighting], invented: list[TradeKey], ended: float
) -> FaultCounts:
    """What one symbol's topic shows for the trades of a fault window (pure: the tally's core)."""
    delivered = [key for key in window if key in seen]
    missing = len(window) - len(delivered)
    repair: float | None = None
    if not missing:
        repair = max([0.0] + [seen[key].first_seen - ended for key in window])
    return FaultCounts(
        generated=len(window),
        delivered=len(delivered),
        missing=missing,
        duplicated=sum(seen[key].copies - 1 for key in delivered),
        invented=sum(seen[key].copies for key in set(invented) if key in seen),
        repair_seconds=repair,
    )


@dataclass
class FaultWindow:
    name: str
    started: float  # epoch seconds
    first: dict[str, int]  # per symbol: trades generated before the window
    ended: float | None = None
    last: dict[str, int] | None = None  # per symbol: trades generated when it ended


@dataclass(frozen=True)
class FaultRow:
    fault: str
    total: FaultCounts
    by_symbol: dict[str, FaultCounts]

    def as_dict(self) -> dict[str, Any]:
        counts = self.total
        repair = None if counts.repair_seconds is None else round(counts.repair_seconds, 2)
        return {
            "fault": self.fault,
            "generated": counts.generated,
            "delivered": counts.delivered,
            "missing": counts.missing,
            "duplicated": counts.duplicated,
            "invented": counts.invented,
            "repairSeconds": repair,
        }


class FaultTally:
    """Per fault window, per symbol and in total: trades generated, delivered, missing, duplicated,
    invented, and seconds to repair, from the simulator's ground truth and invented lists and the
    market trade topics read back.

    The tally reads the topics itself (`poll`, `wait_delivered`) and stamps each record with the time
    it first read it, so keep it polling while faults run (`with tally.fault(...)`, then
    `tally.wait_delivered`); a record first read late makes a repair look slower, never faster. The
    simulator must keep its whole history (no `--history-limit`). Pause the market before the final
    `rows()`/`table()`, or its newest trades count as missing.
    """

    def __init__(self, market: SimulatedExchange, symbols: list[str], reader: TopicReader) -> None:
        self.market = market
        self.exchange = market.exchange
        self.symbols = symbols
        self.reader = reader
        self.origin = self._generated()
        self.windows: list[FaultWindow] = []
        self.seen: dict[str, dict[TradeKey, Sighting]] = {symbol: {} for symbol in symbols}
        self.unreadable = 0  # records on a trade topic that are not trades
        self._read: dict[str, int] = {}  # topic → records already looked at

    def topic(self, symbol: str) -> str:
        return f"market.trade.{self.exchange}.{symbol.replace('/', '-').lower()}"

    def _generated(self) -> dict[str, int]:
        generated = self.market.trades_generated()
        return {symbol: generated[symbol] for symbol in self.symbols}

    # -- windows ------------------------------------------------------------------------------------

    def begin(self, name: str) -> FaultWindow:
        window = FaultWindow(name, time.time(), self._generated())
        self.windows.append(window)
        return window

    def end(self, window: FaultWindow) -> None:
        """The fault is over: its window holds the trades made since `begin`."""
        window.last = self._generated()
        window.ended = time.time()

    @contextmanager
    def fault(self, name: str) -> Iterator[FaultWindow]:
        """`with tally.fault("stall 10 s"): ...` runs the fault inside the block."""
        window = self.begin(name)
        try:
            yield window
        finally:
            self.end(window)

    # -- reading ------------------------------------------------------------------------------------

    def poll(self, seconds: float = 0.2) -> int:
        """Read what is new on the trade topics; returns how many records came."""
        self.reader.follow(f"market.trade.{self.exchange}.")
        self.reader.poll(seconds)
        now, count = time.time(), 0
        for symbol in self.symbols:
            topic = self.topic(symbol)
            messages = self.reader.records.get(topic, [])
            seen = self.seen[symbol]
            for message in messages[self._read.get(topic, 0) :]:
                try:
                    key = record_key(decode_record(message.value()))
                except (AssertionError, ValueError, KeyError, msgspec.DecodeError):
                    self.unreadable += 1
                    continue
                sighting = seen.get(key)
                if sighting is None:
                    seen[key] = Sighting(1, now)
                else:
                    sighting.copies += 1
            count += len(messages) - self._read.get(topic, 0)
            self._read[topic] = len(messages)
        return count

    def truth(self) -> dict[str, list[TradeKey]]:
        """Every trade each symbol's market made, oldest first."""
        truth = {}
        for symbol in self.symbols:
            # Counted first: a running market makes more trades between the two requests.
            generated = self.market.trades_generated()[symbol]
            rows = self.market.trades_made(symbol)
            if len(rows) < generated and rows:
                raise RuntimeError("the simulator forgot trades (--history-limit): the tally needs them all")
            truth[symbol] = [truth_key(self.exchange, row) for row in rows]
        return truth

    def invented(self) -> dict[str, list[tuple[float, TradeKey]]]:
        """Per symbol, (epoch seconds, key) of every trade the simulator invented."""
        invented = {}
        for symbol in self.symbols:
            rows = self.market.simulator.get(
                f"/_sim/invented?exchange={self.exchange}&symbol={symbol}", exact_numbers=True
            )
            invented[symbol] = [(row["at"] / 1000, truth_key(self.exchange, row)) for row in rows]
        return invented

    def wait_delivered(self, timeout: float) -> bool:
        """Poll until every trade made since the tally began is on its topic; False at the timeout
        (a fault suite still prints its table then)."""
        truth = self.truth()
        wanted = {symbol: keys[self.origin[symbol] :] for symbol, keys in truth.items()}
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if all(key in self.seen[symbol] for symbol, keys in wanted.items() for key in keys):
                return True
            if time.monotonic() > deadline:
                return False

    # -- results ------------------------------------------------------------------------------------

    def rows(self) -> list[FaultRow]:
        """One row per fault window, then `overall`: every trade since the tally began."""
        self.poll()
        truth, invented = self.truth(), self.invented()
        rows = []
        for window in self.windows:
            ended = window.ended if window.ended is not None else time.time()
            last = window.last if window.last is not None else self._generated()
            by_symbol = {}
            for symbol in self.symbols:
                keys = truth[symbol][window.first[symbol] : last[symbol]]
                lies = [key for at, key in invented[symbol] if window.started <= at <= ended]
                by_symbol[symbol] = count_window(keys, self.seen[symbol], lies, ended)
            rows.append(FaultRow(window.name, sum(by_symbol.values(), NO_TRADES), by_symbol))
        by_symbol = {}
        for symbol in self.symbols:
            real = set(truth[symbol])
            keys = truth[symbol][self.origin[symbol] :]
            never_made = sum(s.copies for key, s in self.seen[symbol].items() if key not in real)
            counts = count_window(keys, self.seen[symbol], [], time.time())
            by_symbol[symbol] = replace(counts, invented=never_made, repair_seconds=None)
        overall = sum(by_symbol.values(), NO_TRADES)
        overall = replace(overall, invented=overall.invented + self.unreadable, repair_seconds=None)
        return [*rows, FaultRow("overall", overall, by_symbol)]

    def table(self, rows: list[FaultRow] | None = None) -> str:
        """The rows as a text table, one line per fault."""
        return format_fault_table(self.rows() if rows is None else rows)


def format_fault_table(rows: list[FaultRow]) -> str:
    header = ("fault", "generated", "delivered", "missing", "duplicated", "invented", "repair s")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        counts = [row.total.generated, row.total.delivered, row.total.missing, row.total.duplicated]
        repair = "-" if row.total.repair_seconds is None else f"{row.total.repair_seconds:.2f}"
        lines.append((row.fault, *map(str, counts), str(row.total.invented), repair))
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        name, *numbers = cells
        return "  ".join(
            [name.ljust(widths[0])] + [n.rjust(w) for n, w in zip(numbers, widths[1:], strict=True)]
        )

    return "\n".join(map(line, lines))
