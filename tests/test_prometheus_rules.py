"""deploy/prometheus (recording and alert rules, their promtool unit tests, the example config) and the
Grafana dashboard in deploy/grafana, against promtool, a real Prometheus and docs/operations.md."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import yaml

from agents import metrics
from agents.embedded_broker import free_port
from streams.records import MarketRecord, Trade
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RECORDING_RULES = PROMETHEUS_DIR / "collector-recording-rules.yml"
ALERT_RULES = PROMETHEUS_DIR / "collector-alert-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "collector-rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "collector.json"
RUNBOOK = REPO / "docs" / "operations.md"
README = REPO / "README.md"

# Metrics being added on other branches as this is written (continuity, order books, distribution,
# sinks). They are documented in README's metrics table when those land; until then the rules and the
# dashboard may name them too.
ANNOUNCED_METRICS = {
    "collector_spool_bytes", "collector_gaps_total", "collector_records_lost_total",
    "collector_book_age_seconds", "collector_books", "collector_book_resyncs_total",
    "collector_ws_clients", "collector_ws_messages_sent_total", "collector_ws_disconnects_total",
    "collector_sink_rows_total", "collector_sink_lag_seconds", "collector_sink_errors_total",
}  # fmt: skip
# What Grafana puts in place of the dashboard's variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$exchange": ".*", "$job": ".*", "$__range": "6h", "$__rate_interval": "1m"}

RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
RAW_NAME = re.compile(r"(?<![\w:])(?:collector|process)_[a-z0-9_]+(?![\w:])")


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make test` installs it (Debian package prometheus)"
    return found


def run_promtool(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """promtool's report, failures (stderr) in their place among the rest (stdout)."""
    return subprocess.run(
        [promtool(), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=PROMETHEUS_DIR,
    )  # fmt: skip


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RECORDING_RULES)["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable, variables replaced as Grafana does."""
    document = json.loads(DASHBOARD.read_text())
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels(document["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # label_values(<series selector>, label) is Grafana's; the selector inside is PromQL.
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, f"variable {variable['name']}: {query}"
            found.append((f"variable {variable['name']}", selector.group(1)))
    substituted = []
    for where, expr in found:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a variable this test does not know: {expr}"
        substituted.append((where, expr))
    return substituted


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> dict[str, str]:
    return {
        github_anchor(line.lstrip("#")): line.lstrip("#").strip()
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }


# ---- promtool: the rule files, their unit tests, the example config ---------------------------------


def test_the_rule_files_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", RECORDING_RULES, ALERT_RULES)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS: 44 rules found" in result.stdout and "SUCCESS: 11 rules found" in result.stdout


def test_the_example_config_loads_both_rule_files() -> None:
    result = run_promtool("check", "config", EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stdout
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    checks: dict[str, set[bool]] = {rule["alert"]: set() for rule in alert_rules()}
    for group in load_yaml(RULE_TESTS)["tests"]:
        for check in group.get("alert_rule_test", []):
            checks[check["alertname"]].add(bool(check.get("exp_alerts")))
    assert {name: seen for name, seen in checks.items() if seen != {True, False}} == {}


def mutated_suite(directory: Path, alert: str, change: str) -> Path:
    """A promtool test file whose alert rules have `alert` changed, keeping only the checks that must
    catch the change: "never" (the alert cannot fire) is caught by the checks that expect it firing;
    "always" (it fires on anything) and "no-for" (its `for:` removed) by those that expect it silent."""
    rules = load_yaml(ALERT_RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                if change == "never":
                    rule["expr"] = "vector(1) > 2"
                elif change == "always":
                    rule["expr"] = "vector(1)"
                else:
                    del rule["for"]
    rules_path = directory / f"{alert}-{change}.rules.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    suite = load_yaml(RULE_TESTS)
    suite["rule_files"] = [str(RECORDING_RULES), str(rules_path)]
    want_firing = change == "never"
    kept = []
    for group in suite["tests"]:
        group.pop("promql_expr_test", None)
        group["alert_rule_test"] = [
            check
            for check in group.get("alert_rule_test", [])
            if check["alertname"] == alert and bool(check.get("exp_alerts")) == want_firing
        ]
        if group["alert_rule_test"]:
            kept.append(group)
    suite["tests"] = kept
    path = directory / f"{alert}-{change}.test.yml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_the_unit_tests_fail_when_an_alert_never_fires_or_fires_too_soon(tmp_path: Path) -> None:
    suites = {
        mutated_suite(tmp_path, rule["alert"], change): f"{rule['alert']} {change}"
        for rule in alert_rules()
        # An alert with a `for:` shows its silent checks bite by losing it; one without, by always firing.
        for change in ("never", "no-for" if "for" in rule else "always")
    }
    result = run_promtool("test", "rules", *suites, timeout=300)
    reports = {part.split("\n", 1)[0].strip(): part for part in result.stdout.split("Unit Testing:")[1:]}
    passed = [name for path, name in suites.items() if "FAILED" not in reports[str(path)]]
    assert len(suites) == 22 and passed == [], f"mutations no test caught: {passed}"


# ---- the runbook ----------------------------------------------------------------------------------------


def test_every_alert_links_its_own_runbook_section() -> None:
    anchors = runbook_anchors()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", url
        assert anchors.get(anchor) == rule["alert"], f"{rule['alert']}: no section {url}"
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]


def test_every_recorded_series_is_described_in_the_runbook() -> None:
    anchors = runbook_anchors()
    assert "recording-rules" in anchors
    text = RUNBOOK.read_text()
    section = text[text.index("## Recording rules") :]
    missing = [rule["record"] for rule in recording_rules() if f"`{rule['record']}`" not in section]
    assert missing == []
    assert RECORDING_RULES.read_text().count("# runbook: docs/operations.md#recording-rules") == len(
        load_yaml(RECORDING_RULES)["groups"]
    )


# ---- names: every series read is recorded here or exposed by the collector ------------------------------


def documented_metrics() -> set[str]:
    text = README.read_text()
    table = text[text.index("### Metrics") :]
    table = table[: table.index("\n#")]
    names = set()
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) < 2:
            continue
        for name in re.findall(r"`(collector_[a-z0-9_]+)`", cells[0]):
            names.add(name)
            if cells[1] == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def test_the_rules_and_the_dashboard_read_only_recorded_or_exposed_series() -> None:
    recorded = {rule["record"] for rule in recording_rules()}
    known = documented_metrics() | ANNOUNCED_METRICS
    sources = [(f"recording rule {rule['record']}", rule["expr"]) for rule in recording_rules()]
    sources += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    sources += dashboard_queries()
    unknown = []
    for where, expr in sources:
        unknown += [(where, name) for name in RECORDED_NAME.findall(expr) if name not in recorded]
        unknown += [
            (where, name)
            for name in RAW_NAME.findall(expr)
            if name not in known and not name.startswith("process_")
        ]
    assert unknown == []
    assert "collector_memory_limit_bytes" in documented_metrics()
    assert "collector_latency_seconds_bucket" in known


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 40
    # promtool parses and type-checks each expression as it would a rule's.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{index}", "expr": expr} for index, (_, expr) in enumerate(queries)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout


def test_the_dashboard_shows_what_the_issue_lists() -> None:
    document = json.loads(DASHBOARD.read_text())
    rows = [panel["title"] for panel in document["panels"] if panel["type"] == "row"]
    for topic in ("Rates", "Latency", "Connections", "Gaps, loss and spool", "Sinks"):
        assert topic in rows
    ids = [panel["id"] for panel in dashboard_panels(document["panels"])]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert variables == {"datasource", "job", "exchange"}


# ---- a real Prometheus: the rules over the collector's own exposition, the dashboard's queries -----------

E2E_EXCHANGE = "rules-e2e"


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def collector_exposition(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """/metrics of this process's collector registry; each scrape first books 100 frames, 2 of them
    dead-lettered, and 100 trades 20 ms from the exchange and 200 ms to their acknowledgement."""
    meter = metrics.flow_meter(E2E_EXCHANGE)
    metrics.frames_received(E2E_EXCHANGE, 100, 20_000)
    meter.dead_letter("invalid-json")
    meter.dead_letter("schema-mismatch")
    topic = f"market.trade.{E2E_EXCHANGE}.btc-usdt"
    for index in range(100):
        data = Trade(price="1", quantity="1", side="buy", trade_id=str(index), trade_time=1_000)
        meter.record(MarketRecord(E2E_EXCHANGE, "BTC/USDT", "trade", 1_000, 1_020, data), topic)
    meter.acknowledged(meter.hand_over(), raw_bytes=20_000, acknowledged_at={topic: 1_220})
    start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
    return [metrics.exposition()]


class Prometheus:
    """A `prometheus` server on a free port over a temporary folder."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        self._log = self.log_path.open("w")
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make test` installs it (Debian package prometheus)"
        self.process = subprocess.Popen(
            [
                binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, float]:
        """Instant vector → {its labels but the name, as `key=value,...`: value}."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        found = {}
        for item in answer["data"]["result"]:
            labels = sorted((key, value) for key, value in item["metric"].items() if key != "__name__")
            found[",".join(f"{key}={value}" for key, value in labels)] = float(item["value"][1])
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.mark.e2e
def test_prometheus_runs_the_rules_on_the_collector_exposition_and_answers_every_dashboard_query(
    tmp_path: Path,
) -> None:
    metrics.connection_opened(E2E_EXCHANGE, reconnect=False)
    metrics.set_memory_limit()
    exporter = make_server("127.0.0.1", 0, collector_exposition, handler_class=QuietHandler)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    prometheus = Prometheus(tmp_path, {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RECORDING_RULES), str(ALERT_RULES)],
        "scrape_configs": [{"job_name": "collector", "static_configs": [
            {"targets": [f"127.0.0.1:{exporter.server_port}"]}
        ]}],
    })  # fmt: skip
    try:
        wait_for(prometheus.ready, 30, "prometheus to be ready")

        # Both files loaded as they are, every rule evaluated without an error.
        def evaluated() -> list[dict[str, Any]] | None:
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

        rules = wait_for(evaluated, 30, "every rule to be evaluated")
        assert len(rules) == 55, [rule.get("lastError") for rule in rules if rule["health"] != "ok"]

        # The recorded series, computed from the collector's exposition as prometheus_client writes it.
        def recorded(expr: str) -> dict[str, float]:
            return wait_for(lambda: prometheus.query(expr), 30, f"a value of {expr}")

        on = f'{{exchange="{E2E_EXCHANGE}"}}'
        ratio = recorded(f"exchange:collector_deadletters_per_received:ratio_rate2m{on}")
        assert ratio == {f"exchange={E2E_EXCHANGE}": pytest.approx(0.02)}
        p95 = recorded(f"exchange_stage:collector_latency_seconds:p95_rate2m{on}")
        assert p95 == {
            f"exchange={E2E_EXCHANGE},stage=exchange_to_receive": pytest.approx(0.0195),  # in (0.01, 0.02]
            f"exchange={E2E_EXCHANGE},stage=receive_to_append": pytest.approx(0.1975),  # in (0.15, 0.2]
        }
        within = recorded(f"exchange_stage:collector_latency_within_100ms:ratio_rate5m{on}")
        assert within == {
            f"exchange={E2E_EXCHANGE},stage=exchange_to_receive": 1.0,
            f"exchange={E2E_EXCHANGE},stage=receive_to_append": 0.0,
        }
        assert recorded(f"exchange:collector_connections_active:sum{on}") == {f"exchange={E2E_EXCHANGE}": 1.0}
        [memory] = recorded("instance:collector_memory_usage:ratio").values()
        assert 0 < memory < 1
        assert recorded("instance:collector_cpu_seconds:rate2m")

        # 2 % dead letters: the error-rate alert is pending (it fires after 5 minutes).
        def pending() -> bool:
            alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
            return any(
                alert["labels"]["alertname"] == "CollectorErrorRateHigh"
                and alert["labels"].get("exchange") == E2E_EXCHANGE
                and alert["state"] == "pending"
                for alert in alerts
            )

        wait_for(pending, 30, "CollectorErrorRateHigh to be pending")

        for where, expr in dashboard_queries():
            answer = prometheus.get("/api/v1/query", query=expr)
            assert answer["status"] == "success", (where, expr, answer)
    finally:
        prometheus.stop()
        exporter.shutdown()
        exporter.server_close()
