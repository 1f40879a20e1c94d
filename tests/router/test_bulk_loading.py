"""The reconciler's scale-up through the default scheduler (``registry.bulk_loading``): every
slot claimed in the database first, loads in a bounded pool, outcomes recorded through the
verbs. Real passes (``reconcile_once`` with the default scheduler and gRPC prober) against the
router's fake fleet on real gRPC."""

from __future__ import annotations

import threading

import pytest

from reconciler.models import Event
from reconciler.reconcile import reconcile_once
from registry import bulk_loading
from registry.models import LoadFailure, ModelLoadInfo, Node, NodeModel
from tests.factories import GIB, make_scheduling

from .conftest import FakeBackend, options_blob

pytestmark = pytest.mark.django_db


def store_recipe(model_name: str, vram: int | None = 2 * GIB) -> bytes:
    blob = options_blob(f"{model_name}.gguf", vram=vram)
    ModelLoadInfo.objects.upsert(model_name, "llama-cpp", blob)
    return blob


def loads_per_slot(fleet) -> dict:
    """(node name, model, replica index) -> LoadModel calls its backend received."""
    return {
        (entry.node.name, model, index): len(backend.load_requests)
        for entry in fleet.nodes
        for (model, index), (backend, _, _) in entry.worker.backends.items()
    }


def test_a_pass_places_every_wanted_replica_with_one_load_per_slot(fleet):
    nodes = [fleet.add_node(f"gpu-{i}", slots=2) for i in range(3)]
    blobs = {}
    for name in ("llama", "mistral", "phi"):
        make_scheduling(name, min_replicas=2)
        blobs[name] = store_recipe(name)

    summary = reconcile_once()

    assert summary.actions["replicas_added"] == 6, summary
    loaded = NodeModel.objects.loaded()
    assert loaded.count() == 6 and not NodeModel.objects.loading().exists()
    assert set(loads_per_slot(fleet).values()) == {1}
    assert len(loads_per_slot(fleet)) == 6
    for row in loaded:  # the per-replica recipe written with the loaded state
        assert bytes(row.model_opts_blob) == blobs[row.model_name]
        assert row.address and row.state_changed_at is not None
    for entry in nodes:
        entry.node.refresh_from_db()
        assert entry.node.reserved_vram == 2 * GIB * NodeModel.objects.filter(node=entry.node).count()
    assert Event.objects.filter(kind=Event.Kind.REPLICA_ADDED).count() == 6


def test_at_most_the_configured_number_of_loads_are_in_flight_at_once(fleet, settings, monkeypatch):
    settings.RECONCILE_LOAD_CONCURRENCY = 3
    for i in range(4):
        fleet.add_node(f"gpu-{i}", slots=2)
    for name in ("llama", "mistral", "phi", "qwen"):
        make_scheduling(name, min_replicas=2)
        store_recipe(name)
    lock = threading.Lock()
    running, most = [0], [0]
    full = threading.Event()  # set once as many loads as the setting allows are running
    original = FakeBackend.load_model

    def counting_load(self, raw, context):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] >= 3:
                full.set()
        full.wait(timeout=5)  # holds the first loads until the pool is full (or 5 s passed)
        try:
            return original(self, raw, context)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(FakeBackend, "load_model", counting_load)

    summary = reconcile_once()

    assert summary.actions["replicas_added"] == 8, summary
    assert most[0] == 3  # the pool filled, and never went beyond its bound
    assert sum(loads_per_slot(fleet).values()) == 8


def test_a_failed_load_in_the_pool_is_recorded_and_leaves_no_reservation(fleet):
    bad = fleet.add_node("gpu-bad", slots=1, load_success=False, load_message="out of memory")
    good = fleet.add_node("gpu-good", slots=1)
    make_scheduling("llama", min_replicas=2)
    store_recipe("llama")

    summary = reconcile_once()

    assert summary.actions["replicas_added"] == 1 and summary.actions["scale_up_failed"] == 1, summary
    assert list(NodeModel.objects.values_list("node__name", "state")) == [("gpu-good", "loaded")]
    bad.node.refresh_from_db()
    good.node.refresh_from_db()
    assert bad.node.reserved_vram == 0
    assert good.node.reserved_vram == 2 * GIB
    assert LoadFailure.objects.get(model_name="llama", node=bad.node).failures == 1
    assert bad.worker.count("StopBackend") == 1  # the backend it started was stopped
    failed = Event.objects.get(kind=Event.Kind.SCALE_UP_FAILED)
    assert "out of memory" in failed.message and failed.details["error_code"] == "load_failed"


def test_a_replica_without_vram_room_goes_through_the_re_reading_path(fleet):
    gpu = fleet.add_node("gpu-1", slots=4, total_vram=5 * GIB)
    store_recipe("llama")  # 2 GiB each: two fit, the third finds no VRAM and nothing to evict

    result = bulk_loading.load_many([bulk_loading.Want("llama", 3, (gpu.node.pk,))], concurrency=4)["llama"]

    assert len(result.loaded) == 2
    assert result.error is not None and result.error.code == "all_replicas_busy"
    assert NodeModel.objects.loaded().count() == 2 and not NodeModel.objects.loading().exists()
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 4 * GIB


def test_no_load_is_started_after_the_budget(fleet):
    gpu = fleet.add_node("gpu-1", slots=4)
    store_recipe("llama")
    ticks = iter(range(100))  # a clock read once per claim decision and once per load start

    # Claim 1 at tick 0, its load starts at tick 1; the next decision at tick 2 is too late.
    result = bulk_loading.load_many(
        [bulk_loading.Want("llama", 4, (gpu.node.pk,))], concurrency=1, deadline=2, clock=lambda: next(ticks)
    )["llama"]

    assert result.skipped == "scale_up_budget" and len(result.loaded) == 1
    assert NodeModel.objects.count() == 1 and not NodeModel.objects.loading().exists()
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 2 * GIB
    assert sum(loads_per_slot(fleet).values()) == 1


def test_claims_whose_load_had_not_started_at_the_deadline_are_discarded(fleet):
    gpu = fleet.add_node("gpu-1", slots=4)
    store_recipe("llama")
    ticks = iter(range(100))

    # Two slots claimed at ticks 0 and 1; their loads would start at ticks 2 and 3: too late.
    result = bulk_loading.load_many(
        [bulk_loading.Want("llama", 4, (gpu.node.pk,))], concurrency=2, deadline=2, clock=lambda: next(ticks)
    )["llama"]

    assert result.skipped == "scale_up_budget" and result.loaded == []
    assert not NodeModel.objects.exists()
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 0
    assert gpu.worker.count("StartBackend") == 0


def test_nodes_outside_the_selector_are_not_placed_on(fleet):
    a = fleet.add_node("gpu-a", slots=2, labels={"zone": "a"})
    fleet.add_node("gpu-b", slots=2, labels={"zone": "b"})
    make_scheduling("llama", min_replicas=2, node_selector={"zone": "a"})
    store_recipe("llama")

    summary = reconcile_once()

    assert summary.actions["replicas_added"] == 2, summary
    assert set(NodeModel.objects.values_list("node_id", flat=True)) == {a.node.pk}
    assert Node.objects.get(name="gpu-b").reserved_vram == 0
