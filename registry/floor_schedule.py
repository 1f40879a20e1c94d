"""Scheduled floors (docs/autoscaling.md): a higher ``min_replicas`` that applies in a time
window, for pre-warming (working hours, a daily batch). Pure functions, no database.

A model's scheduling config holds a list of windows (``floor_schedule``), each a JSON object::

    {"days": "mon-fri", "start": "08:00", "end": "18:00", "min_replicas": 3,
     "timezone": "Europe/Paris"}

- ``days``: ``*`` (every day) or a comma-separated list of day names and ranges
  (``mon-fri``, ``sat,sun``, ``fri-mon`` wraps over the week end); names are the first three
  letters, in English, any case.
- ``start``/``end``: ``HH:MM`` wall-clock times in ``timezone`` (an IANA name, default
  ``UTC``); ``end`` may be ``24:00``. The window is ``[start, end)``. A window whose end is
  not after its start crosses midnight: it starts on a listed day and ends on the next day
  (``"days": "fri", "start": "22:00", "end": "06:00"`` is Friday 22:00 to Saturday 06:00).
- ``min_replicas``: the floor while the window is open.

The effective floor at an instant is the largest of ``min_replicas`` and the floors of the
windows open then (``effective_floor``), never above ``max_replicas`` when a ceiling is set
(writing a config refuses a window floor above its ceiling; the clamp guards the rule anyway).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 32
_KEYS = {"days", "start", "end", "min_replicas", "timezone"}


class Window(NamedTuple):
    days: frozenset[int]  # 0 = Monday ... 6 = Sunday (``datetime.weekday``)
    start: int  # minutes after midnight, 0..1439
    end: int  # minutes after midnight, 1..1440; <= start: crosses midnight
    min_replicas: int
    timezone: str = "UTC"

    def is_open(self, now: datetime) -> bool:
        """Whether the window is open at ``now`` (an aware datetime)."""
        local = now.astimezone(_zone(self.timezone))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Crosses midnight: the evening part on a listed day, the morning part on the day after.
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


class ScheduleError(ValueError):
    """A floor schedule that does not parse; ``args[0]`` says why, naming the window."""


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _days(text) -> frozenset[int]:
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError('"days" must be "*" or day names such as "mon-fri" or "sat,sun"')
    text = text.strip().lower()
    if text in ("*", "daily"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ScheduleError(f'"days": unknown day in {part.strip()!r} (use {", ".join(DAYS)})')
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _minutes(value, field: str) -> int:
    if not isinstance(value, str):
        raise ScheduleError(f'"{field}" must be a "HH:MM" string')
    hours, sep, minutes = value.strip().partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        raise ScheduleError(f'"{field}" must be "HH:MM", not {value!r}')
    total = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or total > 24 * 60:
        raise ScheduleError(f'"{field}" must be between 00:00 and 24:00, not {value!r}')
    return total


def parse_window(spec) -> Window:
    """One window from its JSON object; ``ScheduleError`` when it is not one."""
    if not isinstance(spec, dict):
        raise ScheduleError("a window must be an object with days, start, end and min_replicas")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ScheduleError(f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = {"days", "start", "end", "min_replicas"} - set(spec)
    if missing:
        raise ScheduleError(f"missing field(s): {', '.join(sorted(missing))}")
    floor = spec["min_replicas"]
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ScheduleError('"min_replicas" must be an integer >= 0')
    timezone = spec.get("timezone", "UTC")
    if not isinstance(timezone, str) or not timezone:
        raise ScheduleError('"timezone" must be an IANA time zone name such as "Europe/Paris"')
    try:
        _zone(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # unknown; a path; a directory ("America")
        raise ScheduleError(f'"timezone": unknown time zone {timezone!r}') from None
    start, end = _minutes(spec["start"], "start"), _minutes(spec["end"], "end")
    if start == 24 * 60:
        raise ScheduleError('"start" must be before 24:00')
    if start == end:
        raise ScheduleError('"start" and "end" must differ (an all-day floor is "00:00" to "24:00")')
    return Window(_days(spec["days"]), start, end, floor, timezone)


def parse(specs, *, max_replicas: int = 0) -> tuple[Window, ...]:
    """A whole schedule (a list of window objects; None or [] = none). ``ScheduleError`` names
    the first bad window by its position; a window floor above a ceiling (``max_replicas >
    0``) is refused."""
    if specs is None:
        return ()
    if not isinstance(specs, list):
        raise ScheduleError("the floor schedule must be a list of windows")
    if len(specs) > MAX_WINDOWS:
        raise ScheduleError(f"at most {MAX_WINDOWS} windows")
    windows = []
    for position, spec in enumerate(specs):
        try:
            window = parse_window(spec)
        except ScheduleError as exc:
            raise ScheduleError(f"window {position}: {exc.args[0]}") from None
        if max_replicas > 0 and window.min_replicas > max_replicas:
            raise ScheduleError(f"window {position}: min_replicas {window.min_replicas} > max_replicas {max_replicas}")
        windows.append(window)
    return tuple(windows)


@lru_cache(maxsize=1024)
def parse_text(text: str | None) -> tuple[Window, ...]:
    """A stored schedule from its JSON text (as the reconciler's snapshot reads it), decoded
    once per distinct text; a stored schedule that no longer parses (a time zone gone from the
    system's database) applies no window rather than stopping the pass."""
    if not text or text in ("[]", "null"):
        return ()
    try:
        return parse(json.loads(text))
    except (ScheduleError, ValueError):
        return ()


def effective_floor(min_replicas: int, windows: tuple[Window, ...], now: datetime, *, max_replicas: int = 0) -> int:
    """``max(min_replicas, floors of the windows open at now)``, at most ``max_replicas`` when
    a ceiling is set (``max_replicas > 0``)."""
    floor = min_replicas
    for window in windows:
        if window.min_replicas > floor and window.is_open(now):
            floor = window.min_replicas
    if max_replicas > 0:
        floor = min(floor, max(max_replicas, min_replicas))
    return floor


def describe(window: Window) -> str:
    """``mon-fri 08:00-18:00 Europe/Paris: 3`` (admin, messages)."""
    days = "*" if len(window.days) == 7 else ",".join(DAYS[d] for d in sorted(window.days))

    def hhmm(minutes: int) -> str:
        return f"{minutes // 60:02d}:{minutes % 60:02d}"

    return f"{days} {hhmm(window.start)}-{hhmm(window.end)} {window.timezone}: {window.min_replicas}"
