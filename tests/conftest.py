"""Fixtures shared by test modules: real database servers (tests/servers.py)."""

pytest_plugins = ["tests.servers"]
