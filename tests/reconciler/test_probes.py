"""Replica probes and worker listings (with the fake prober)."""

from datetime import timedelta

import pytest
from django.test import override_settings

from proto import worker_pb2
from proto.client import Probe
from reconciler.models import Event
from registry.models import Node, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

RUNNING = worker_pb2.BackendProcess.RUNNING
STARTING = worker_pb2.BackendProcess.STARTING
EXITED = worker_pb2.BackendProcess.EXITED

ADDRESS = "10.0.0.5:7000"


@pytest.fixture
def replica(now):
    node = make_node(name="gpu-a", now=now)
    return make_replica(node, "llama", 0, address=ADDRESS, last_probe_at=now - timedelta(minutes=1))


def passes(reconcile, now, count):
    """``count`` passes 10 s apart, heartbeating first so that only probes matter."""
    return [reconcile(at=now + timedelta(seconds=10 * i), heartbeat=True) for i in range(count)]


def test_alive_probe_refreshes_last_probe_at_and_resets_failures(now, reconcile, prober, replica):
    for _ in range(2):
        NodeModel.objects.record_probe_unreachable(replica.pk)

    summary = reconcile()

    replica.refresh_from_db()
    assert prober.probed == [ADDRESS]
    assert (replica.last_probe_at, replica.probe_failures) == (now, 0)
    assert summary.actions["probes_ok"] == 1


def test_recently_confirmed_replicas_are_not_probed(now, reconcile, prober, replica):
    NodeModel.objects.record_probe_ok(replica.pk, now=now - timedelta(seconds=5))

    reconcile()

    assert prober.probed == []


def test_replicas_on_unhealthy_nodes_and_loading_rows_are_not_probed(now, reconcile, prober):
    sick = make_node(name="gpu-a", now=now - timedelta(hours=1), status=Node.Status.UNHEALTHY)
    make_replica(sick, "llama", 0, address="10.0.0.1:1")
    healthy = make_node(name="gpu-b", now=now)
    make_replica(healthy, "llama", 0, address="10.0.0.2:1", state=NodeModel.State.LOADING)

    reconcile()

    assert prober.probed == []


def test_busy_never_reaps(now, reconcile, prober, replica):
    prober.outcomes[ADDRESS] = Probe.BUSY

    passes(reconcile, now, 6)

    replica.refresh_from_db()
    assert replica.probe_failures == 0


def test_three_consecutive_unreachable_probes_reap_the_row(now, reconcile, prober, replica):
    prober.outcomes[ADDRESS] = Probe.UNREACHABLE

    summaries = passes(reconcile, now, 3)

    assert [s.actions.get("replicas_removed_unreachable", 0) for s in summaries] == [0, 0, 1]
    assert not NodeModel.objects.filter(pk=replica.pk).exists()
    event = Event.objects.get(kind=Event.Kind.REPLICA_REMOVED)
    assert event.details["reason"] == "probe_unreachable"


def test_an_alive_answer_in_between_restarts_the_count(now, reconcile, prober, replica):
    prober.outcomes[ADDRESS] = Probe.UNREACHABLE
    passes(reconcile, now, 2)
    prober.outcomes[ADDRESS] = Probe.ALIVE  # unreachable probes left last_probe_at a minute old: probed
    reconcile(at=now + timedelta(seconds=20), heartbeat=True)
    prober.outcomes[ADDRESS] = Probe.UNREACHABLE

    for i in range(2):
        reconcile(at=now + timedelta(minutes=5, seconds=10 * i), heartbeat=True)

    replica.refresh_from_db()
    assert replica.probe_failures == 2


@override_settings(PROBE_FAILURES_BEFORE_REMOVAL=1)
def test_the_failure_threshold_is_a_setting(now, reconcile, prober, replica):
    prober.outcomes[ADDRESS] = Probe.UNREACHABLE

    reconcile()

    assert not NodeModel.objects.filter(pk=replica.pk).exists()


def test_a_prober_that_raises_changes_nothing(now, reconcile, prober, replica):
    def broken(address, *, timeout=None):
        raise RuntimeError("boom")

    prober.probe = broken

    summary = reconcile()

    replica.refresh_from_db()
    assert summary.outcome == "ok"
    assert summary.skipped["probe_error"] == 1
    assert replica.probe_failures == 0


# --- worker listings ----------------------------------------------------------------------


def test_rows_whose_backend_exited_or_vanished_are_removed(now, reconcile, prober):
    node = make_node(name="gpu-a", now=now, slots=4)
    kept = make_replica(node, "llama", 0)
    make_replica(node, "llama", 1)  # worker says EXITED
    make_replica(node, "llama", 2)  # worker does not know it
    starting = make_replica(node, "llama", 3)  # worker says STARTING: still there
    loading = make_replica(node, "phi", 0, state=NodeModel.State.LOADING)  # its loader is at work
    prober.listings[node.address] = [("llama", 0, RUNNING), ("llama", 1, EXITED), ("llama", 3, STARTING)]

    summary = reconcile()

    assert set(NodeModel.objects.values_list("pk", flat=True)) == {kept.pk, starting.pk, loading.pk}
    assert summary.actions["replicas_removed_exited"] == 2
    reasons = sorted(e.details["reason"] for e in Event.objects.filter(kind=Event.Kind.REPLICA_REMOVED))
    assert reasons == ["backend_absent", "backend_exited"]


def test_running_backends_without_a_row_are_stopped(now, reconcile, prober):
    node = make_node(name="gpu-a", now=now, slots=4)
    make_replica(node, "llama", 0)
    make_replica(node, "phi", 0, state=NodeModel.State.LOADING)
    prober.listings[node.address] = [
        ("llama", 0, RUNNING),
        ("llama", 1, RUNNING),  # orphan
        ("phi", 0, RUNNING),  # has a loading row: not an orphan
        ("qwen", 0, STARTING),  # may be a load in progress
        ("gemma", 0, EXITED),  # nothing to stop
    ]

    summary = reconcile()

    assert prober.stopped == [(node.address, "llama", 1, str(node.pk))]
    assert summary.actions["orphans_stopped"] == 1
    assert Event.objects.filter(kind=Event.Kind.ORPHAN_BACKEND_STOPPED, model_name="llama").count() == 1


def test_a_worker_answering_as_another_node_is_ignored(now, reconcile, prober):
    node = make_node(name="gpu-a", now=now)
    make_replica(node, "llama", 0)
    prober.listings[node.address] = []
    prober.listing_node_ids[node.address] = "5f0c7a5e-0000-0000-0000-000000000000"

    summary = reconcile()

    assert NodeModel.objects.exists()
    assert summary.skipped["list_failed"] == 1


def test_a_load_that_finishes_while_the_worker_answers_keeps_its_row(now, reconcile, prober, monkeypatch):
    """The race of issue 11: the worker answers ListBackends before the loader has started the
    backend, then the load job's ``mark_loaded`` commits, then the pass applies the listing.
    ``mark_loaded`` is an ``.update()`` (``auto_now`` never runs), so a check on ``updated_at``
    took the fresh row for one loaded long before the listing and removed it as exited."""
    from reconciler import apply as module

    node = make_node(name="gpu-a", now=now, slots=2)
    loading = make_replica(node, "llama", 0, state=NodeModel.State.LOADING, last_used=now)
    prober.listings[node.address] = []  # the backend does not exist yet when the worker answers
    real_run_checks = module.run_checks

    def listing_then_load_finishes(*args, **kwargs):
        results = real_run_checks(*args, **kwargs)
        assert results.listings  # the worker was asked (and answered) before the load finished
        assert NodeModel.objects.mark_loaded(loading.pk, address="10.0.0.5:7001", now=now + timedelta(seconds=1))
        return results

    monkeypatch.setattr(module, "run_checks", listing_then_load_finishes)
    summary = reconcile(heartbeat=True)

    row = NodeModel.objects.get(pk=loading.pk)
    assert row.state == NodeModel.State.LOADED
    assert "replicas_removed_exited" not in summary.actions

    # The next pass judges the row on a listing taken after its load: the backend is not
    # there, so the row goes (the check still works for rows loaded before the listing).
    monkeypatch.setattr(module, "run_checks", real_run_checks)
    summary = reconcile(at=now + timedelta(seconds=10), heartbeat=True)

    assert summary.actions["replicas_removed_exited"] == 1
    assert not NodeModel.objects.filter(pk=loading.pk).exists()


def test_mass_staleness_guard_also_pauses_probe_and_listing_removals(now, watch, prober):
    stale = [make_node(name=f"gpu-{i}", now=now) for i in range(2)]
    fresh = make_node(name="gpu-fresh", now=now)
    make_replica(stale[0], "llama", 0, last_probe_at=now + timedelta(minutes=5))
    watch(30, alive=[fresh])  # the reconciler watches gpu-0 and gpu-1 go silent
    row = make_replica(fresh, "llama", 0, address=ADDRESS, probe_failures=5)
    prober.outcomes[ADDRESS] = Probe.UNREACHABLE
    prober.listings[fresh.address] = []

    summary = watch(40, alive=[fresh], start=40)[40]

    assert NodeModel.objects.filter(pk=row.pk).exists()
    assert NodeModel.objects.count() == 2
    assert summary.skipped["mass_staleness"] >= 3
