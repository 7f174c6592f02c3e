"""The manager's configuration keys, `monitoring.alerts.*`, and how they reach its settings."""

from __future__ import annotations

import re

import pytest

from streams.config import ConfigError, parse_config
from tables.manager import ManagerSettings

EXCHANGES = {
    "binance": {
        "wsEndpoint": "wss://stream.binance.com:9443",
        "restEndpoint": "https://api.binance.com",
        "symbols": ["BTC/USDT"],
        "dataTypes": ["trade"],
    }
}


def test_alert_settings_have_defaults_and_can_be_set() -> None:
    defaults = parse_config({"exchanges": EXCHANGES}).monitoring.alerts
    assert (defaults.webhookUrl, defaults.staleAfterSeconds, defaults.stuckAfterSeconds) == (None, 60.0, 60.0)
    assert (defaults.recoveryAttempts, defaults.behindAfterSeconds) == (3, 10.0)
    alerts = {"webhookUrl": "https://hooks.example/x", "staleAfterSeconds": 2.5, "recoveryAttempts": 5}
    chosen = parse_config({"exchanges": EXCHANGES, "monitoring": {"alerts": alerts}}).monitoring.alerts
    assert (chosen.webhookUrl, chosen.staleAfterSeconds, chosen.recoveryAttempts) == (
        "https://hooks.example/x", 2.5, 5,
    )  # fmt: skip


def test_the_manager_and_health_take_their_thresholds_from_the_alert_settings() -> None:
    alerts = {
        "staleAfterSeconds": 2.5,
        "stuckAfterSeconds": 4,
        "recoveryAttempts": 7,
        "behindAfterSeconds": 0.25,
    }
    chosen = parse_config({"exchanges": EXCHANGES, "monitoring": {"alerts": alerts}}).monitoring.alerts
    assert ManagerSettings.from_alerts(chosen) == ManagerSettings(
        stale_after_ms=2_500, stuck_after_ms=4_000, recovery_attempts=7, behind_after_ms=250
    )
    defaults = parse_config({"exchanges": EXCHANGES}).monitoring.alerts
    assert ManagerSettings.from_alerts(defaults) == ManagerSettings()


@pytest.mark.parametrize(
    ("alerts", "named"),
    [
        ({"webhookUrl": "ftp://x"}, "monitoring.alerts.webhookUrl: must be an http:// or https:// URL"),
        ({"staleAfterSeconds": 0}, "monitoring.alerts.staleAfterSeconds"),
        ({"behindAfterSeconds": -1}, "monitoring.alerts.behindAfterSeconds"),
        ({"recoveryAttempts": 0}, "monitoring.alerts.recoveryAttempts"),
        ({"emailTo": "ops@example"}, "monitoring.alerts.emailTo: unknown key"),
    ],
)
def test_bad_alert_settings_are_refused_by_key(alerts: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config({"exchanges": EXCHANGES, "monitoring": {"alerts": alerts}})
