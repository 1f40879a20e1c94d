"""django-q2 wiring, the leader loop and ``manage.py reconcile``."""

import io
import json
import threading
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import Schedule, Task
from django_q.scheduler import scheduler as run_django_q_scheduler

from reconciler.models import ReconcilePass
from reconciler.reconcile import run_leader
from reconciler.schedule import TASK, register_schedule
from registry.locks import LockKey, advisory_lock
from tests.concurrency import held_in_another_thread
from tests.reconciler.fakes import FakeProber, FakeScheduler

pytestmark = pytest.mark.django_db


def schedules():
    return Schedule.objects.filter(name=settings.RECONCILE_SCHEDULE_NAME)


def test_the_schedule_exists_once_after_migrating_twice():
    call_command("migrate", verbosity=0)
    call_command("migrate", verbosity=0)

    schedule = schedules().get()
    assert (schedule.func, schedule.schedule_type, schedule.minutes, schedule.repeats) == (
        TASK,
        Schedule.MINUTES,
        1,
        -1,
    )


def test_registering_again_restores_the_schedule_and_removes_duplicates():
    original = schedules().get()
    Schedule.objects.create(name=settings.RECONCILE_SCHEDULE_NAME, func="old.path", schedule_type=Schedule.HOURLY)
    schedules().filter(pk=original.pk).update(func="edited.by.hand")

    register_schedule(Schedule)

    schedule = schedules().get()
    assert (schedule.pk, schedule.func, schedule.schedule_type) == (original.pk, TASK, Schedule.MINUTES)
    schedules().delete()
    register_schedule(Schedule)
    assert schedules().count() == 1


@override_settings(RECONCILE_LEADER_BUDGET=0)
def test_a_scheduled_run_executes_a_pass(monkeypatch):
    """The real django-q2 scheduler, in sync mode, picks the due schedule and runs the task."""
    monkeypatch.setattr(Conf, "SYNC", True)
    schedules().update(next_run=timezone.now() - timedelta(minutes=1))

    run_django_q_scheduler(broker=get_broker())

    task = Task.objects.get(func=TASK)
    assert task.success, task.result
    assert (task.result["outcome"], task.result["passes"]) == ("ok", 1)
    assert ReconcilePass.objects.filter(outcome=ReconcilePass.Outcome.OK).count() == 1
    assert schedules().get().next_run > timezone.now()


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


def another_leader(close_thread_connections):
    """The reconcile lock held by another leader (another connection) for the with-block."""
    return held_in_another_thread(lambda: advisory_lock(LockKey.RECONCILE, timeout=5), close_thread_connections)


def test_the_scheduled_task_returns_at_once_when_another_leader_holds_the_lock(close_thread_connections):
    from reconciler.tasks import run_scheduled_reconcile

    with another_leader(close_thread_connections):
        result = run_scheduled_reconcile(budget=50)

    assert (result["outcome"], result["reason"], result["passes"]) == ("skipped", "held", 0)
    assert list(ReconcilePass.objects.values_list("outcome", flat=True)) == ["skipped"]


def test_a_standby_leader_takes_over_when_the_lock_is_released(close_thread_connections):
    clock = FakeClock()
    attempts = []

    with another_leader(close_thread_connections) as release:

        def sleep(seconds):
            attempts.append(clock.t)
            if len(attempts) == 2:
                release()
            clock.sleep(seconds)

        result = run_leader(
            budget=60, interval=10, standby=True, scheduler=FakeScheduler(), prober=FakeProber(), clock=clock, sleep=sleep
        )

    assert result.outcome == "ok"
    assert result.passes == 4  # took over at 20 s, passes at 20, 30, 40, 50


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
