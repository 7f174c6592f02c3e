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


def test_importing_the_code_builds_no_app() -> None:
    """Only the composition root builds an app, when asked: importing any module (the `faust -A`
    entry point agents.app aside) has no such side effect, so import order never matters."""
    import subprocess
    import sys

    probe = """
import gc, importlib, pkgutil, faust
for package in ("streams", "agents", "tables", "simulator"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if info.name not in ("agents.app", "simulator.__main__"):
            importlib.import_module(info.name)
print(sum(isinstance(o, faust.App) for o in gc.get_objects()))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0", result.stderr
