"""The reconciler's parallel scale-up against other loaders, on real threads with their own
PostgreSQL connections and real gRPC fakes: one loader per replica slot, whoever races."""

from __future__ import annotations

import pytest

from reconciler.reconcile import reconcile_once
from registry import bulk_loading, router
from registry.models import ModelLoadInfo, Node, NodeModel
from tests.concurrency import run_in_threads
from tests.factories import GIB, make_scheduling

from .conftest import options_blob

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

BLOB = options_blob("llama.gguf", vram=2 * GIB)


def assert_one_load_per_slot(fleet):
    """Every backend any worker started got at most one LoadModel, and StartBackend was asked
    once per (node, model, index) that holds a row."""
    for entry in fleet.nodes:
        assert all(len(backend.load_requests) <= 1 for backend in entry.worker.started_backends)
        assert entry.worker.count("StartBackend") == NodeModel.objects.filter(node=entry.node).count()


def test_two_concurrent_scale_ups_never_load_the_same_slot_twice(fleet, close_thread_connections):
    # Two passes' scale-ups at once (as if each had its own pass lock): 4 slots, 8 wanted.
    nodes = [fleet.add_node(f"gpu-{i}", slots=2, load_delay=0.05) for i in range(2)]
    ModelLoadInfo.objects.upsert("llama", "x", BLOB)
    ids = tuple(entry.node.pk for entry in nodes)

    results = run_in_threads(
        lambda i: bulk_loading.load_many([bulk_loading.Want("llama", 4, ids)], concurrency=4)["llama"],
        close_thread_connections,
        count=2,
    )

    loaded = [row for result in results for row in result.loaded]
    assert len(loaded) == 4, results
    assert len({(row.node_id, row.replica_index) for row in loaded}) == 4
    assert NodeModel.objects.loaded().count() == 4 and not NodeModel.objects.loading().exists()
    assert_one_load_per_slot(fleet)
    for entry in nodes:
        entry.node.refresh_from_db()
        assert entry.node.reserved_vram == 4 * GIB


def test_a_pass_and_route_cold_loads_never_load_the_same_slot_twice(fleet, close_thread_connections):
    nodes = [fleet.add_node(f"gpu-{i}", slots=2, load_delay=0.05) for i in range(2)]
    make_scheduling("llama", min_replicas=3)
    ModelLoadInfo.objects.upsert("llama", "x", BLOB)

    def act(i):
        if i == 0:
            return reconcile_once()
        return router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB)  # the route's cold path

    results = run_in_threads(act, close_thread_connections, count=4, return_exceptions=True)

    routed = [r for r in results[1:] if isinstance(r, NodeModel)]
    refused = [r for r in results[1:] if isinstance(r, router.RouterError)]
    assert len(routed) + len(refused) == 3, results
    rows = NodeModel.objects.all()
    assert rows.count() <= 4 and not NodeModel.objects.loading().exists()
    assert len({(row.node_id, row.replica_index) for row in rows}) == rows.count()
    assert rows.count() == len(routed) + results[0].actions["replicas_added"]
    assert_one_load_per_slot(fleet)
    for entry in nodes:
        node = Node.objects.get(pk=entry.node.pk)
        assert node.reserved_vram == 2 * GIB * NodeModel.objects.filter(node=node).count()


def test_batched_marks_keep_alives_and_a_discard_at_once_neither_deadlock_nor_mark_a_removed_row(
    fleet, close_thread_connections
):
    """The load pool's recorder (``mark_loaded_many`` of a batch), its keep-alive
    (``keep_loading`` of the same rows) and the stale-loading sweep (``discard_loading`` of one
    of them) at the same moment, on their own connections, several rounds: no statement fails
    (the two multi-row verbs lock in id order), and the discarded row is never marked loaded."""
    nodes = [fleet.add_node(f"gpu-{i}", slots=8) for i in range(3)]
    for round_ in range(5):
        rows = [
            NodeModel.objects.claim_loading(entry.node.pk, f"m{round_}", slots=8, backend_type="x", reserved_vram=0)
            for entry in nodes
            for _ in range(6)
        ]
        ids = [row.pk for row in rows]
        gone = ids[len(ids) // 2]

        def act(i, ids=ids, gone=gone):
            if i == 0:
                return NodeModel.objects.mark_loaded_many({pk: (f"127.0.0.1:{pk % 60000}", BLOB) for pk in ids})
            if i == 1:
                return NodeModel.objects.discard_loading(gone)
            return NodeModel.objects.keep_loading(ids if i % 2 else list(reversed(ids)))

        marked, discarded, *_ = run_in_threads(act, close_thread_connections, count=4)

        assert discarded != (gone in marked)  # one of the two, never both
        assert marked == set(NodeModel.objects.filter(model_name=f"m{round_}").loaded().values_list("pk", flat=True))
        assert set(ids) - marked - {gone} == set()
        assert bytes(NodeModel.objects.get(pk=ids[0]).model_opts_blob) == BLOB
