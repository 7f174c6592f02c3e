"""A slot's stop() ends its task even when a cancellation is lost on the way (pure: no socket)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agents.slot import Slot


async def test_stop_ends_a_slot_whose_task_lost_a_cancellation() -> None:
    cancellations = 0

    async def loses_the_first_cancellation() -> None:
        nonlocal cancellations
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancellations += 1  # dropped, as Python 3.11's wait_for can when its inner wait completes
        await asyncio.Event().wait()

    slot = Slot(cast(Any, None), cast(Any, None), "binance-0", "")
    task = slot._task = asyncio.create_task(loses_the_first_cancellation())
    await asyncio.sleep(0)  # the task is waiting
    async with asyncio.timeout(30):
        await slot.stop()
    assert task.cancelled() and cancellations == 1
    assert slot._task is None and slot.state == "ready"
    await slot.stop()  # idempotent
