"""The pure load-aware autoscaling rule (registry/autoscale.py): clamps, delays, zero, wake-up."""

from datetime import UTC, datetime, timedelta

import pytest

from registry import autoscale

T0 = datetime(2026, 1, 1, tzinfo=UTC)
UP, DOWN = timedelta(seconds=30), timedelta(seconds=600)


def test_desired_is_ceil_of_load_over_target():
    assert autoscale.desired_replicas(12.5, 4, min_replicas=1, max_replicas=0) == 4
    assert autoscale.desired_replicas(16.0, 8, min_replicas=0, max_replicas=0) == 2
    assert autoscale.desired_replicas(16.0000001, 8, min_replicas=0, max_replicas=0) == 2


def test_desired_is_clamped_to_floor_and_ceiling():
    assert autoscale.desired_replicas(0.0, 4, min_replicas=2, max_replicas=5) == 2
    assert autoscale.desired_replicas(100.0, 4, min_replicas=1, max_replicas=5) == 5
    assert autoscale.desired_replicas(100.0, 4, min_replicas=1, max_replicas=0) == 25


def test_idle_model_with_min_zero_desires_zero():
    assert autoscale.desired_replicas(0.0, 8, min_replicas=0, max_replicas=4) == 0


def test_wake_up_is_sized_by_waiting_requests():
    assert autoscale.desired_replicas(0.0, 8, min_replicas=0, max_replicas=0, waiting=40) == 5
    assert autoscale.desired_replicas(0.0, 8, min_replicas=0, max_replicas=3, waiting=40) == 3
    assert autoscale.desired_replicas(0.0, 8, min_replicas=0, max_replicas=0, waiting=1) == 1


def test_target_must_be_positive():
    with pytest.raises(ValueError):
        autoscale.desired_replicas(1.0, 0, min_replicas=0, max_replicas=0)


def test_average_first_sample_and_gap_take_the_sample():
    window = timedelta(seconds=60)
    assert autoscale.average(0.0, None, 10, T0, window) == 10.0
    assert autoscale.average(3.0, T0, 10, T0 + timedelta(seconds=61), window) == 10.0


def test_average_moves_toward_the_sample_with_elapsed_time():
    window = timedelta(seconds=60)
    short = autoscale.average(0.0, T0, 10, T0 + timedelta(seconds=5), window)
    longer = autoscale.average(0.0, T0, 10, T0 + timedelta(seconds=30), window)
    assert 0.0 < short < longer < 10.0
    assert autoscale.average(4.0, T0, 10, T0, window) == 4.0


def test_a_whole_window_without_anything_in_flight_is_a_load_of_zero():
    window = timedelta(seconds=60)
    # Passes every 10 s after a burst of 12 that ended at T0: the average alone only tends to 0.
    average, at = 12.0, T0
    for step in range(1, 6):
        now = T0 + timedelta(seconds=10 * step)
        average, at = autoscale.average(average, at, 0, now, window, busy_at=T0), now
        assert average > 0.0
    assert autoscale.average(average, at, 0, T0 + timedelta(seconds=60), window, busy_at=T0) == 0.0
    # Something in flight now, or within the window: no shortcut.
    assert autoscale.average(2.0, T0, 1, T0 + timedelta(seconds=60), window, busy_at=T0) > 0.0
    assert autoscale.average(2.0, T0, 0, T0 + timedelta(seconds=10), window, busy_at=T0) > 0.0
    # Never seen busy: 0.
    assert autoscale.average(2.0, T0, 0, T0 + timedelta(seconds=10), window, busy_at=None) == 0.0


def test_upscale_waits_for_its_delay():
    first = autoscale.decide(
        current=1, desired=3, previous_desired=None, previous_since=None, now=T0, upscale_delay=UP, downscale_delay=DOWN
    )
    assert first == autoscale.Decision(3, T0, 1, "up_pending")
    later = T0 + timedelta(seconds=29)
    held = autoscale.decide(
        current=1, desired=4, previous_desired=3, previous_since=T0, now=later, upscale_delay=UP, downscale_delay=DOWN
    )
    assert held == autoscale.Decision(4, T0, 1, "up_pending")  # same side: the clock keeps running
    done = autoscale.decide(
        current=1,
        desired=4,
        previous_desired=4,
        previous_since=T0,
        now=T0 + UP,
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert done == autoscale.Decision(4, T0, 4, "scale_up")


def test_downscale_waits_for_its_delay_and_a_reversal_restarts_the_clock():
    pending = autoscale.decide(
        current=4,
        desired=1,
        previous_desired=6,
        previous_since=T0,
        now=T0 + DOWN,
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert pending.reason == "down_pending" and pending.since == T0 + DOWN and pending.target == 4
    done = autoscale.decide(
        current=4,
        desired=1,
        previous_desired=1,
        previous_since=T0,
        now=T0 + DOWN,
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert done == autoscale.Decision(1, T0, 1, "scale_down")


def test_steady_when_desire_matches_current():
    steady = autoscale.decide(
        current=2,
        desired=2,
        previous_desired=2,
        previous_since=T0,
        now=T0 + DOWN,
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert steady == autoscale.Decision(2, T0, 2, "steady")


def test_scale_to_zero_after_the_downscale_delay():
    pending = autoscale.decide(
        current=1,
        desired=0,
        previous_desired=0,
        previous_since=T0,
        now=T0 + DOWN - timedelta(seconds=1),
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert pending.target == 1 and pending.reason == "down_pending"
    gone = autoscale.decide(
        current=1,
        desired=0,
        previous_desired=0,
        previous_since=T0,
        now=T0 + DOWN,
        upscale_delay=UP,
        downscale_delay=DOWN,
    )
    assert gone.target == 0 and gone.reason == "scale_down"


def test_wake_up_skips_the_upscale_delay():
    woken = autoscale.decide(
        current=0,
        desired=5,
        previous_desired=None,
        previous_since=None,
        now=T0,
        upscale_delay=UP,
        downscale_delay=DOWN,
        waking=True,
    )
    assert woken == autoscale.Decision(5, T0, 5, "scale_up")


def test_explain_says_why():
    text = autoscale.explain(12.5, timedelta(seconds=60), 4, 4)
    assert text == "in-flight 12.5 avg over 60s, target 4 -> 4 replicas"
    assert "40 waiting at zero" in autoscale.explain(0.0, timedelta(seconds=60), 8, 5, waiting=40)
