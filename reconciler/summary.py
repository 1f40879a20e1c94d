"""What one reconcile pass did: counts by action and by reason skipped, stored as a
``ReconcilePass`` row and exported to ``/metrics``."""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from .models import ReconcilePass

HOLDER_HOST = socket.gethostname()


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass
class PassSummary:
    """What one pass did. ``actions`` and ``skipped`` count by name; only non-zero counts are
    kept. ``outcome`` is ``ok``, ``skipped`` (``reason`` = ``held``: another pass runs) or
    ``error`` (``reason`` = the error)."""

    started_at: datetime
    outcome: str = ReconcilePass.Outcome.OK
    reason: str = ""
    duration_s: float = 0.0
    nodes: int = 0
    models: int = 0  # autoscaled models planned
    known_models: int = 0  # every model with a config, load info or replica rows
    actions: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    holder: str = field(default_factory=lambda: f"{HOLDER_HOST}:{os.getpid()}")
    # A database error that may have cost the connection, and with it the reconcile lock.
    fatal: bool = False

    def count(self, action: str, n: int = 1) -> None:
        if n:
            self.actions[action] += n

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] += n

    def as_dict(self) -> dict:
        return {
            "outcome": str(self.outcome),
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "duration_s": round(self.duration_s, 4),
            "nodes": self.nodes,
            "models": self.models,
            "known_models": self.known_models,
            "actions": dict(sorted(self.actions.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "holder": self.holder,
        }

    def __str__(self) -> str:
        if self.outcome != ReconcilePass.Outcome.OK:
            return f"{self.outcome}: {self.reason}"
        parts = [f"{n} {name}" for name, n in sorted(self.actions.items())]
        parts += [f"skipped {n} {name}" for name, n in sorted(self.skipped.items())]
        return "ok: " + (", ".join(parts) if parts else "nothing to do")
