"""Pure limiters: backoff, the shared connect-attempt window, message pacing, REST weight budget."""

from __future__ import annotations

from streams.exchanges.binance import BinanceAdapter
from streams.limits import Backoff, SlidingWindow, WeightBudget, connect_window, message_window


def upper(low: float, high: float) -> float:
    return high


def test_backoff_doubles_from_one_second_to_a_thirty_second_cap_with_jitter_below_the_step() -> None:
    backoff = Backoff(uniform=upper)
    assert [backoff.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    jittered = Backoff()
    delays = [jittered.next_delay() for _ in range(6)]
    assert all(step / 2 <= d <= step for d, step in zip(delays, [1, 2, 4, 8, 16, 30], strict=True))


def test_backoff_resets_only_after_a_stable_connection() -> None:
    backoff = Backoff(uniform=upper, stable_after=60)
    for _ in range(4):
        backoff.next_delay()
    backoff.connection_lasted(59.0)
    assert backoff.next_delay() == 16.0
    backoff.connection_lasted(60.0)
    assert backoff.next_delay() == 1.0


def test_a_sliding_window_allows_the_limit_then_waits_for_the_oldest_to_expire() -> None:
    window = SlidingWindow(3, 10.0)
    for now in (0.0, 1.0, 2.0):
        assert window.delay(now) == 0.0
        window.record(now)
    assert window.delay(2.5) == 7.5  # the attempt at 0.0 leaves the window at 10.0
    assert window.delay(10.0) == 0.0
    assert window.used(10.0) == 2


def test_the_connect_window_keeps_half_of_binances_attempt_limit_so_a_mass_drop_cannot_storm() -> None:
    limits = BinanceAdapter.limits
    window = connect_window(limits.max_connection_attempts, limits.connection_attempt_window_seconds)
    assert window.limit == 150 and window.window == 300
    # 400 connections dropping at once: admit attempts as the window allows, then count the
    # most attempts any 300 s stretch sees.
    now, admitted = 0.0, []
    for _ in range(400):
        now += window.delay(now)
        window.record(now)
        admitted.append(now)
    busiest = max(sum(1 for t in admitted if start <= t < start + 300) for start in admitted)
    assert busiest <= limits.max_connection_attempts // 2


def test_message_pacing_stays_below_five_per_second_with_room_for_pongs() -> None:
    window = message_window(BinanceAdapter.limits.max_incoming_messages_per_second)
    sent, now = [], 0.0
    for _ in range(20):
        now += window.delay(now)
        window.record(now)
        sent.append(now)
    for index in range(len(sent) - 3):
        assert sent[index + 3] - sent[index] >= 1.0  # never 4 in one second; Binance allows 5


def test_the_weight_budget_uses_half_the_limit_believes_the_exchange_and_honours_retry_after() -> None:
    budget = WeightBudget(6000)
    assert budget.budget == 3000
    for _ in range(120):
        assert budget.delay(0.0, 25) == 0.0
        budget.spend(0.0, 25)
    assert budget.delay(1.0, 25) == 59.0  # 3000 spent: wait for the minute to roll
    assert budget.delay(60.0, 25) == 0.0
    budget.reported(61.0, 2990)  # another process used weight: the exchange's count wins
    assert budget.delay(61.0, 25) > 0
    budget.block(62.0, 30)
    assert budget.delay(130.0, 1) == 0.0
    budget.block(130.0, 30)
    assert budget.delay(140.0, 1) == 20.0
