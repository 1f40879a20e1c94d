"""``manage.py reconcile --loop`` survives a database outage (found by the e2e fault scenario g:
the loop process used to exit with a traceback when PostgreSQL restarted)."""

import io

import pytest
from django.core.management import call_command
from django.db import OperationalError
from django.utils import timezone

from reconciler import reconcile
from reconciler.reconcile import LOST, LeaderSummary

pytestmark = pytest.mark.django_db


def test_the_loop_retries_after_database_errors_and_lost_connections(monkeypatch):
    calls = []

    def run_leader(*, budget, interval, standby, sleep):
        calls.append(budget)
        if len(calls) == 1:
            raise OperationalError("connection refused")
        if len(calls) == 2:
            return LeaderSummary(started_at=timezone.now(), reason=LOST)
        return LeaderSummary(started_at=timezone.now(), passes=3)

    monkeypatch.setattr(reconcile, "run_leader", run_leader)
    out = io.StringIO()
    call_command("reconcile", "--loop", "--interval", "0.01", "--budget", "30", stdout=out)
    assert len(calls) == 3
    assert calls[1] < 30 and calls[2] < calls[1]  # the budget keeps counting down across retries
    assert '"passes": 3' in out.getvalue()


def test_an_outage_longer_than_the_budget_ends_in_an_error(monkeypatch):
    def run_leader(**kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(reconcile, "run_leader", run_leader)
    with pytest.raises(Exception, match="database connection lost"):
        call_command("reconcile", "--loop", "--interval", "0.01", "--budget", "0.05", stdout=io.StringIO())
