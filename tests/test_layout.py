"""`tables` and `agents` are also names of other PyPI projects: make sure ours are the ones imported."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["streams", "agents", "tables", "simulator"])
def test_package_names_resolve_to_this_repository(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / package


def test_every_exchange_module_registers_an_adapter_under_its_module_name() -> None:
    from streams.exchanges import adapters

    found = adapters()
    assert "binance" in found
    for name, adapter in found.items():
        assert adapter.__module__ == f"streams.exchanges.{name.replace('-', '_')}"


def test_the_command_line_does_not_build_the_app_before_it_has_started_the_broker() -> None:
    # streams.app reads COLLECTOR_KAFKA_BROKERS at import; the CLI sets it after starting the broker.
    import subprocess
    import sys

    probe = "import sys, agents.cli; print('streams.app' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr
