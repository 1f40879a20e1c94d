"""Scheduled floors (``registry.floor_schedule``): parsing and evaluation, pure, no database."""

from datetime import UTC, datetime

import pytest

from registry import floor_schedule as fs

WORKING_HOURS = {"days": "mon-fri", "start": "08:00", "end": "18:00", "min_replicas": 3}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def floor(specs, when, min_replicas=1, max_replicas=0):
    return fs.effective_floor(min_replicas, fs.parse(specs), at(when), max_replicas=max_replicas)


def test_working_hours_raise_the_floor_inside_the_window_only():
    # 2026-11-23 is a Monday.
    assert floor([WORKING_HOURS], "2026-11-23T07:59") == 1
    assert floor([WORKING_HOURS], "2026-11-23T08:00") == 3  # start inclusive
    assert floor([WORKING_HOURS], "2026-11-27T17:59") == 3  # Friday
    assert floor([WORKING_HOURS], "2026-11-27T18:00") == 1  # end exclusive
    assert floor([WORKING_HOURS], "2026-11-28T12:00") == 1  # Saturday


def test_a_window_never_lowers_the_stored_floor():
    assert floor([{**WORKING_HOURS, "min_replicas": 1}], "2026-11-23T09:00", min_replicas=2) == 2


def test_the_highest_open_window_wins():
    specs = [WORKING_HOURS, {"days": "*", "start": "12:00", "end": "14:00", "min_replicas": 5}]
    assert floor(specs, "2026-11-23T12:30") == 5
    assert floor(specs, "2026-11-23T15:00") == 3
    assert floor(specs, "2026-11-28T12:30") == 5  # every day


def test_a_window_crossing_midnight_belongs_to_its_start_day():
    night = [{"days": "fri", "start": "22:00", "end": "06:00", "min_replicas": 2}]
    assert floor(night, "2026-11-27T21:59", min_replicas=0) == 0
    assert floor(night, "2026-11-27T23:00", min_replicas=0) == 2  # Friday evening
    assert floor(night, "2026-11-28T05:59", min_replicas=0) == 2  # Saturday morning
    assert floor(night, "2026-11-28T06:00", min_replicas=0) == 0
    assert floor(night, "2026-11-27T03:00", min_replicas=0) == 0  # Friday morning: Thursday not listed


def test_the_time_zone_is_the_windows_wall_clock():
    paris = [{**WORKING_HOURS, "timezone": "Europe/Paris"}]  # UTC+1 in November
    assert floor(paris, "2026-11-23T07:30") == 3  # 08:30 in Paris
    assert floor(paris, "2026-11-23T17:30") == 1  # 18:30 in Paris
    # Summer time: UTC+2.
    assert floor(paris, "2026-07-06T06:30") == 3


def test_day_lists_and_ranges_wrapping_over_the_week_end():
    assert fs.parse([{**WORKING_HOURS, "days": "fri-mon"}])[0].days == frozenset({4, 5, 6, 0})
    assert fs.parse([{**WORKING_HOURS, "days": "Sat, sun"}])[0].days == frozenset({5, 6})
    assert fs.parse([{**WORKING_HOURS, "days": "*"}])[0].days == frozenset(range(7))


def test_all_day_and_end_of_day():
    whole = [{"days": "sat", "start": "00:00", "end": "24:00", "min_replicas": 4}]
    assert floor(whole, "2026-11-28T00:00") == 4
    assert floor(whole, "2026-11-28T23:59") == 4
    assert floor(whole, "2026-11-29T00:00") == 1


def test_the_ceiling_caps_the_scheduled_floor():
    with pytest.raises(fs.ScheduleError, match="window 0: min_replicas 3 > max_replicas 2"):
        fs.parse([WORKING_HOURS], max_replicas=2)
    # A stored schedule is evaluated with the clamp whatever the ceiling became.
    windows = fs.parse([WORKING_HOURS])
    assert fs.effective_floor(1, windows, at("2026-11-23T09:00"), max_replicas=2) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mon-fri", "a window must be an object"),
        ({**WORKING_HOURS, "days": "weekdays"}, "unknown day"),
        ({**WORKING_HOURS, "days": ""}, '"days" must be'),
        ({**WORKING_HOURS, "start": "8"}, '"start" must be "HH:MM"'),
        ({**WORKING_HOURS, "start": "08:60"}, "between 00:00 and 24:00"),
        ({**WORKING_HOURS, "end": "24:01"}, "between 00:00 and 24:00"),
        ({**WORKING_HOURS, "start": "24:00"}, '"start" must be before 24:00'),
        ({**WORKING_HOURS, "end": "08:00"}, "must differ"),
        ({**WORKING_HOURS, "min_replicas": -1}, "integer >= 0"),
        ({**WORKING_HOURS, "min_replicas": True}, "integer >= 0"),
        ({**WORKING_HOURS, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({**WORKING_HOURS, "timezone": "America"}, "unknown time zone"),
        ({**WORKING_HOURS, "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({**WORKING_HOURS, "timezone": "a\x00b"}, "unknown time zone"),
        ({**WORKING_HOURS, "zone": "UTC"}, "unknown field"),
        ({"days": "*", "start": "08:00", "end": "09:00"}, "missing field"),
    ],
)
def test_bad_windows_are_refused_with_their_position(spec, message):
    with pytest.raises(fs.ScheduleError, match=message) as caught:
        fs.parse([WORKING_HOURS, spec])
    assert caught.value.args[0].startswith("window 1: ")


def test_schedule_shape():
    assert fs.parse(None) == () and fs.parse([]) == ()
    with pytest.raises(fs.ScheduleError, match="must be a list"):
        fs.parse({"days": "*"})
    with pytest.raises(fs.ScheduleError, match="at most"):
        fs.parse([WORKING_HOURS] * (fs.MAX_WINDOWS + 1))


def test_stored_text_is_decoded_once_and_a_broken_one_applies_nothing():
    assert fs.parse_text("[]") == () and fs.parse_text(None) == ()
    text = '[{"days": "mon-fri", "start": "08:00", "end": "18:00", "min_replicas": 3}]'
    assert fs.parse_text(text) is fs.parse_text(text)
    assert (
        fs.parse_text('[{"days": "mon", "start": "08:00", "end": "09:00", "min_replicas": 1, "timezone": "X/Y"}]') == ()
    )


def test_describe():
    assert fs.describe(fs.parse([{**WORKING_HOURS, "timezone": "Europe/Paris"}])[0]) == (
        "mon,tue,wed,thu,fri 08:00-18:00 Europe/Paris: 3"
    )
