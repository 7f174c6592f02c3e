"""FlowWatch: a stall is a silence long against the connection's own pace, never a quiet market."""

from __future__ import annotations

from streams.liveness import FlowWatch


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
