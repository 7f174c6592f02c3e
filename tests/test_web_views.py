"""End to end: the state tables behind the web views, /metrics, alerts and JSON logs, on two workers.

One simulator, one embedded broker and two worker processes are shared by the module. The state lives
in one table partition, so one worker owns it and the other forwards table-backed requests there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.embedded_broker import EmbeddedBroker
from streams.events import decode_event
from streams.topics import EVENTS
from tables.records import ALERTS, decode_alert
from tests.harness import Simulator, TopicReader, Worker, wait_for, write_config

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
DATA_TYPES = ["trade", "bbo"]  # both stop while the simulator is paused, so coins can go stale
STALE_AFTER = 3.0
STUCK_AFTER = 2.0


class WebhookReceiver:
    """A local HTTP server that keeps the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Cluster:
    def __init__(
        self, broker: EmbeddedBroker, simulator: Simulator, workers: list[Worker], webhook: WebhookReceiver
    ) -> None:
        self.broker, self.simulator, self.workers, self.webhook = broker, simulator, workers, webhook


def get(worker: Worker, path: str) -> Any:
    status, body = worker.request(path)
    assert status == 200, f"{path}: HTTP {status} {body}"
    return body


def coins_flowing(worker: Worker) -> bool:
    status, body = worker.request("/coins")
    if status != 200:
        return False
    states = {c["symbol"]: c for c in body["coins"]}
    return all(
        s in states and states[s]["state"] == "subscribed" and states[s]["recordsTotal"] > 0 for s in SYMBOLS
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("web")
    webhook = WebhookReceiver()
    with EmbeddedBroker() as broker:
        simulator = Simulator(SYMBOLS, rate=20)
        config = write_config(
            tmp / "c.yaml", simulator, SYMBOLS, DATA_TYPES,
            monitoring={"alerts": {
                "staleAfterSeconds": STALE_AFTER, "stuckAfterSeconds": STUCK_AFTER, "recoveryAttempts": 2,
                "webhookUrl": webhook.url,
            }},
        )  # fmt: skip
        workers = [Worker(config, broker.bootstrap, tmp, name=name) for name in ("a", "b")]
        try:
            for worker in workers:
                worker.wait_ready()
            wait_for(lambda: all(coins_flowing(w) for w in workers), 60, "both coins flowing on both workers")
            yield Cluster(broker, simulator, workers, webhook)
        finally:
            for worker in workers:
                worker.stop()
            simulator.stop()
            webhook.close()
        for worker in workers:
            assert "Traceback" not in worker.log(), worker.log()[-5000:]


def test_every_worker_answers_table_views_from_the_owner(cluster: Cluster) -> None:
    a, b = cluster.workers
    from_a, from_b = get(a, "/coins"), get(b, "/coins")
    assert from_a["servedBy"] == from_b["servedBy"]
    assert from_a["servedBy"].rsplit(":", 1)[1] in {str(a.port), str(b.port)}
    assert [c["symbol"] for c in from_a["coins"]] == [c["symbol"] for c in from_b["coins"]] == SYMBOLS

    for path in ("/coins/binance/BTC/USDT", "/coins/binance/btc-usdt"):
        for worker in (a, b):
            coin = get(worker, path)
            assert (coin["exchange"], coin["symbol"], coin["state"], coin["stale"]) == (
                "binance", "BTC/USDT", "subscribed", False,
            )  # fmt: skip
            assert set(coin["records"]) == {"trade", "bbo"}
            assert coin["recordsTotal"] == sum(coin["records"].values()) > 0
            assert coin["ageSeconds"] is not None and coin["avgReceiveIntervalMs"] > 0
            assert "applied" not in coin

    connectors = get(b, "/connectors")["connectors"]
    assert connectors, "no connectors"
    for connector in connectors:
        assert connector["state"] == "connected" and connector["connects"] >= 1
        assert connector["subscribeOk"] >= 1 and connector["subscriptionSuccessRate"] == 1.0
        assert connector["connectionId"].startswith(f"{connector['connector']}-")
        # The source reports the newest frame it received, the normalize agent how far it got.
        assert connector["lastFrameAt"] is not None and connector["normalizedThrough"] is not None
        assert 0 <= connector["pipelineLagMs"] < 10_000
    # Subscribed events name their streams, which the state agent maps to the coins each connector carries.
    assert sorted(symbol for c in connectors for symbol in c["coins"]) == SYMBOLS

    [collector] = get(a, "/collectors")["collectors"]
    assert (collector["exchange"], collector["state"]) == ("binance", "running")
    assert collector["rate"] > 0 and collector["recordsTotal"] > 0 and collector["bytesPerSecond"] > 0
    assert collector["connectors"] == collector["connectorsUp"] == len(connectors)
    assert collector["coinsSubscribed"] == len(SYMBOLS)
    for stage in ("exchange_to_receive", "receive_to_append"):
        latency = collector["latencyMs"][stage]
        assert list(latency) == ["p50", "p90", "p95", "p99"]
        assert 0 <= latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"]
    assert collector["events"]["connected"] >= 1
    assert all(w["rssBytes"] > 0 for w in collector["workers"].values())


def test_bad_coin_requests_get_clear_client_errors(cluster: Cluster) -> None:
    worker = cluster.workers[1]
    status, body = worker.request("/coins/binance/not%20a%20symbol")
    assert status == 400 and "BASE/QUOTE" in body["error"]
    status, body = worker.request("/coins/binance/DOGE/USDT")
    assert status == 404 and body["error"] == "no state for binance DOGE/USDT"
    status, _ = worker.request("/static/../views.py")
    assert status == 404


def metric_samples(worker: Worker) -> list[Any]:
    status, text = worker.request("/metrics")
    assert status == 200
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(per_worker: list[list[Any]], name: str, **labels: str) -> float:
    return sum(
        sample.value
        for samples in per_worker
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_of_every_worker_pass_promtool_and_add_up(cluster: Cluster) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs it (Debian package prometheus)"
    for worker in cluster.workers:
        _, text = worker.request("/metrics")
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()

    families = [metric_samples(w) for w in cluster.workers]
    assert total(families, "collector_connections_active", exchange="binance") >= 1
    assert total(families, "collector_connections_total", exchange="binance") >= 1
    assert total(families, "collector_messages_received_total", exchange="binance") > 0
    assert total(families, "collector_received_bytes_total", exchange="binance") > 0
    for record_type in DATA_TYPES:
        assert total(families, "collector_messages_sent_total", exchange="binance", type=record_type) > 0
    for stage in ("exchange_to_receive", "receive_to_append"):
        assert total(families, "collector_latency_seconds_count", exchange="binance", stage=stage) > 0
    assert total(families, "collector_rest_weight_used", exchange="binance") > 0
    assert total(families, "collector_events_total", exchange="binance", type="connected") >= 1
    # Table-derived gauges come from the owner only, so sums over workers stay right.
    ages = [[s for s in samples if s.name == "collector_seconds_since_last_message"] for samples in families]
    assert sorted(len(found) for found in ages) == [0, len(SYMBOLS)]
    assert sorted(s.labels["symbol"] for found in ages for s in found) == SYMBOLS
    assert total(families, "collector_coins", exchange="binance", state="subscribed") == 2


def test_silent_coins_raise_alerts_make_health_fail_and_recover(cluster: Cluster) -> None:
    a, b = cluster.workers
    wait_for(lambda: a.request("/health")[0] == 200, 30, "a healthy collector")
    status, health = b.request("/health")
    assert status == 200 and health["reasons"] == [] and health["broker"]["reachable"] is True
    assert health["pipelineBehindMs"] == {}
    reader = TopicReader(cluster.broker.bootstrap)
    cluster.simulator.post("/_sim/pause")
    try:
        # Waiting for the stale coins themselves: a silent connection is also recycled, and /health
        # may first fail for that ("collector binance is stopped") before the coins turn stale.
        def stale_coins() -> dict[str, Any] | None:
            status, health = b.request("/health")
            return health if status == 503 and health["staleCoins"] else None

        wait_for(stale_coins, 30, "health to report the stale coins")
        both = ["binance:BTC/USDT", "binance:ETH/USDT"]
        health = wait_for(
            lambda: (h := a.request("/health")[1])["staleCoins"] == both and h, 10, "both stale"
        )
        assert any(reason.startswith("2 stale coins") for reason in health["reasons"])
        alerts = wait_for(
            lambda: len(get(a, "/alerts")["open"]) == 2 and get(a, "/alerts"), 30, "two open alerts"
        )
        assert sorted(alert["key"] for alert in alerts["open"]) == [
            "coin-stale:binance:BTC/USDT", "coin-stale:binance:ETH/USDT",
        ]  # fmt: skip
    finally:
        cluster.simulator.post("/_sim/resume")
    wait_for(lambda: a.request("/health")[0] == 200, 30, "health to recover")
    wait_for(lambda: not get(b, "/alerts")["open"], 30, "the alerts to resolve")

    def firing_and_resolved() -> list[Any] | None:
        reader.follow(ALERTS)
        reader.poll(0.3)
        found = [decode_alert(m.value()) for m in reader.records.get(ALERTS, [])]
        return found if len(found) >= 4 else None

    try:
        published = wait_for(firing_and_resolved, 30, "firing and resolved alerts on the alerts topic")
    finally:
        reader.close()
    assert sorted((a.key, a.status) for a in published) == sorted(
        (f"coin-stale:binance:{symbol}", status) for symbol in SYMBOLS for status in ("firing", "resolved")
    )
    families = [metric_samples(w) for w in cluster.workers]
    assert total(families, "collector_alerts_total", exchange="binance", kind="coin-stale") == 2
    lines = [
        json.loads(line) for w in cluster.workers for line in w.log().splitlines() if line.startswith("{")
    ]
    alert_lines = [line for line in lines if line["message"].startswith("ALERT coin-stale")]
    assert len(alert_lines) == 2
    assert {line["alertKey"] for line in alert_lines} == {f"coin-stale:binance:{s}" for s in SYMBOLS}
    assert all(line["level"] == "warning" and line["logger"] == "agents.state" for line in alert_lines)
    hooked = wait_for(lambda: len(cluster.webhook.received) >= 4 and cluster.webhook.received, 10, "webhooks")
    assert sorted((a["key"], a["status"]) for a in hooked) == sorted((a.key, a.status) for a in published)


def test_logs_are_json_lines_and_quiet_on_the_hot_path(cluster: Cluster) -> None:
    def records() -> int:
        return get(cluster.workers[0], "/collectors")["collectors"][0]["recordsTotal"]

    def log_lines() -> list[list[str]]:
        return [worker.log().splitlines() for worker in cluster.workers]

    before_records, before_lines = records(), log_lines()
    wait_for(lambda: records() >= before_records + 400, 30, "400 more records")
    after_lines = log_lines()
    for before, after in zip(before_lines, after_lines, strict=True):
        # Hundreds of records flowed meanwhile; a line per record (or per batch) would show here.
        assert len(after) - len(before) < 20, after[len(before) :]
        banner = [line for line in after if line.startswith(("+", "|"))]  # Faust's start-up banner
        for line in after:
            if line and line not in banner and not line.startswith("collector:"):
                document = json.loads(line)
                assert {"time", "level", "logger", "message"} <= set(document), line


def test_stuck_connectors_get_recovery_orders_then_an_alert_that_resolves(cluster: Cluster) -> None:
    a, b = cluster.workers
    reader = TopicReader(cluster.broker.bootstrap)
    # Refused for longer than the manager needs (2 orders, each after 2 s stuck, each recycle resetting
    # the state's age): the fault is cleared as soon as the alert is seen.
    cluster.simulator.post("/_sim/faults/refuse", {"seconds": 40})
    cluster.simulator.post("/_sim/faults/drop")
    try:

        def recovery_failed() -> list[dict[str, Any]]:
            return [x for x in get(a, "/alerts")["open"] if x["kind"] == "recovery-failed"]

        failed = wait_for(recovery_failed, 35, "a recovery-failed alert")
        connectors = {c["connector"]: c for c in get(b, "/connectors")["connectors"]}
        for alert in failed:
            connector = connectors[alert["detail"]["connector"]]
            assert connector["state"] in {"failed", "recovering", "connecting"}
            assert (
                connector["recoveryRequests"] >= 2 and connector["connectFailures"] + connector["drops"] >= 1
            )
            assert "after 2 recovery attempts" in alert["message"]
    finally:
        cluster.simulator.post("/_sim/faults/clear")

    def all_connected() -> bool:
        rows = get(b, "/connectors")["connectors"]
        return all(c["state"] == "connected" for c in rows)

    wait_for(all_connected, 40, "the connectors to connect again")
    wait_for(lambda: not [x for x in get(a, "/alerts")["open"] if x["kind"] == "recovery-failed"], 10,
             "the recovery-failed alerts to resolve")  # fmt: skip
    for connector in get(a, "/connectors")["connectors"]:
        assert connector["recoveries"] >= 1 and connector["recoverySuccessRate"] is not None

    def orders() -> list[Any]:
        reader.follow(EVENTS)
        reader.poll(0.3)
        return [decode_event(m.value()) for m in reader.records.get(EVENTS, [])]

    try:
        ordered = wait_for(lambda: [e for e in orders() if e.type == "recover-requested"], 10, "the orders")
        # The worker running each ordered connector carried its order out (tests/test_e2e_recovery.py).
        carried = wait_for(lambda: [e for e in orders() if e.type == "recovered"], 10, "orders carried out")
    finally:
        reader.close()
    assert all(e.connection_id and e.detail["connector"] and e.detail["attempt"] >= 1 for e in ordered)
    assert {e.detail["connector"] for e in carried} <= {e.detail["connector"] for e in ordered}
    assert all(e.detail["commandId"].startswith("recover:") and e.detail["connectors"] for e in carried)
    assert {e.detail["attempt"] for e in ordered} >= {1, 2}
    assert wait_for(lambda: cluster.simulator.get("/_sim/stats").get("violations") == 0, 5, "no violations")


def test_state_survives_its_owner_stopping(cluster: Cluster) -> None:
    a, b = cluster.workers
    served_by = get(a, "/coins")["servedBy"]
    owner, survivor = (a, b) if served_by.endswith(f":{a.port}") else (b, a)
    before = get(survivor, "/coins/binance/BTC/USDT")
    connects_before = get(survivor, "/connectors")["connectors"][0]["connects"]
    assert owner.stop() == 0

    def recovered() -> dict[str, Any] | None:
        status, body = survivor.request("/coins/binance/BTC/USDT")
        if status != 200 or not body["servedBy"].endswith(f":{survivor.port}"):
            return None
        return body if body["recordsTotal"] > before["recordsTotal"] else None

    after = wait_for(recovered, 45, "the survivor to serve the recovered, still counting state")
    assert after["records"]["trade"] >= before["records"]["trade"]
    assert get(survivor, "/connectors")["connectors"][0]["connects"] >= connects_before
