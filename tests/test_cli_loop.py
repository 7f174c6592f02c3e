"""`collector worker` picks uvloop unless a loop is chosen (agents/cli.py)."""

from __future__ import annotations

import pytest

from agents.cli import with_default_loop


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker", "-l", "info"], ["--loop", "uvloop", "worker", "-l", "info"]),
        (["-L", "aio", "worker"], ["-L", "aio", "worker"]),
        (["--loop=aio", "worker"], ["--loop=aio", "worker"]),
        (["worker", "--loop", "aio"], ["worker", "--loop", "aio"]),
        (["tail", "market.trade.binance.btc-usdt"], ["tail", "market.trade.binance.btc-usdt"]),
        ([], []),
    ],
)
def test_the_worker_runs_on_uvloop_unless_a_loop_is_chosen(args: list[str], expected: list[str]) -> None:
    assert with_default_loop(args) == expected
