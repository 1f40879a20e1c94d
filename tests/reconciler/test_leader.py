"""The qcluster's leader process: its loop (``reconcile.lead``) and its parent watch."""

import os
import threading

import pytest

from reconciler import leader, shutdown
from reconciler.models import ReconcilePass
from reconciler.reconcile import lead

pytestmark = pytest.mark.django_db


@pytest.fixture
def stop_requested():
    yield shutdown.STOP_REQUESTED
    shutdown.STOP_REQUESTED.clear()


def test_the_leader_passes_every_interval_until_asked_to_stop(stop_requested):
    seen = []

    def sleep(seconds):
        seen.append(seconds)
        if len(seen) == 3:
            stop_requested.set()  # SIGTERM while the loop waits for its next pass

    result = lead(interval=10, sleep=sleep)

    assert (result.passes, result.reason) == (3, "stopping")
    assert ReconcilePass.objects.filter(outcome=ReconcilePass.Outcome.OK).count() == 3
    assert all(0 < seconds <= 10 for seconds in seen)


def test_a_stopped_leader_runs_no_pass(stop_requested):
    stop_requested.set()

    result = lead(interval=10)

    assert result.passes == 0
    assert not ReconcilePass.objects.exists()


def test_the_leader_stops_when_its_qcluster_is_gone(stop_requested, monkeypatch):
    monkeypatch.setattr(leader, "PARENT_CHECK_INTERVAL", 0.01)
    watch = threading.Thread(target=leader.watch_parent, args=(os.getppid() + 1,), daemon=True)
    watch.start()

    assert stop_requested.wait(5)
    watch.join(5)
    assert not watch.is_alive()


def test_the_leader_keeps_running_while_its_qcluster_lives(stop_requested, monkeypatch):
    monkeypatch.setattr(leader, "PARENT_CHECK_INTERVAL", 0.01)
    watch = threading.Thread(target=leader.watch_parent, args=(os.getppid(),), daemon=True)
    watch.start()

    assert not stop_requested.wait(0.2)
    stop_requested.set()
    watch.join(5)
    assert not watch.is_alive()
