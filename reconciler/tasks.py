"""django-q2 entry points (thin: the work is in ``reconcile.py``)."""

from __future__ import annotations

from django.conf import settings

from .reconcile import run_leader


def run_scheduled_reconcile(budget: float | None = None) -> dict:
    """The every-minute scheduled task: a leader loop.

    Takes the reconcile try-lock (returns at once with ``skipped: held`` if another run has
    it), runs a pass every ``RECONCILE_INTERVAL`` seconds until ``RECONCILE_LEADER_BUDGET``
    (default 50 s, under the Q_CLUSTER timeout) is spent, and returns the summary, which
    django-q2 stores as the task result.
    """
    budget = float(settings.RECONCILE_LEADER_BUDGET if budget is None else budget)
    return run_leader(budget=budget).as_dict()
