"""The in-process handoff of raw batches on a worker that runs its own embedded broker."""

from __future__ import annotations

import asyncio

from agents.handoff import TAKE_MAX, RawHandoff


async def test_batches_come_out_in_order_and_in_takes_of_at_most_take_max() -> None:
    handoff = RawHandoff("binance")
    for n in range(TAKE_MAX + 3):
        handoff.put(f"binance:{n % 2}", bytes([n]))
    first, second = await handoff.take(), await handoff.take()
    assert len(first) == TAKE_MAX and len(second) == 3
    assert [item.value[0] for item in first + second] == list(range(TAKE_MAX + 3))
    assert first[1].group == "binance:1" and handoff.queued_bytes == 0


async def test_take_waits_for_the_next_batch() -> None:
    handoff = RawHandoff("binance")
    waiting = asyncio.ensure_future(handoff.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    handoff.put("binance:0", b"x")
    assert [item.value for item in await asyncio.wait_for(waiting, 1)] == [b"x"]


def test_beyond_its_bound_newer_batches_are_not_queued_and_counted() -> None:
    handoff = RawHandoff("binance", max_bytes=10)
    handoff.put("binance:0", b"123456")
    handoff.put("binance:0", b"123456")  # would pass the bound: not queued (the engine repairs the gap)
    assert handoff.queued_bytes == 6 and handoff.dropped == 1
