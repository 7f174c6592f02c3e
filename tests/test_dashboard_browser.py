"""The dashboard in headless Chromium, driven over the Chrome DevTools Protocol.

It must load without console errors, show numbers that change while data flows, and a subscription
made from its form must take effect (the worker subscribes and the coin's records arrive); the depth
ladder of a chosen coin shows its order book, asks above bids, and follows it.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from agents.embedded_broker import EmbeddedBroker
from tests.harness import Simulator, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

CONFIGURED = ["BTC/USDT", "ETH/USDT"]
ADDED = "SOL/USDT"  # listed by the simulator, subscribed from the dashboard
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--window-size=1500,1100",
]  # fmt: skip
SCREENSHOT = Path("/tmp/collector-dashboard.png")  # kept after the run for a person to look at
LADDER_SCREENSHOT = Path("/tmp/collector-depth-ladder.png")


class Browser:
    """One headless Chromium page over CDP; records console errors and uncaught exceptions."""

    def __init__(self, profile: Path) -> None:
        chromium = shutil.which("chromium")
        assert chromium, "chromium is missing: `make test` installs it (Debian package chromium)"
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        active_port = profile / "DevToolsActivePort"
        wait_for(lambda: active_port.exists() and len(active_port.read_text().split()) == 2, 30, "Chromium")
        port, path = active_port.read_text().split()
        self.socket: ClientConnection = connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=1500, height=1100,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=timeout))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", 30, "the page to load")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        self.evaluate("0")  # collects the events that arrived meanwhile
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
                errors.append(
                    " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry'].get('url', '')} {params['entry']['text']}")
        return errors

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def get(worker: Worker, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}{path}", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with EmbeddedBroker() as broker:
        simulator = Simulator([*CONFIGURED, ADDED], rate=20)
        worker = Worker(
            write_config(tmp / "c.yaml", simulator, CONFIGURED, ["trade", "bbo", "depth"]),
            broker.bootstrap,
            tmp,
        )
        try:
            worker.wait_ready()
            wait_for(
                lambda: len(get(worker, "/coins")["coins"]) == len(CONFIGURED), 60, "the configured coins"
            )
            yield worker
        finally:
            worker.stop()
            simulator.stop()
    assert "Traceback" not in worker.log(), worker.log()[-5000:]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    opened = Browser(tmp_path / "profile")
    try:
        yield opened
    finally:
        opened.close()


def number(browser: Browser, element_id: str) -> float | None:
    text = browser.evaluate(f"document.getElementById({element_id!r}).textContent")
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def coin_records(browser: Browser, coin: str) -> float | None:
    """The records column of a coin's row on the page."""
    text = browser.evaluate(
        f"(() => {{ const row = document.querySelector('tr[data-coin=\"{coin}\"]');"
        " return row ? row.cells[5].textContent : null; })()"
    )
    return None if text is None else float(text.replace(",", ""))


def test_the_dashboard_shows_live_numbers_and_subscribes_from_its_form(
    running: Worker, browser: Browser
) -> None:
    browser.open(f"http://127.0.0.1:{running.port}/")
    assert browser.evaluate("document.title") == "Exchange Collector"

    first = wait_for(lambda: number(browser, "total-records"), 30, "records on the page")
    wait_for(lambda: (number(browser, "total-records") or 0) > first, 30, "the records total to grow")
    btc = wait_for(lambda: coin_records(browser, "binance:BTC/USDT"), 30, "the BTC/USDT row")
    wait_for(lambda: (coin_records(browser, "binance:BTC/USDT") or 0) > btc, 30, "the BTC/USDT count to grow")
    assert browser.evaluate("document.querySelector('#collectors tbody tr .state').textContent") == "running"
    assert browser.evaluate("document.querySelector('tr[data-connector] .state').textContent") == "connected"
    assert (number(browser, "total-rate") or 0) > 0

    browser.evaluate(
        f"document.getElementById('sub-symbol').value = {ADDED!r};"
        "document.getElementById('sub-types').value = 'trade, bbo';"
        "document.getElementById('subscribe').click();"
    )
    result = wait_for(
        lambda: (
            (text := browser.evaluate("document.getElementById('sub-result').textContent"))
            and "HTTP" in text
            and text
        ),
        30,
        "the subscribe request to be answered",
    )
    assert "HTTP 20" in result, result

    def subscribed() -> bool:
        rows = get(running, "/subscriptions")["subscriptions"]
        return any(r["exchange"] == "binance" and r["symbol"] == ADDED for r in rows)

    wait_for(subscribed, 30, f"{ADDED} in GET /subscriptions")
    key = f"binance:{ADDED}"
    wait_for(lambda: (coin_records(browser, key) or 0) > 0, 45, f"{ADDED} records on the page")
    coin = get(running, f"/coins/binance/{ADDED}")
    assert coin["state"] == "subscribed" and coin["records"].get("trade", 0) > 0
    assert browser.evaluate(f"document.querySelector('[data-subscription=\"{key}\"]') !== null")

    print("dashboard screenshot:", browser.screenshot(SCREENSHOT))
    assert browser.console_errors() == []


def ladder(browser: Browser) -> list[tuple[str, float]]:
    """(side, price) of the ladder's rows, top to bottom."""
    return [
        (side, float(price))
        for side, price in browser.evaluate(
            "[...document.querySelectorAll('#book-ladder tr[data-side]')]"
            ".map(tr => [tr.dataset.side, tr.querySelector('.price').textContent])"
        )
    ]


def test_the_dashboard_shows_a_depth_ladder_for_a_chosen_coin(running: Worker, browser: Browser) -> None:
    browser.open(f"http://127.0.0.1:{running.port}/")
    wanted = ",".join(f"binance:{symbol}" for symbol in CONFIGURED)
    wait_for(
        lambda: (
            browser.evaluate("[...document.getElementById('book-coin').options].map(o => o.value).join()")
            == wanted
        ),
        60,
        "the coins with order books offered",
    )
    browser.evaluate(
        "const coin = document.getElementById('book-coin'); coin.value = 'binance:ETH/USDT';"
        "coin.dispatchEvent(new Event('change'));"
    )
    rows = wait_for(lambda: len(found := ladder(browser)) == 20 and found, 30, "ten asks and ten bids")
    sides = [side for side, _ in rows]
    assert sides == ["ask"] * 10 + ["bid"] * 10
    prices = [price for _, price in rows]
    assert prices == sorted(prices, reverse=True) and prices[9] > prices[10]  # best ask above best bid
    state = browser.evaluate("document.getElementById('book-state').textContent")
    assert state.startswith("synced") and "served by" in state
    wait_for(
        lambda: browser.evaluate("document.getElementById('book-state').textContent") != state,
        30,
        "the ladder to follow the book",
    )
    assert browser.evaluate(
        "document.querySelector('tr[data-coin=\"binance:ETH/USDT\"] .state-synced') !== null"
    )
    browser.evaluate("document.getElementById('book').scrollIntoView()")
    print("depth ladder screenshot:", browser.screenshot(LADDER_SCREENSHOT))
    assert browser.console_errors() == []
