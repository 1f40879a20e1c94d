"""Registry verbs under real concurrency: threads with their own PostgreSQL connections.

SQLite ignores ``SELECT ... FOR UPDATE`` and serialises every writer, so these only prove
something on PostgreSQL and are marked accordingly.
"""

from collections import Counter

import pytest

from registry.managers import NodeCredentialRequired
from registry.models import ModelLoadInfo, Node, NodeModel
from tests.concurrency import THREADS, run_in_threads
from tests.factories import GIB, make_node, make_replica

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

def test_concurrent_load_info_upserts_leave_one_row_holding_one_written_value(close_thread_connections):
    written = {i: (f"backend-{i}", f"blob-{i}".encode()) for i in range(THREADS)}

    run_in_threads(lambda i: ModelLoadInfo.objects.upsert("llama", *written[i]), close_thread_connections)

    assert ModelLoadInfo.objects.filter(model_name="llama").count() == 1
    info = ModelLoadInfo.objects.for_model("llama")
    assert (info.backend_type, info.model_opts_blob) in written.values()


def test_concurrent_vram_reservations_never_over_commit(close_thread_connections):
    node = make_node(total_vram=10 * GIB)

    granted = run_in_threads(lambda i: Node.objects.reserve_vram(node.pk, 3 * GIB), close_thread_connections)

    node.refresh_from_db()
    assert granted.count(True) == 3
    assert node.reserved_vram == 9 * GIB <= node.available_vram


def test_concurrent_releases_never_underflow(close_thread_connections):
    node = make_node(total_vram=10 * GIB)
    Node.objects.reserve_vram(node.pk, 3 * GIB)

    released = run_in_threads(lambda i: Node.objects.release_vram(node.pk, GIB), close_thread_connections)

    node.refresh_from_db()
    assert released.count(True) == 3
    assert node.reserved_vram == 0


def test_concurrent_warm_picks_spread_over_replicas(close_thread_connections):
    first, second = make_node(), make_node()
    replicas = {make_replica(first, "llama", 0).pk, make_replica(second, "llama", 0).pk}

    picks = run_in_threads(lambda i: NodeModel.objects.warm_pick("llama").pk, close_thread_connections)

    spread = Counter(picks)
    assert set(spread) == replicas  # both replicas took reservations
    in_flight = dict(NodeModel.objects.values_list("pk", "in_flight"))
    assert in_flight == dict(spread)  # every reservation was counted exactly once
    assert sum(in_flight.values()) == THREADS


def test_concurrent_in_flight_decrements_stop_at_zero(close_thread_connections):
    row = make_replica(make_node(), in_flight=3)

    run_in_threads(lambda i: NodeModel.objects.decrement_in_flight(row.pk), close_thread_connections)

    row.refresh_from_db()
    assert row.in_flight == 0


def test_concurrent_registrations_of_one_name_yield_one_node(close_thread_connections):
    """Exactly one node; the losers of the race find an existing node that holds a per-node
    token they do not have, so they are refused instead of taking it over."""
    outcomes = run_in_threads(
        lambda i: Node.objects.register(name="gpu-1", address=f"10.0.0.{i}:50051"),
        close_thread_connections,
        return_exceptions=True,
    )

    assert Node.objects.filter(name="gpu-1").count() == 1
    registrations = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, NodeCredentialRequired)]
    assert len(registrations) == 1 and registrations[0].created
    assert len(refused) == len(outcomes) - 1
    assert Node.objects.get(name="gpu-1").address == registrations[0].node.address


def _claim_with_retries(node_id, slots, needed, attempts=3 * THREADS):
    """What the router's placement loop does with a lost claim: try again (bounded)."""
    for _attempt in range(attempts):
        row = NodeModel.objects.claim_loading(node_id, "llama", slots=slots, backend_type="x", reserved_vram=needed)
        if row is not None:
            return row
    return None


def test_concurrent_claims_never_over_commit_vram_nor_leave_a_row_without_its_reservation(close_thread_connections):
    node = make_node(total_vram=10 * GIB, slots=THREADS)

    rows = run_in_threads(lambda i: _claim_with_retries(node.pk, THREADS, 3 * GIB), close_thread_connections)

    claimed = [row for row in rows if row is not None]
    node.refresh_from_db()
    assert len(claimed) == 3
    assert node.reserved_vram == 9 * GIB
    stored = list(NodeModel.objects.filter(node=node).values_list("pk", "replica_index", "reserved_vram", "state"))
    assert sorted(stored) == sorted((row.pk, row.replica_index, 3 * GIB, NodeModel.State.LOADING) for row in claimed)
    assert len({index for _, index, _, _ in stored}) == 3


def test_concurrent_claims_take_distinct_slots_and_no_more(close_thread_connections):
    node = make_node(total_vram=80 * GIB, slots=3)

    rows = run_in_threads(lambda i: _claim_with_retries(node.pk, 3, GIB), close_thread_connections)

    claimed = [row for row in rows if row is not None]
    assert sorted(row.replica_index for row in claimed) == [0, 1, 2]
    node.refresh_from_db()
    assert node.reserved_vram == 3 * GIB
    assert NodeModel.objects.filter(node=node).count() == 3


def test_concurrent_forgets_delete_each_row_once(close_thread_connections):
    node, other = make_node(slots=4), make_node()
    for index in range(4):
        make_replica(node, "llama", index)
    make_replica(other, "llama", 0)

    counts = run_in_threads(lambda i: NodeModel.objects.forget_node_replicas(node.pk), close_thread_connections)

    assert sum(counts) == 4
    assert list(NodeModel.objects.values_list("node_id", flat=True)) == [other.pk]


def test_claims_racing_a_node_going_offline_keep_reservations_and_rows_in_step(close_thread_connections):
    """``mark_offline`` forgets the node's rows and zeroes its reservation in one transaction;
    a claim inserts its row and reserves in one transaction. Whatever the interleaving, the
    node's reservation is exactly what its remaining ``loading`` rows hold."""
    node = make_node(total_vram=80 * GIB, slots=THREADS)

    def act(i):
        if i % 2:
            return Node.objects.mark_offline(node.pk)
        return _claim_with_retries(node.pk, THREADS, 2 * GIB)

    run_in_threads(act, close_thread_connections)

    node.refresh_from_db()
    held = sum(NodeModel.objects.filter(node=node).values_list("reserved_vram", flat=True))
    assert node.reserved_vram == held
