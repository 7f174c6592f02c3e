"""When a connection's silence stops being a quiet market and becomes a stall.

A stalled connection stays open, keeps answering pings, and delivers nothing. A fixed timeout either
fires in a quiet market or lets a busy stream stall for a minute, so the watch judges silence against
the connection's own recent pace: frames counted per second over the `window` seconds before its
last frame give the usual gap between frames, and a silence longer than `factor` such gaps (at
least `min_silence`, at most `max_silence`) is a stall. A connection that has not carried enough
frames yet to know its pace falls back to `max_silence`.

Pure: callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

import math

# `stalled` asks for a silence longer than the limit: a look exactly at it would find none.
JUDGEMENT_MARGIN = 0.001


class FlowWatch:
    FACTOR = 8.0

    def __init__(
        self,
        now: float,
        *,
        window: int = 30,
        factor: float = FACTOR,
        min_silence: float = 2.0,
        max_silence: float = 60.0,
        min_frames: int = 20,
    ) -> None:
        self.window = window
        self.factor = factor
        self.min_silence = min_silence
        self.max_silence = max_silence
        self.min_frames = min_frames
        self._counts = [0] * window  # frames per second, a ring over the last `window` seconds
        self._second = math.floor(now)
        self.last_frame = now
        self._counting_since = now  # the ring covers the time since then (at most `window` seconds)

    def _roll(self, now: float) -> None:
        second = math.floor(now)
        if second - self._second >= self.window:
            self._counts = [0] * self.window
            self._counting_since = now
        else:
            for passed in range(self._second + 1, second + 1):
                self._counts[passed % self.window] = 0
        self._second = max(self._second, second)

    def frame(self, now: float) -> None:
        """A data frame arrived (not a keepalive answer)."""
        second = math.floor(now)
        if second != self._second:  # most frames come within the second of the one before
            self._roll(now)
        self._counts[second % self.window] += 1
        self.last_frame = now

    def silence_limit(self, now: float) -> float:
        # The pace up to the last frame: the silence being judged must not water it down.
        frames = sum(self._counts)
        span = min(self.window, max(1.0, self.last_frame - self._counting_since))
        if frames < self.min_frames:
            return self.max_silence
        usual_gap = span / frames
        return min(self.max_silence, max(self.min_silence, self.factor * usual_gap))

    def stalled(self, now: float) -> bool:
        return now - self.last_frame > self.silence_limit(now)

    def next_judgement(self, now: float) -> float:
        """The earliest moment from `now` on that `stalled` could be true: just past the present
        silence's limit (now, if that has passed), or `min_silence` from now, since frames from now
        on can shorten the pace's gap. A watcher may sleep until then instead of looking at a pace."""
        limit_at = max(now, self.last_frame + self.silence_limit(now))
        return min(limit_at, now + self.min_silence) + JUDGEMENT_MARGIN
