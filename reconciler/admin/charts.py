"""Small charts of the fleet admin, rendered on the server as inline SVG (no JavaScript, no CDN,
nothing fetched by the browser). Pure: data in, markup out.

Time runs left to right over a fixed window (``start`` .. ``end``); values are scaled to the
largest one shown (at least 1). Every mark carries a ``<title>`` (a browser shows it on hover,
a screen reader reads it), and every chart an ``aria-label`` saying what it shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

AXIS = 28  # px left of the plot for the value labels
FOOT = 14  # px below the plot for the time labels


@dataclass(frozen=True)
class Mark:
    """One bar or dot: when, how much, its CSS class (colour) and its hover text."""

    at: datetime
    value: float
    css: str = ""
    title: str = ""


@dataclass(frozen=True)
class _Frame:
    start: datetime
    end: datetime
    width: int
    height: int
    top: float

    @property
    def plot_width(self) -> float:
        return self.width - AXIS

    @property
    def plot_height(self) -> float:
        return self.height - FOOT

    def x(self, at: datetime) -> float:
        span = (self.end - self.start).total_seconds() or 1.0
        share = min(max((at - self.start).total_seconds() / span, 0.0), 1.0)
        return round(AXIS + share * self.plot_width, 1)

    def y(self, value: float) -> float:
        return round(self.plot_height - min(max(value, 0) / self.top, 1.0) * (self.plot_height - 2), 1)


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _svg(frame: _Frame, label: str, body: list[str], *, unit: str, css: str) -> SafeString:
    minutes = round((frame.end - frame.start).total_seconds() / 60)
    axes = [
        f'<line class="chart-axis" x1="{AXIS}" y1="{frame.plot_height}" x2="{frame.width}" y2="{frame.plot_height}"/>',
        f'<text class="chart-label" x="{AXIS - 3}" y="9" text-anchor="end">{_number(frame.top)}{escape(unit)}</text>',
        f'<text class="chart-label" x="{AXIS - 3}" y="{frame.plot_height}" text-anchor="end">0</text>',
        f'<text class="chart-label" x="{AXIS}" y="{frame.height - 2}">-{minutes} min</text>',
        f'<text class="chart-label" x="{frame.width}" y="{frame.height - 2}" text-anchor="end">now</text>',
    ]
    return mark_safe(  # noqa: S308  (every text in it went through escape())
        f'<svg class="chart {css}" role="img" aria-label="{escape(label)}" width="{frame.width}" '
        f'height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>{''.join(axes)}{''.join(body)}</svg>"
    )


def bars(
    marks: Sequence[Mark], *, start: datetime, end: datetime, label: str, unit: str = "", width=480, height=90
) -> SafeString:
    """One thin bar per mark (e.g. a reconcile pass: its duration, or its actions)."""
    frame = _Frame(start, end, width, height, max([1.0, *(m.value for m in marks)]))
    body = []
    for mark in marks:
        x, y = frame.x(mark.at), frame.y(mark.value)
        body.append(
            f'<rect class="chart-bar {escape(mark.css)}" x="{x - 1}" y="{y}" width="2" height="{frame.plot_height - y}">'
            f"<title>{escape(mark.title)}</title></rect>"
        )
    return _svg(frame, label, body, unit=unit, css="chart-bars")


def dots(
    marks: Sequence[Mark], *, start: datetime, end: datetime, label: str, unit: str = "", width=480, height=90
) -> SafeString:
    """One dot per mark (e.g. a cold load: how long it took, when it ended)."""
    frame = _Frame(start, end, width, height, max([1.0, *(m.value for m in marks)]))
    body = [
        f'<circle class="chart-dot {escape(mark.css)}" cx="{frame.x(mark.at)}" cy="{frame.y(mark.value)}" r="3">'
        f"<title>{escape(mark.title)}</title></circle>"
        for mark in marks
    ]
    return _svg(frame, label, body, unit=unit, css="chart-dots")


def steps(
    series: Sequence[tuple[str, str, Sequence[tuple[datetime, float]]]],
    *,
    start: datetime,
    end: datetime,
    label: str,
    width=180,
    height=40,
) -> SafeString:
    """Step lines, one per ``(name, css, [(at, value), ...])`` (points oldest first; a value
    holds until the next point, the last one until ``end``; a point before ``start`` gives the
    value the window opens with). E.g. a model's ready and desired replica counts."""
    frame = _Frame(start, end, width, height, max([1.0, *(v for _, _, points in series for _, v in points)]))
    body = []
    for name, css, points in series:
        if not points:
            continue
        coordinates = []
        for index, (at, value) in enumerate(points):
            x, y = frame.x(at), frame.y(value)
            if index:
                coordinates.append(f"{x},{coordinates[-1].split(',')[1]}")
            coordinates.append(f"{x},{y}")
        coordinates.append(f"{frame.x(end)},{coordinates[-1].split(',')[1]}")
        last = points[-1][1]
        body.append(
            f'<polyline class="chart-line {escape(css)}" fill="none" points="{" ".join(coordinates)}">'
            f"<title>{escape(name)}: {_number(last)} now</title></polyline>"
        )
    return _svg(frame, label, body, unit="", css="chart-steps")
