"""Raw batches handed straight to the normalizer, on a worker that runs its own embedded broker.

The embedded broker (Tansu, memory-only) spends time on every fetch in proportion to the record
batches already stored in the partition fetched, and never deletes one: a worker reading its own raw
topic back made it saturate within minutes (docs/benchmarks.md, "How long the embedded broker lasts").
A worker that started the broker also dies with it (and the broker with the worker), so reading raw
back buys no crash recovery there either. So on such a worker the source hands each raw batch to the
normalizer in-process, in order per connection group, and still writes it to `raw.<exchange>` for
anyone who wants the frames as received; nothing consumes the raw topic.

The handoff is bounded in bytes: when the normalizer cannot keep up (the broker paused, say) beyond
that, newer batches are not queued. Their frames' sequence numbers then jump, and the continuity
engine repairs what they carried from the exchange's REST history, as any gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from agents.normalize import Normalizer, RawInput

log = logging.getLogger(__name__)

MAX_QUEUED_BYTES = 256 * 1024 * 1024
TAKE_MAX = 64  # raw batches per normalize step, as the Faust agent takes them


def _nothing() -> None:
    """A step's acknowledgement needs no action: there are no input offsets to commit."""


class RawHandoff:
    """One exchange's raw batches on their way from the source to the normalizer."""

    def __init__(self, exchange: str, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.exchange = exchange
        self.max_bytes = max_bytes
        self._queue: deque[RawInput] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.dropped = 0
        self._dropping = False

    def put(self, group: str, value: bytes) -> None:
        if self._bytes + len(value) > self.max_bytes:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.error(
                    "%s: the normalizer is %d MB behind; raw batches are not queued until it catches up "
                    "(their trades are repaired from REST history)",
                    self.exchange, self._bytes // (1024 * 1024),
                )  # fmt: skip
            return
        self._dropping = False
        self._queue.append(RawInput(value, group))
        self._bytes += len(value)
        self._ready.set()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    async def take(self) -> list[RawInput]:
        """The next batches, oldest first (waits until there are some)."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        taken: list[RawInput] = []
        while self._queue and len(taken) < TAKE_MAX:
            item = self._queue.popleft()
            self._bytes -= len(item.value)
            taken.append(item)
        return taken


async def normalize_handed_over(handoff: RawHandoff, normalizer: Normalizer) -> None:
    """The in-process counterpart of the normalize agent: runs until cancelled."""
    while True:
        batch = await handoff.take()
        try:
            await normalizer.handle(batch, _nothing)
        except Exception:  # a bug in one step must not stop normalizing; the engine repairs the gap
            log.exception("normalize.%s: a step failed; its raw batches are skipped", handoff.exchange)
