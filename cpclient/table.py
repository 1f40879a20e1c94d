"""Plain-text output of the CLI, as ``kubectl`` prints it: aligned columns under upper-case
headers, ``describe`` blocks of ``Key:  value`` lines, ages such as ``42s``, ``7m``, ``3h``.
Standard library only; no terminal width detection (columns are never cut)."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

NONE = "<none>"
GAP = "   "  # between two columns, as kubectl


def cell(value: Any) -> str:
    """A value as one table cell: ``<none>`` for None or empty, ``true``/``false`` for booleans,
    control characters (a newline in a message) shown as spaces so that a row stays one line."""
    if value is None or value == "" or value == {} or value == []:
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (East Asian) characters take two, combining
    marks none."""
    total = 0
    for c in text:
        if unicodedata.combining(c):
            continue
        total += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return total


def pad(text: str, columns: int) -> str:
    return text + " " * max(columns - width(text), 0)


def column_widths(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[int]:
    widths = [width(header) for header in headers]
    for row in rows:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], width(cell(value)))
    return widths


def format_row(values: Sequence[Any], widths: Sequence[int]) -> str:
    """One line: every column padded to its width but the last (no trailing blanks)."""
    cells = [cell(value) for value in values]
    padded = [pad(text, widths[index]) for index, text in enumerate(cells[:-1])]
    return GAP.join([*padded, cells[-1]]) if cells else ""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Headers and rows as aligned columns (one line each, joined by newlines, no trailing
    newline). Every row must have as many values as there are headers."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row of {len(row)} values under {len(headers)} headers")
    widths = column_widths(headers, rows)
    return "\n".join(format_row(line, widths) for line in [list(headers), *rows])


def format_fields(pairs: Sequence[tuple[str, Any]], indent: int = 0) -> str:
    """``describe``'s ``Key:  value`` lines, values aligned after the longest key."""
    if not pairs:
        return ""
    longest = max(width(key) for key, _ in pairs) + 1
    prefix = " " * indent
    return "\n".join(f"{prefix}{pad(key + ':', longest)}  {cell(value)}" for key, value in pairs)


def indent(text: str, by: int = 2) -> str:
    return "\n".join(" " * by + line if line else line for line in text.split("\n"))


def parse_instant(value: str | None) -> datetime | None:
    if not value:
        return None
    instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def age(seconds: float | None) -> str:
    """A duration as ``kubectl`` shows ages: ``0s`` .. ``119s``, ``2m`` .. ``9m59s`` with
    seconds below 10 minutes, ``10m`` .. ``179m``, ``3h`` .. ``7h59m`` with minutes below 8 hours,
    ``8h`` .. ``47h``, then days (``2d``, ``7d23h`` below 8 days, ``8d`` ...); negative (a clock
    ahead of this one) shows as ``0s``; None as ``<none>``."""
    if seconds is None:
        return NONE
    s = max(int(seconds), 0)
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def age_of(value: str | None, now: datetime) -> str:
    """The age of an ISO 8601 instant at ``now``."""
    instant = parse_instant(value)
    return NONE if instant is None else age((now - instant).total_seconds())


def labels_text(labels: dict[str, str] | None) -> str:
    """``key=value,key2=value2`` by key (kubectl's LABELS column); ``<none>`` when empty."""
    if not labels:
        return NONE
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def size(value: int | None) -> str:
    """Bytes as ``8.0Gi``, ``512Mi``, ``0``."""
    if not value:
        return "0"
    units = ["", "Ki", "Mi", "Gi", "Ti", "Pi"]
    amount = float(value)
    for unit in units:
        if amount < 1024 or unit == units[-1]:
            return f"{amount:.0f}{unit}" if unit in ("", "Ki", "Mi") else f"{amount:.1f}{unit}"
        amount /= 1024
    return str(value)  # pragma: no cover - the loop always returns
