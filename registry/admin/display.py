"""Formatting helpers of the fleet admin (pure; also used by the reconciler's admin pages)."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone
from django.utils.html import format_html

from ..models import Node

STATUS_COLOURS = {
    Node.Status.HEALTHY: "#2e7d32",
    Node.Status.PENDING: "#6d4c41",
    Node.Status.DRAINING: "#ef6c00",
    Node.Status.UNHEALTHY: "#c62828",
    Node.Status.OFFLINE: "#616161",
}


def human_bytes(value: int | None) -> str:
    """``25769803776`` -> ``"24.0 GiB"``; binary units, one decimal above bytes."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"  # pragma: no cover


def age(moment: datetime | None, *, now: datetime | None = None) -> str:
    """``"12 s ago"``, ``"3 min ago"``, ``"2 h ago"``, ``"4 d ago"``; ``"never"`` for None."""
    if moment is None:
        return "never"
    seconds = int(((now or timezone.now()) - moment).total_seconds())
    if seconds < 0:
        return "in the future"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def status_badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#616161")
    return format_html(
        '<span class="fleet-badge" style="background:{};color:#fff;padding:1px 7px;border-radius:8px;'
        'font-size:11px;white-space:nowrap">{}</span>',
        colour,
        status,
    )
