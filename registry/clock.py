"""The registry's one clock helper: every time-dependent verb takes ``now=`` so tests can pass a
fixed clock, and resolves it here."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone


def resolve_now(now: datetime | None) -> datetime:
    """``now`` when the caller fixed the clock, else the current time."""
    return now if now is not None else timezone.now()
