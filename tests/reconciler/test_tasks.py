"""The leader loop, the retired django-q2 schedule and ``manage.py reconcile``."""

import io
import json
import threading
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django_q.models import Schedule

from reconciler.models import ReconcilePass
from reconciler.reconcile import run_leader
from registry.locks import LockKey, advisory_lock
from tests.concurrency import held_in_another_thread
from tests.reconciler.fakes import FakeProber, FakeScheduler

pytestmark = pytest.mark.django_db


@pytest.mark.django_db(transaction=True)  # migrating backwards (SQLite: outside a transaction)
def test_migrating_removes_the_retired_reconcile_schedule():
    """Earlier versions ran the leader loop as a django-q2 schedule; its task is gone (the
    qcluster's leader process runs the passes), so migrating removes the schedule."""
    before = [("reconciler", "0002_unanswered_listings")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    django_q_leaf = [key for key in executor.loader.graph.leaf_nodes() if key[0] == "django_q"]
    old_apps = executor.loader.project_state(before + django_q_leaf).apps
    old_apps.get_model("django_q", "Schedule").objects.create(
        name="controlplane.reconcile", func="reconciler.tasks.run_scheduled_reconcile", schedule_type="I", minutes=1
    )
    Schedule.objects.create(name="someone.elses", func="app.tasks.job", schedule_type=Schedule.HOURLY)

    call_command("migrate", verbosity=0)

    assert list(Schedule.objects.values_list("name", flat=True)) == ["someone.elses"]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def test_the_leader_runs_a_pass_every_interval_until_its_budget_ends():
    clock = FakeClock()

    result = run_leader(
        budget=50, interval=10, scheduler=FakeScheduler(), prober=FakeProber(), clock=clock, sleep=clock.sleep
    )

    assert (result.outcome, result.passes) == ("ok", 5)  # passes start at 0, 10, 20, 30, 40 s
    assert ReconcilePass.objects.count() == 5
    assert result.as_dict()["last"]["outcome"] == "ok"


@pytest.fixture
def stop_requested():
    from reconciler import shutdown

    yield shutdown.STOP_REQUESTED
    shutdown.STOP_REQUESTED.clear()


def test_a_stopping_qcluster_ends_the_leader_loop_after_the_current_pass(stop_requested):
    """SIGTERM in a qcluster worker sets the event (reconciler.shutdown): the 50 s loop ends
    after the pass it is running, and its sleep ends at once."""
    clock = FakeClock()

    def pass_then_stop(seconds):
        stop_requested.set()  # the signal arrives while the loop sleeps after its first pass
        clock.sleep(seconds)

    result = run_leader(
        budget=50, interval=10, scheduler=FakeScheduler(), prober=FakeProber(), clock=clock, sleep=pass_then_stop
    )
    assert (result.outcome, result.passes, result.reason) == ("ok", 1, "stopping")

    skipped = run_leader(budget=50, interval=10, scheduler=FakeScheduler(), prober=FakeProber())
    assert (skipped.outcome, skipped.passes, skipped.reason) == ("skipped", 0, "stopping")


def test_the_leader_loop_sleep_ends_when_the_qcluster_stops(stop_requested):
    from reconciler import shutdown

    threading.Timer(0.2, stop_requested.set).start()
    began = time.monotonic()
    shutdown.pause(30)
    assert time.monotonic() - began < 5


def another_holder(close_thread_connections, key=LockKey.RECONCILE_LEADER):
    """``key`` held by another process (another connection) for the with-block; the block's
    value lets go of it early."""
    return held_in_another_thread(lambda: advisory_lock(key, timeout=5), close_thread_connections)


def test_a_leader_returns_at_once_when_another_leader_holds_the_lock(close_thread_connections):
    with another_holder(close_thread_connections):
        result = run_leader(budget=50).as_dict()

    assert (result["outcome"], result["reason"], result["passes"]) == ("skipped", "held", 0)
    assert list(ReconcilePass.objects.values_list("outcome", flat=True)) == ["skipped"]


def test_a_standby_leader_takes_over_when_the_lock_is_released(close_thread_connections):
    clock = FakeClock()
    attempts = []
    with another_holder(close_thread_connections) as let_go:

        def sleep(seconds):
            attempts.append(clock.t)
            if len(attempts) == 2:
                let_go()
            clock.sleep(seconds)

        result = run_leader(
            budget=60, interval=10, standby=True, scheduler=FakeScheduler(), prober=FakeProber(), clock=clock, sleep=sleep
        )

    assert result.outcome == "ok"
    assert result.passes == 4  # took over at 20 s, passes at 20, 30, 40, 50


def test_the_leader_skips_a_tick_while_a_forced_pass_runs_and_keeps_leading(close_thread_connections):
    """The leader holds the leader lock for its run but the pass lock only for each pass: a
    forced pass (``POST /api/v1/reconcile``) runs between the leader's passes, one at a time."""
    clock = FakeClock()
    ticks = []
    with another_holder(close_thread_connections, LockKey.RECONCILE) as let_go:  # a pass is running

        def sleep(seconds):
            ticks.append(clock.t)
            if len(ticks) == 1:
                let_go()
            clock.sleep(seconds)

        result = run_leader(
            budget=30, interval=10, scheduler=FakeScheduler(), prober=FakeProber(), clock=clock, sleep=sleep
        )

    assert (result.outcome, result.passes, result.skipped["held"]) == ("ok", 2, 1)  # passes at 10, 20 s
    assert ReconcilePass.objects.filter(outcome=ReconcilePass.Outcome.OK).count() == 2


def test_manage_py_reconcile_once_prints_the_summary():
    out = io.StringIO()

    call_command("reconcile", "--once", stdout=out)

    summary = json.loads(out.getvalue())
    assert summary["outcome"] == "ok"
    assert ReconcilePass.objects.count() == 1


def test_manage_py_reconcile_loop_stops_after_its_budget():
    out = io.StringIO()

    call_command("reconcile", "--loop", "--interval", "0.05", "--budget", "0.12", stdout=out)

    result = json.loads(out.getvalue())
    assert result["passes"] >= 2


def test_manage_py_reconcile_rejects_loop_options_without_loop():
    with pytest.raises(CommandError):
        call_command("reconcile", "--budget", "5")
