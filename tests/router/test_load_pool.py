"""A pass's cold loads outlive it (``reconciler.load_pool``): the pass claims the slots under
the reconcile lock, hands the loads to the process's pool and returns. Real passes, real
threads and processes on PostgreSQL, the router's fake fleet on real gRPC, loads held open
by a gate."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
from django.db import connections

from reconciler.conf import ReconcileConfig
from reconciler.load_pool import process_pool
from reconciler.models import Event
from reconciler.reconcile import reconcile_once
from registry.locks import LockKey, try_advisory_lock
from registry.models import ModelLoadInfo, NodeModel
from tests.factories import GIB, make_scheduling

from .conftest import FakeBackend, options_blob

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


class Gate:
    """LoadModel blocks until ``open``; counts the loads in flight and the most at once."""

    def __init__(self, monkeypatch):
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = self.entered = 0
        original = FakeBackend.load_model

        def gated_load(backend, raw, context):
            with self.lock:
                self.running += 1
                self.entered += 1
                self.most = max(self.most, self.running)
            try:
                self.opened.wait(timeout=9)
                return original(backend, raw, context)
            finally:
                with self.lock:
                    self.running -= 1

        monkeypatch.setattr(FakeBackend, "load_model", gated_load)

    def wait_entered(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self.entered < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.entered >= count


@pytest.fixture
def gate(monkeypatch):
    gate = Gate(monkeypatch)
    yield gate
    gate.opened.set()
    process_pool(ReconcileConfig.from_settings()).drain()


def store_recipe(model_name: str) -> None:
    ModelLoadInfo.objects.upsert(model_name, "llama-cpp", options_blob(f"{model_name}.gguf", vram=2 * GIB))


def test_a_pass_returns_and_releases_its_lock_while_its_load_runs(fleet, gate):
    gpu = fleet.add_node("gpu-1", slots=2)
    make_scheduling("llama", min_replicas=1)
    store_recipe("llama")

    first = reconcile_once(wait=False)  # the leader's way: the process's pool, not waited for
    gate.wait_entered(1)

    assert first.outcome == "ok" and first.actions["loads_started"] == 1, first
    with try_advisory_lock(LockKey.RECONCILE) as held:  # the pass lock is free while it loads
        assert held
    assert list(NodeModel.objects.values_list("state", flat=True)) == ["loading"]
    second = reconcile_once(wait=False)  # a pass meanwhile: the loading row counts as a replica
    assert second.outcome == "ok" and second.actions["loads_started"] == 0, second
    assert gpu.worker.count("StartBackend") == 1
    assert not Event.objects.filter(kind=Event.Kind.REPLICA_ADDED).exists()  # recorded when it ends

    gate.opened.set()
    counts = process_pool(ReconcileConfig.from_settings()).drain()

    assert counts["replicas_added"] == 1, counts
    assert list(NodeModel.objects.values_list("state", flat=True)) == ["loaded"]
    assert gate.entered == 1 and gpu.worker.count("StartBackend") == 1
    added = Event.objects.get(kind=Event.Kind.REPLICA_ADDED)
    assert added.model_name == "llama" and added.node_name == "gpu-1"
    third = reconcile_once(wait=False)  # the conditions catch up
    assert third.actions.get("loads_started", 0) == 0, third


def _claim_and_die(node_id, ready) -> None:
    """A loader in another process: claims a slot (its ``loading`` row and reservation), as
    every loader does before its network calls, then is killed before it records anything."""
    NodeModel.objects.claim_loading(node_id, "phi", slots=2, backend_type="llama-cpp", reserved_vram=2 * GIB)
    connections.close_all()
    ready.put(True)
    time.sleep(60)
    os._exit(0)


def test_the_sweep_leaves_a_live_load_alone_and_takes_a_killed_loaders_row(fleet, gate, settings):
    settings.RECONCILE_STALE_LOADING_AFTER = 1.0  # the pool refreshes its rows every 0.25 s
    gpu = fleet.add_node("gpu-1", slots=2)
    make_scheduling("llama", min_replicas=1)
    store_recipe("llama")
    connections.close_all()  # the child opens its own connection (forked before any load thread)
    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    child = context.Process(target=_claim_and_die, args=(gpu.node.pk, ready))
    child.start()
    try:
        assert ready.get(timeout=20) is True
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=10)
    finally:
        if child.is_alive():
            child.kill()
            child.join()

    reconcile_once(wait=False)  # the live load, in this process's pool
    gate.wait_entered(1)
    assert set(NodeModel.objects.values_list("model_name", "state")) == {("llama", "loading"), ("phi", "loading")}
    time.sleep(1.5)  # both rows were claimed longer ago than the threshold

    summary = reconcile_once(wait=False)

    assert summary.actions["stale_loading_rows_discarded"] == 1, summary
    assert list(NodeModel.objects.values_list("model_name", "state")) == [("llama", "loading")]
    released = Event.objects.get(kind=Event.Kind.VRAM_RESERVATION_RELEASED)
    assert released.model_name == "phi"
    gate.opened.set()
    assert process_pool(ReconcileConfig.from_settings()).drain()["replicas_added"] == 1
    assert list(NodeModel.objects.values_list("model_name", "state")) == [("llama", "loaded")]
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 2 * GIB  # the killed loader's reservation given back


def test_at_most_the_configured_loads_are_in_flight_across_passes(fleet, gate, settings):
    settings.RECONCILE_LOAD_CONCURRENCY = 2
    nodes = [fleet.add_node(f"gpu-{i}", slots=2) for i in range(3)]
    make_scheduling("llama", min_replicas=5)
    store_recipe("llama")

    first = reconcile_once(wait=False)
    gate.wait_entered(2)
    second = reconcile_once(wait=False)  # both pool threads busy: nothing claimed

    assert first.actions["loads_started"] == 2 and second.actions.get("loads_started", 0) == 0, second
    assert second.skipped["load_concurrency"] == 1
    assert NodeModel.objects.count() == 2
    gate.opened.set()
    pool = process_pool(ReconcileConfig.from_settings())
    pool.drain()
    started = [first, second]
    while NodeModel.objects.loaded().count() < 5:
        assert len(started) < 8, started
        started.append(reconcile_once(wait=False))
        pool.drain()

    assert gate.most == 2
    assert sum(s.actions.get("loads_started", 0) for s in started) == 5
    assert sum(entry.worker.count("StartBackend") for entry in nodes) == 5
    assert Event.objects.filter(kind=Event.Kind.REPLICA_ADDED).count() == 5


def test_loads_that_finish_together_are_recorded_together_and_a_removed_row_is_not_marked(
    fleet, gate, settings, monkeypatch
):
    """Six loads finish at once on the process's pool: its recorder thread writes them in at
    most two ``mark_loaded_many`` (what had finished when it first looked, then the rest), the
    row discarded while its
    load ran is not marked loaded, and every load is recorded by the end of the drain."""
    from registry import bulk_loading

    settings.RECONCILE_LOAD_CONCURRENCY = 8
    for i in range(3):
        fleet.add_node(f"gpu-{i}", slots=2)
    for name in ("llama", "phi"):
        make_scheduling(name, min_replicas=3)
        store_recipe(name)
    finished = threading.Semaphore(0)  # one release per LoadModel answered to its loader
    network = bulk_loading.Load.network

    def counted_network(load, *args, **kwargs):
        try:
            return network(load, *args, **kwargs)
        finally:
            finished.release()

    batches = []
    mark_loaded_many = NodeModel.objects.mark_loaded_many

    def recorded_batch(loads, **kwargs):
        if not batches:  # hold the first write until every load has finished: the rest queue up
            for _ in range(6):
                assert finished.acquire(timeout=10)
        batches.append(sorted(loads))
        return mark_loaded_many(loads, **kwargs)

    monkeypatch.setattr(bulk_loading.Load, "network", counted_network)
    monkeypatch.setattr(NodeModel.objects, "mark_loaded_many", recorded_batch)

    summary = reconcile_once(wait=False)
    gate.wait_entered(6)
    assert summary.actions["loads_started"] == 6, summary
    gone = NodeModel.objects.filter(model_name="phi").order_by("pk").first()
    assert NodeModel.objects.discard_loading(gone.pk)  # the stale-loading sweep's verb, mid-load
    gate.opened.set()
    counts = process_pool(ReconcileConfig.from_settings()).drain()

    assert len(batches) <= 2, batches  # not one write per load: six loads in at most two writes
    assert sorted(pk for batch in batches for pk in batch) == sorted(
        [gone.pk, *NodeModel.objects.values_list("pk", flat=True)]
    )
    assert counts["replicas_added"] == 5 and counts["scale_up_failed"] == 1, counts
    assert set(NodeModel.objects.values_list("state", flat=True)) == {"loaded"}
    assert NodeModel.objects.count() == 5 and not NodeModel.objects.filter(pk=gone.pk).exists()
    assert Event.objects.filter(kind=Event.Kind.REPLICA_ADDED).count() == 5
    assert not process_pool(ReconcileConfig.from_settings()).busy()


def test_a_failed_load_on_the_process_pool_is_recorded_alone_next_to_the_batch(fleet):
    """The leader's pool: a failed load is recorded on its own thread (its backend stopped, its
    reservation released, the node backed off) while the loads that succeeded go through the
    recorder; the drain returns once both are recorded."""
    from registry.models import LoadFailure

    bad = fleet.add_node("gpu-bad", slots=1, load_success=False, load_message="out of memory")
    goods = [fleet.add_node(f"gpu-{i}", slots=1) for i in range(2)]
    make_scheduling("llama", min_replicas=3)
    store_recipe("llama")

    summary = reconcile_once(wait=False)
    counts = process_pool(ReconcileConfig.from_settings()).drain()

    assert summary.actions["loads_started"] == 3, summary
    assert counts["replicas_added"] == 2 and counts["scale_up_failed"] == 1, counts
    assert sorted(NodeModel.objects.values_list("node__name", "state")) == [("gpu-0", "loaded"), ("gpu-1", "loaded")]
    bad.node.refresh_from_db()
    assert bad.node.reserved_vram == 0 and bad.worker.count("StopBackend") == 1
    assert LoadFailure.objects.get(model_name="llama", node=bad.node).failures == 1
    for entry in goods:
        entry.node.refresh_from_db()
        assert entry.node.reserved_vram == 2 * GIB
    assert Event.objects.filter(kind=Event.Kind.REPLICA_ADDED).count() == 2
    assert "out of memory" in Event.objects.get(kind=Event.Kind.SCALE_UP_FAILED).message
