"""FlowWatch: a stall is a silence long against the connection's own pace, never a quiet market."""

from __future__ import annotations

import pytest

from streams.liveness import JUDGEMENT_MARGIN, FlowWatch


def flowing(frames_per_second: float, seconds: float, start: float = 0.0) -> FlowWatch:
    watch = FlowWatch(start)
    step = 1 / frames_per_second
    t = start
    while t < start + seconds:
        watch.frame(t)
        t += step
    return watch


def test_a_busy_connection_is_stalled_after_a_few_seconds_of_silence() -> None:
    watch = flowing(20, 30)  # 20 frames a second
    last = watch.last_frame
    assert not watch.stalled(last + 1.9)
    assert watch.stalled(last + 2.1)  # 8 gaps of 50 ms are less than the 2 s floor


def test_a_connection_of_a_few_frames_a_second_is_given_longer() -> None:
    watch = flowing(1, 30)
    last = watch.last_frame
    assert not watch.stalled(last + 7.5)
    assert watch.stalled(last + 8.5)


def test_a_quiet_market_is_no_stall() -> None:
    watch = flowing(0.2, 30)  # too few frames to know a pace: only the ceiling counts
    assert not watch.stalled(watch.last_frame + 59)
    assert watch.stalled(watch.last_frame + 61)


def test_a_fresh_connection_waits_for_the_ceiling_before_it_knows_its_pace() -> None:
    watch = FlowWatch(100.0)
    assert not watch.stalled(150.0)
    assert watch.stalled(161.0)


def test_old_seconds_leave_the_window() -> None:
    watch = flowing(20, 30)
    # A long silence long ago does not count: after it, the pace is learnt again.
    late = watch.last_frame + 100
    for n in range(40):
        watch.frame(late + n * 0.05)
    assert watch.silence_limit(late + 2) == 2.0  # 20 a second again, not watered down by the silence


def _looks(start: float, end: float) -> list[float]:
    return [start + n * 0.01 for n in range(int((end - start) / 0.01))]


@pytest.mark.parametrize("frames_per_second", [20, 1, 0.2])
@pytest.mark.parametrize("silent_for", [0.0, 1.5, 7.0, 59.5])
def test_no_stall_can_be_called_before_the_next_judgement(
    frames_per_second: float, silent_for: float
) -> None:
    watch = flowing(frames_per_second, 30)
    now = watch.last_frame + silent_for
    at = watch.next_judgement(now)
    assert now < at <= now + watch.min_silence + JUDGEMENT_MARGIN
    if watch.stalled(now):  # a silence already past its limit is judged at once
        assert at == pytest.approx(now + JUDGEMENT_MARGIN)
    # No frame comes: the silence is no stall before `at`, and at `at` it is one if its limit came.
    assert not any(watch.stalled(t) for t in _looks(now, at - JUDGEMENT_MARGIN))
    limit_at = watch.last_frame + watch.silence_limit(now)
    if limit_at <= now + watch.min_silence:  # the judgement is the limit's: the stall is there at once
        assert watch.stalled(at)
    else:  # the floor's: nothing yet, the watcher only looks again
        assert not watch.stalled(at)
    # Frames come at once, as many as can shorten the pace: still nothing to call before `at`.
    for _ in range(1000):
        watch.frame(now)
    assert not any(watch.stalled(t) for t in _looks(now, at - JUDGEMENT_MARGIN))


def test_a_busy_connection_is_judged_at_its_limit_and_a_quiet_one_within_the_floor() -> None:
    busy = flowing(20, 30)  # limit 2 s
    at = busy.next_judgement(busy.last_frame + 0.5)
    assert at == pytest.approx(busy.last_frame + 2.0 + JUDGEMENT_MARGIN)
    fresh = FlowWatch(100.0)  # no pace yet: limit 60 s, but frames could come and set one
    assert fresh.next_judgement(110.0) == pytest.approx(112.0 + JUDGEMENT_MARGIN)
