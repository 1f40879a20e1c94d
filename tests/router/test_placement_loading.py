"""Issue 16 part 4 through both loading paths: ``schedule_and_load`` (one replica, re-reading
placement) and the reconciler's batched scale-up (``registry.bulk_loading``, an in-memory
state) honour the node's VRAM budget, the model's disk size and its topology spread, on real
gRPC against the router's fake fleet."""

from __future__ import annotations

from collections import Counter

import pytest

from reconciler.reconcile import reconcile_once
from registry import router
from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.factories import GIB

from .conftest import options_blob

pytestmark = pytest.mark.django_db


def recipe(model_name: str, vram: int = 2 * GIB) -> None:
    ModelLoadInfo.objects.upsert(model_name, "llama-cpp", options_blob(f"{model_name}.gguf", vram=vram))


def config(model_name: str, **fields) -> None:
    ModelSchedulingConfig.objects.upsert(model_name, **fields)


def per_zone() -> Counter:
    zones = {node.pk: node.labels.get(key="zone").value for node in Node.objects.filter(labels__key="zone")}
    return Counter(zones[row.node_id] for row in NodeModel.objects.all())


# ---- schedule_and_load ---------------------------------------------------------------------


def test_single_path_skips_a_node_whose_budget_is_short(fleet):
    capped = fleet.add_node("capped")
    free = fleet.add_node("free")
    assert Node.objects.set_vram_budget(capped.node.pk, GIB)
    recipe("llama")

    replica = router.schedule_and_load("llama")

    assert replica.node_id == free.node.pk


def test_single_path_counts_our_replicas_against_the_budget(fleet):
    gpu = fleet.add_node("gpu", slots=3)
    assert Node.objects.set_vram_budget(gpu.node.pk, 5 * GIB)
    recipe("llama")
    router.schedule_and_load("llama")
    router.schedule_and_load("llama")  # 4 GiB of 5 reserved by our replicas

    with pytest.raises(router.AllReplicasBusy):
        router.schedule_and_load("llama")
    assert NodeModel.objects.count() == 2

    assert Node.objects.set_vram_budget(gpu.node.pk, None)
    assert router.schedule_and_load("llama").replica_index == 2


def test_single_path_places_a_model_only_where_its_disk_size_fits(fleet):
    small = fleet.add_node("small-disk")
    big = fleet.add_node("big-disk")
    Node.objects.heartbeat(small.node.pk, total_disk=100 * GIB, available_disk=5 * GIB)
    Node.objects.heartbeat(big.node.pk, total_disk=100 * GIB, available_disk=60 * GIB)
    recipe("llama")
    config("llama", disk_bytes=40 * GIB)

    assert router.schedule_and_load("llama").node_id == big.node.pk
    with pytest.raises(router.CapacityExhausted, match="disk"):
        router.schedule_and_load("llama")  # big's one slot is taken; small lacks the disk
    assert small.worker.count("StartBackend") == 0


def test_single_path_spreads_replicas_across_a_label(fleet):
    for name, zone in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c")):
        fleet.add_node(name, slots=3, labels={"zone": zone})
    recipe("llama", vram=GIB)
    config("llama", spread_by="zone")

    for _ in range(3):
        for _ in range(3):
            router.schedule_and_load("llama")
        counts = per_zone()
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert sorted(per_zone().values()) == [3, 3, 3]


# ---- the reconciler's batched scale-up ------------------------------------------------------


def test_bulk_path_spreads_and_honours_budget_and_disk(fleet):
    for name, zone in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        fleet.add_node(name, slots=4, labels={"zone": zone})
    capped = fleet.add_node("capped", slots=4, labels={"zone": "b"})
    nodisk = fleet.add_node("nodisk", slots=4, labels={"zone": "c"})
    assert Node.objects.set_vram_budget(capped.node.pk, GIB)
    Node.objects.heartbeat(nodisk.node.pk, total_disk=100 * GIB, available_disk=GIB)
    recipe("llama")
    config("llama", min_replicas=6, disk_bytes=10 * GIB, spread_by="zone")

    summary = reconcile_once()

    assert summary.actions["replicas_added"] == 6, summary
    assert per_zone() == {"a": 3, "b": 3}
    assert not NodeModel.objects.filter(node__in=[capped.node.pk, nodisk.node.pk]).exists()
    assert capped.worker.count("StartBackend") == nodisk.worker.count("StartBackend") == 0
