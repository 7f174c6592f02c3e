"""`/ws/exchange` against real workers, the embedded broker and the simulator.

One broker, one simulator and one worker (buffer limit at its 64 KiB minimum, so a slow client fills
it in seconds) are shared by the module; the two-worker test adds workers to the same group.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from agents.embedded_broker import EmbeddedBroker
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config
from tests.test_dashboard_browser import Browser

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "BNB/USDT"]
DATA_TYPES = ["trade", "bbo", "kline_1m", "ticker"]
BUFFER_LIMIT = 64 * 1024


class LiveClient:
    """A `/ws/exchange` client whose thread reads every message as it comes."""

    def __init__(self, url: str) -> None:
        self.connection: ClientConnection = connect(url, open_timeout=15)
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.connection:
                self.messages.append(json.loads(message))
        except ConnectionClosed:
            pass
        self.closed = True

    def send(self, message: Any) -> None:
        self.connection.send(message if isinstance(message, str) else json.dumps(message))

    def controls(self) -> list[dict[str, Any]]:
        return [m for m in list(self.messages) if "op" in m]

    def trades(self) -> list[dict[str, Any]]:
        return [m for m in list(self.messages) if m.get("type") == "trade"]

    def wait_control(self, count: int, timeout: float = 15) -> dict[str, Any]:
        wait_for(lambda: len(self.controls()) >= count, timeout, f"control message {count}")
        return self.controls()[count - 1]

    def close(self) -> None:
        self.connection.close()
        self._reader.join(timeout=10)


class SlowClient:
    """A WebSocket client that does not read at all until told to: a raw socket with a tiny receive
    buffer (client libraries keep reading into memory), so the server's buffers fill."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            b"GET /ws/exchange HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.data = b""
        while b"\r\n\r\n" not in self.data:
            self.data += self.sock.recv(4096)
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def read_until_closed(self) -> tuple[int, str, int]:
        """Read every frame up to the server's close frame: (close code, reason, text messages before it)."""
        messages = 0
        while True:
            frame = self._frame()
            opcode, payload = frame
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big"), payload[2:].decode(), messages
            if opcode == 0x1:
                messages += 1

    def _frame(self) -> tuple[int, bytes]:
        header = self._take(2)
        opcode, size = header[0] & 0x0F, header[1] & 0x7F
        if size == 126:
            size = int.from_bytes(self._take(2), "big")
        elif size == 127:
            size = int.from_bytes(self._take(8), "big")
        return opcode, self._take(size)

    def _take(self, size: int) -> bytes:
        while len(self.data) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without a close frame")
            self.data += chunk
        taken, self.data = self.data[:size], self.data[size:]
        return taken

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    running = Simulator(SYMBOLS, rate=20)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def config_path(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(
        tmp_path_factory.mktemp("distribution") / "c.yaml", simulator, SYMBOLS, DATA_TYPES,
        distribution={"maxBufferBytes": BUFFER_LIMIT},
    )  # fmt: skip


@pytest.fixture(scope="module")
def worker(broker: EmbeddedBroker, config_path: Path, simulator: Simulator) -> Iterator[Worker]:
    started = Worker(config_path, broker.bootstrap, config_path.parent, name="first")
    try:
        started.wait_ready()
        # Ready is not subscribed: a test that pauses the market, notes what was made and resumes it
        # expects the first trade after that; with a fresh topic the collector starts at the first
        # trade it receives, so every stream must be live before (a test run alone missed it).
        wait_streams(simulator, len(SYMBOLS) * len(DATA_TYPES))
        yield started
    finally:
        code = started.stop()
    assert code == 0, started.log()[-3000:]
    assert "Traceback" not in started.log(), started.log()[-5000:]


def url(worker: Worker, query: str = "") -> str:
    return f"ws://127.0.0.1:{worker.port}/ws/exchange{query}"


def wait_streams(simulator: Simulator, count: int) -> None:
    def subscribed() -> bool:
        subscriptions = simulator.get("/_sim/stats")["subscriptions"]
        return sum(len(streams) for streams in subscriptions.values()) >= count

    wait_for(subscribed, 60, "every stream subscribed")


def health(worker: Worker) -> dict[str, Any]:
    status, body = worker.request("/api/ws/infra-health")
    assert status == 200, body
    return body


def trade_ids_made(simulator: Simulator, before: dict[str, int]) -> dict[str, list[str]]:
    return {
        symbol: [str(t["id"]) for t in simulator.get(f"/_sim/trades?symbol={symbol}")[before[symbol] :]]
        for symbol in SYMBOLS
    }


def made_at_least(simulator: Simulator, before: dict[str, int], count: int) -> bool:
    return all(n - before[s] >= count for s, n in simulator.get("/_sim/stats")["tradesGenerated"].items())


def has_every_trade(client: LiveClient, made: dict[str, list[str]]) -> bool:
    received = {(t["symbol"], t["data"]["tradeId"]) for t in client.trades()}
    return all((symbol, trade_id) in received for symbol, ids in made.items() for trade_id in ids)


def assert_each_trade_once_in_order(client: LiveClient, made: dict[str, list[str]], name: str) -> None:
    """Every trade made is there once; per symbol they came in trade id order; nothing came twice."""
    received: dict[str, list[str]] = defaultdict(list)
    for trade in client.trades():
        received[trade["symbol"]].append(trade["data"]["tradeId"])
    for symbol, ids in made.items():
        got = received[symbol]
        counts = Counter(got)
        assert not [i for i, n in counts.items() if n > 1], f"{name} {symbol}: duplicates"
        assert set(ids) <= set(got), f"{name} {symbol}: {len(set(ids) - set(got))} of {len(ids)} missing"
        assert got == sorted(got, key=int), f"{name} {symbol}: out of order"


# ---- errors --------------------------------------------------------------------------------------------


def test_bad_query_parameters_are_refused_before_the_upgrade(worker: Worker) -> None:
    for query, reason in [
        ("?types=candles", "unknown type 'candles'"),
        ("?symbol=BTC/USDT", "unknown query"),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            connect(url(worker, query), open_timeout=10)
        assert refused.value.response.status_code == 400
        assert reason in json.loads(refused.value.response.body)["error"]
        status, body = worker.request(f"/ws/exchange{query}")  # the same answer without the upgrade
        assert status == 400 and reason in body["error"]


def test_bad_subscribe_messages_get_an_error_and_the_connection_stays(worker: Worker) -> None:
    client = LiveClient(url(worker, "?symbols=BTC/USDT&types=trade"))
    try:
        first = client.wait_control(1)
        assert first == {
            "op": "subscribed",
            "filter": {"exchanges": None, "symbols": ["BTC/USDT"], "types": ["trade"]},
        }
        bad = [
            "{",
            '{"op": "subscribe", "types": ["candles"]}',
            '{"op": "subscribe"}',
            '{"op": "resubscribe"}',
            '{"op": "unsubscribe", "exchanges": ["binance"]}',
        ]
        for number, message in enumerate(bad, start=2):
            client.send(message)
            reply = client.wait_control(number)
            assert reply["op"] == "error" and reply["message"], (message, reply)
        client.connection.send(b"\x00binary")
        assert client.wait_control(len(bad) + 2)["op"] == "error"
        client.send({"op": "subscribe", "symbols": ["eth-usdt"]})
        reply = client.wait_control(len(bad) + 3)
        assert reply == {
            "op": "subscribed",
            "filter": {"exchanges": None, "symbols": ["BTC/USDT", "ETH/USDT"], "types": ["trade"]},
        }
        wait_for(
            lambda: {t["symbol"] for t in client.trades()} == {"BTC/USDT", "ETH/USDT"}, 30, "both symbols"
        )
        assert not client.closed
    finally:
        client.close()


# ---- a slow client --------------------------------------------------------------------------------------


def test_a_slow_client_is_dropped_with_1008_while_a_fast_one_and_collection_lose_nothing(
    worker: Worker, simulator: Simulator, broker: EmbeddedBroker
) -> None:
    simulator.post("/_sim/resume")
    wait_streams(simulator, len(SYMBOLS) * len(DATA_TYPES))
    dropped_before = health(worker)["clientsDropped"]
    reader = TopicReader(broker.bootstrap)
    fast = LiveClient(url(worker))
    slow = SlowClient(worker.port)  # the kernel's buffers, then its 64 KiB buffer, fill within seconds
    try:
        fast.wait_control(1)
        before = simulator.get("/_sim/stats")["tradesGenerated"]
        wait_for(
            lambda: health(worker)["clientsDropped"] > dropped_before, 60, "the slow client to be dropped"
        )
        wait_for(lambda: made_at_least(simulator, before, 30), 60, "30 more trades per symbol")
        simulator.post("/_sim/pause")
        made = trade_ids_made(simulator, before)

        # Now it reads what was sent before the close, then the close.
        code, reason, messages = slow.read_until_closed()
        assert (code, reason) == (1008, "too slow")
        assert messages > 0

        wait_for(lambda: has_every_trade(fast, made), 30, "the fast client to have every trade")
        assert not fast.closed
        assert_each_trade_once_in_order(fast, made, "fast client")

        def in_kafka() -> set[tuple[str, str]]:
            reader.follow("market.trade.")
            reader.poll(0.3)
            return {
                (json.loads(m.value())["symbol"], json.loads(m.value())["data"]["tradeId"])
                for records in reader.records.values()
                for m in records
            }

        expected = {(symbol, trade_id) for symbol, ids in made.items() for trade_id in ids}
        wait_for(lambda: expected <= in_kafka(), 30, "every trade in Kafka")
        metrics = worker.request("/metrics")[1]
        assert 'collector_ws_disconnects_total{reason="too-slow"}' in metrics
    finally:
        simulator.post("/_sim/resume")
        fast.close()
        slow.close()
        reader.close()


# ---- two workers -----------------------------------------------------------------------------------------


def test_a_client_on_each_of_two_workers_gets_every_trade_once_across_a_rebalance(
    worker: Worker, broker: EmbeddedBroker, simulator: Simulator, config_path: Path
) -> None:
    clients: dict[str, LiveClient] = {}
    made_from: dict[str, dict[str, int]] = {}
    simulator.post("/_sim/pause")
    clients["first"] = LiveClient(url(worker, "?types=trade"))
    clients["first"].wait_control(1)
    made_from["first"] = simulator.get("/_sim/stats")["tradesGenerated"]
    simulator.post("/_sim/resume")
    # A second worker joins while the first client is served: Kafka's group rebalances and connection
    # groups move to the newcomer (their gaps backfilled over REST).
    second = Worker(config_path, broker.bootstrap, config_path.parent, name="second")
    try:
        second.wait_ready()

        def offered(w: Worker) -> set[str]:
            status, info = w.request("/ws/info")
            return (
                {entry["exchange"].rsplit(":", 1)[1] for entry in info["workers"]} if status == 200 else set()
            )

        both = {f"{w.port}/ws/exchange" for w in (worker, second)}
        wait_for(lambda: offered(worker) == offered(second) == both, 30, "/ws/info to offer both workers")
        clients["second"] = LiveClient(url(second, "?types=trade"))
        clients["second"].wait_control(1)
        # Every trade generated from now on reaches the topics after the second client's subscription.
        made_from["second"] = simulator.get("/_sim/stats")["tradesGenerated"]
        wait_for(lambda: made_at_least(simulator, made_from["second"], 40), 60, "40 trades per symbol")
        simulator.post("/_sim/pause")
        for name, client in clients.items():
            made = trade_ids_made(simulator, made_from[name])
            try:
                wait_for(
                    lambda c=client, m=made: has_every_trade(c, m), 60, f"every trade at the {name} client"
                )
            except TimeoutError:
                received = {(t["symbol"], t["data"]["tradeId"]) for t in client.trades()}
                missing = sorted((s, i) for s, ids in made.items() for i in ids if (s, i) not in received)
                in_kafka = trades_in_kafka(broker) & set(missing)
                raise AssertionError(
                    f"{name} client misses {len(missing)}, {len(in_kafka)} of them in Kafka: {missing[:10]}"
                ) from None
        time.sleep(1.0)  # anything arriving now would be a duplicate
        for name, client in clients.items():
            assert_each_trade_once_in_order(client, trade_ids_made(simulator, made_from[name]), name)
            assert {m["type"] for m in client.messages if "op" not in m} == {"trade"}
    finally:
        simulator.post("/_sim/resume")
        for client in clients.values():
            client.close()
        assert second.stop() == 0, second.log()[-3000:]


def trades_in_kafka(broker: EmbeddedBroker) -> set[tuple[str, str]]:
    reader = TopicReader(broker.bootstrap)
    try:
        reader.follow("market.trade.")
        reader.poll(3.0)
        return {
            (record["symbol"], record["data"]["tradeId"])
            for messages in reader.records.values()
            for record in (json.loads(m.value()) for m in messages)
        }
    finally:
        reader.close()


# ---- a worker that collects nothing -----------------------------------------------------------------------


def test_a_worker_with_collection_false_serves_clients(
    worker: Worker, broker: EmbeddedBroker, simulator: Simulator, config_path: Path
) -> None:
    follower_config = config_path.with_name("follower.yaml")
    follower_config.write_text(config_path.read_text() + "collection: false\n")
    follower = Worker(follower_config, broker.bootstrap, config_path.parent, name="follower")
    client: LiveClient | None = None
    try:
        follower.wait_ready()
        simulator.post("/_sim/resume")
        client = LiveClient(url(follower, "?symbols=BTC/USDT&types=trade"))
        client.wait_control(1)
        wait_for(lambda: len(client.trades()) >= 10, 30, "trades through the follower")
        assert {t["symbol"] for t in client.trades()} == {"BTC/USDT"}
        # It collects nothing: every connection to the exchange belongs to the collecting worker.
        status, body = follower.request("/subscriptions?scope=local")
        assert status == 200 and not body["groups"], body
    finally:
        if client is not None:
            client.close()
        follower.stop()


# ---- pages in headless Chromium ----------------------------------------------------------------------------

LIVE_SCREENSHOT = Path("/tmp/collector-live.png")  # kept after the run for a person to look at


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    opened = Browser(tmp_path / "profile")
    try:
        yield opened
    finally:
        opened.close()


def test_the_live_page_shows_trades_best_bid_offer_and_candles_and_reconnects(
    worker: Worker, simulator: Simulator, browser: Browser
) -> None:
    simulator.post("/_sim/resume")
    browser.open(f"http://127.0.0.1:{worker.port}/live?exchange=binance&symbol=BTC/USDT")
    wait_for(lambda: browser.evaluate("live.state") == "live", 30, "the page to be live")
    assert browser.evaluate("live.filter") == {
        "exchanges": ["binance"], "symbols": ["BTC/USDT"], "types": ["bbo", "kline", "ticker", "trade"],
    }  # fmt: skip
    wait_for(lambda: browser.evaluate("live.trades") >= 5, 30, "trades on the tape")
    wait_for(lambda: browser.evaluate("live.bbo") is not None, 30, "a best bid/offer")
    wait_for(lambda: browser.evaluate("live.candles") >= 1, 60, "a 1-minute candle")
    assert browser.evaluate("document.querySelectorAll('#tape tbody tr').length") >= 5
    assert browser.evaluate("document.getElementById('bid-price').textContent")[0].isdigit()
    assert browser.evaluate("document.querySelector('#chart canvas') !== null")
    print("live page screenshot:", browser.screenshot(LIVE_SCREENSHOT))

    # Another symbol, through subscribe messages on the same connection.
    browser.evaluate(
        "document.getElementById('symbol').value = 'ETH/USDT'; document.getElementById('apply').click()"
    )
    wait_for(
        lambda: (browser.evaluate("live.filter") or {}).get("symbols") == ["ETH/USDT"], 30, "the new filter"
    )
    wait_for(lambda: browser.evaluate("live.trades") >= 3, 30, "ETH/USDT trades")
    symbols = browser.evaluate("[...document.querySelectorAll('#tape tbody tr')].length")
    assert symbols >= 3 and browser.evaluate("live.connects") == 1

    # A dropped connection comes back through /ws/info after a backoff.
    health_before = health(worker)["clients"]
    browser.evaluate("live.state = 'dropping'; window.dropForTest()")
    wait_for(lambda: browser.evaluate("live.connects") == 2, 30, "the page to reconnect")
    wait_for(lambda: browser.evaluate("live.state") == "live", 30, "the page to be live again")
    assert health(worker)["clients"] == health_before
    assert browser.console_errors() == []


def test_the_dashboard_links_the_live_page_and_draws_15_minute_sparklines(
    worker: Worker, simulator: Simulator, browser: Browser
) -> None:
    simulator.post("/_sim/resume")
    browser.open(f"http://127.0.0.1:{worker.port}/")
    assert browser.evaluate("document.getElementById('live-link').getAttribute('href')") == "/live"

    def points(series: str) -> int:
        line = f"document.querySelector('#collectors svg.spark[data-series=\"{series}\"] polyline')"
        count = "l.getAttribute('points').split(' ').filter(Boolean).length"
        return browser.evaluate(f"(() => {{ const l = {line}; return l ? {count} : 0; }})()")

    wait_for(lambda: points("records/s") >= 3 and points("p99 ms") >= 3, 30, "sparkline points")
    before = points("records/s")
    browser.open(f"http://127.0.0.1:{worker.port}/")  # a reload keeps what the page has seen
    wait_for(lambda: points("records/s") > before, 30, "the sparkline to continue after a reload")
    assert browser.console_errors() == []
