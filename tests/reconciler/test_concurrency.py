"""One pass at a time across threads and processes (PostgreSQL), and idempotent passes."""

import multiprocessing
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
from django.db import connections

from reconciler.models import Event, ReconcilePass
from reconciler.reconcile import reconcile_once
from registry.locks import LockKey, try_advisory_lock
from registry.models import Node, NodeModel
from tests.factories import make_node, make_replica, make_scheduling
from tests.reconciler.fakes import FakeProber, FakeScheduler


def test_the_same_pass_twice_adds_nothing_the_second_time(db, now, load_info):
    """A fleet with work of every kind: the second pass finds nothing left to do."""
    scheduler, prober = FakeScheduler(), FakeProber()
    make_node(name="gpu-stale", now=now - timedelta(minutes=2))
    a = make_node(name="gpu-a", now=now, slots=4)
    b = make_node(name="gpu-b", now=now, slots=4)
    back = make_node(name="gpu-back", now=now, status=Node.Status.OFFLINE)
    # The reconciler watches the fleet for 40 s: gpu-a and gpu-b heartbeat, gpu-stale does not.
    for seconds in (40, 30, 20, 10):
        for node in (a, b):
            Node.objects.heartbeat(node.pk, now=now - timedelta(seconds=seconds))
        reconcile_once(now=now - timedelta(seconds=seconds), scheduler=scheduler, prober=prober)
    for node in (a, b):
        Node.objects.heartbeat(node.pk, now=now)
    Node.objects.heartbeat(back.pk, now=now - timedelta(seconds=5))  # gpu-back heartbeats again
    make_scheduling("llama", min_replicas=3)
    make_scheduling("phi", min_replicas=1, max_replicas=2)
    make_scheduling("nolo", min_replicas=1)
    load_info("llama")
    load_info("phi")
    for index in range(2):
        make_replica(a, "phi", index, last_used=now - timedelta(hours=1))
    prober.listings[a.address] = [("phi", 0, 2), ("phi", 1, 2), ("orphan", 0, 2)]

    first = reconcile_once(now=now, scheduler=scheduler, prober=prober)
    calls, events, stopped = len(scheduler.calls), Event.objects.count(), len(prober.stopped)
    prober.listings[a.address] = [(r.model_name, r.replica_index, 2) for r in NodeModel.objects.filter(node=a)]
    second = reconcile_once(now=now, scheduler=scheduler, prober=prober)

    assert first.actions["nodes_marked_offline"] == 1
    assert first.actions["nodes_recovered"] == 1
    assert first.actions["replicas_added"] == 3
    assert first.actions["replicas_scaled_down"] == 1
    assert first.actions["orphans_stopped"] == 1
    # Only observations remain, and Progressing settling from "scaling_up" to "stable".
    observations = {"replicas_probed", "probes_ok", "workers_listed", "heartbeats_observed"}
    changes = {k for k in second.actions if k not in observations}
    assert changes <= {"conditions_changed"}
    assert second.actions["conditions_changed"] <= 1
    assert (len(scheduler.calls), Event.objects.count(), len(prober.stopped)) == (calls, events, stopped)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_passes_one_runs_and_the_other_skips(now, close_thread_connections):
    node = make_node(name="gpu-a", now=now)
    # Last confirmed a minute before the pass: probed, and the first pass blocks there.
    make_replica(node, "llama", 0, address="10.0.0.1:7000", last_probe_at=now - timedelta(minutes=1))
    prober = FakeProber(gate=threading.Event())
    results = {}

    def first():
        try:
            results["first"] = reconcile_once(now=now, scheduler=FakeScheduler(), prober=prober)
        finally:
            close_thread_connections()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert prober.entered.wait(timeout=10), "the first pass never reached its probes"
        results["second"] = reconcile_once(now=now, scheduler=FakeScheduler(), prober=FakeProber())
    finally:
        prober.gate.set()
        thread.join(timeout=30)

    assert (results["second"].outcome, results["second"].reason) == ("skipped", "held")
    assert str(results["second"]) == "skipped: held"
    assert results["first"].outcome == "ok"
    assert sorted(ReconcilePass.objects.values_list("outcome", flat=True)) == ["ok", "skipped"]


def _hold_reconcile_lock(ready, release_after):
    """Child process: take the reconcile lock on its own connection (the parent closed its
    connections before forking), say so, then sleep until killed."""
    with try_advisory_lock(LockKey.RECONCILE) as held:
        ready.put(held)
        time.sleep(release_after)
    os._exit(0)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_pass_in_another_process_makes_this_one_skip_and_its_death_frees_the_lock(now):
    connections.close_all()  # the child must open its own connection, not share ours
    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    child = context.Process(target=_hold_reconcile_lock, args=(ready, 60))
    child.start()
    try:
        assert ready.get(timeout=20) is True
        skipped = reconcile_once(now=now, scheduler=FakeScheduler(), prober=FakeProber())
        assert (skipped.outcome, skipped.reason) == ("skipped", "held")

        os.kill(child.pid, signal.SIGKILL)  # dies holding the lock
        child.join(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            summary = reconcile_once(now=now, scheduler=FakeScheduler(), prober=FakeProber())
            if summary.outcome == "ok" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert summary.outcome == "ok"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
