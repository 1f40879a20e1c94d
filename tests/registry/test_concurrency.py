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
