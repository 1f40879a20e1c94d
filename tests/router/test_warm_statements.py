"""The warm route's statements: ``Lease.objects.pick_and_grant`` (one round trip on PostgreSQL:
pick, in-flight increment and lease insert in one CTE, the model's node selector evaluated
inside it) and ``Lease.objects.release`` (one CTE: lease update feeding the decrement). Their
answers match the Python definitions they replace on both lanes; on PostgreSQL they are one
statement each, and threads routing, releasing and removing replicas at once always leave
``in_flight`` equal to the live leases, never negative."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from registry import router
from registry.models import Lease, Node, NodeModel
from tests.concurrency import THREADS, run_in_threads
from tests.factories import make_node, make_replica, make_scheduling

pytestmark = pytest.mark.django_db

TTL = 600


def reachable(model_name: str, replicas: int, **kwargs) -> set:
    """Nodes whose replicas ``pick_and_grant`` leases: each pick takes the least busy row, so
    as many picks as rows reach every candidate."""
    leases = [Lease.objects.pick_and_grant(model_name, ttl=TTL, **kwargs) for _ in range(replicas)]
    return {lease.node_id for lease in leases if lease is not None}


def assert_in_flight_equals_live_leases():
    live = Counter(Lease.objects.live().values_list("replica_id", flat=True))
    for pk, in_flight in NodeModel.objects.values_list("pk", "in_flight"):
        assert in_flight == live[pk] >= 0, (pk, in_flight, live[pk])


@pytest.mark.parametrize(
    "selector",
    [None, {}, {"zone": "a"}, {"zone": "a", "gpu": "h100"}, {"zone": "c"}, {"gpu": "h100"}],
)
def test_the_selector_in_the_statement_reaches_exactly_the_nodes_route_would_choose(selector):
    nodes = [
        make_node(labels={"zone": "a", "gpu": "h100"}),
        make_node(labels={"zone": "a"}),
        make_node(labels={"zone": "b", "gpu": "h100"}),
        make_node(labels={"zone": "a", "gpu": "h100"}, serves_worker_api=False),  # not placeable
        make_node(labels={"zone": "a", "gpu": "h100"}, status=Node.Status.DRAINING),
    ]
    for node in nodes:
        make_replica(node, "llama", 0)
    make_replica(make_node(labels={"zone": "a"}), "phi", 0)  # another model's row
    if selector is not None:
        make_scheduling("llama", node_selector=selector)

    # What route() computes in Python: the selector's placeable candidates, or every healthy node.
    nodes_of_rows = Node.objects.candidates(selector) if selector else Node.objects.schedulable()
    expected = set(nodes_of_rows.filter(replicas__model_name="llama").values_list("pk", flat=True))
    assert expected or selector == {"zone": "c"}
    assert reachable("llama", len(nodes), by_selector=True) == expected
    assert_in_flight_equals_live_leases()


def test_node_ids_and_by_selector_exclude_each_other():
    with pytest.raises(ValueError):
        Lease.objects.pick_and_grant("llama", ttl=TTL, node_ids=[], by_selector=True)


def test_an_empty_candidate_list_leases_nothing():
    make_replica(make_node(), "llama", 0)
    assert Lease.objects.pick_and_grant("llama", ttl=TTL, node_ids=[]) is None
    assert not Lease.objects.exists()


def test_the_granted_lease_is_the_stored_row_and_carries_the_node_heartbeat(now):
    node = make_node(now=now)
    row = make_replica(node, "llama", 2, address="127.0.0.1:7000", model_opts_blob=b"\x0a\x01x")

    lease = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)

    stored = Lease.objects.get(pk=lease.pk)
    assert (stored.replica_id, stored.node_id, stored.replica_index, stored.address) == (row.pk, node.pk, 2, row.address)
    assert (stored.expires_at, stored.created_at, stored.released_at) == (lease.expires_at, now, None)
    assert lease.replica.pk == row.pk and lease.replica.in_flight == 1 and lease.replica.last_used == now
    assert bytes(lease.replica.model_opts_blob) == b"\x0a\x01x"
    assert lease.replica.node_last_heartbeat == Node.objects.get(pk=node.pk).last_heartbeat


def test_release_with_outcome_says_what_happened(now):
    make_replica(make_node(), "llama", 0)
    lease = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)

    first = Lease.objects.release_with_outcome(lease.pk, now=now)
    second = Lease.objects.release_with_outcome(lease.pk)
    unknown = Lease.objects.release_with_outcome("00000000-0000-0000-0000-000000000000")

    assert first == (True, now, True)
    assert second == (False, now, True)
    assert unknown == (False, None, False)
    assert_in_flight_equals_live_leases()


@pytest.mark.postgres
def test_a_warm_route_and_a_release_are_one_statement_each(settings, now):
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600  # the row was just confirmed: no Health probe
    make_replica(
        make_node(now=now), "llama", 0, address="127.0.0.1:7000", backend_type="x", model_opts_blob=b"\x0a\x01x", last_probe_at=now
    )
    make_scheduling("llama", node_selector={})
    router.route("llama", now=now)  # the node's name is cached per process from now on

    with CaptureQueriesContext(connection) as route_queries:
        result = router.route("llama", now=now)
    with CaptureQueriesContext(connection) as release_queries:
        assert Lease.objects.release(result.lease.pk)

    assert len(route_queries) == 1, [query["sql"] for query in route_queries]
    assert len(release_queries) == 1, [query["sql"] for query in release_queries]


def _session_synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("lease_synchronous_commit", [False, True])
def test_a_lease_grant_and_release_set_their_own_commit_mode_and_nothing_outlives_them(
    settings, lease_synchronous_commit
):
    """By default (``LEASE_SYNCHRONOUS_COMMIT`` false) each statement sets ``synchronous_commit``
    off for its own transaction only (``set_config(..., true)``, also safe on a pooled server
    connection); the session keeps its own setting. Inside a caller's transaction, whose other
    writes must stay durable, and with the setting true, the statements leave it alone."""
    settings.LEASE_SYNCHRONOUS_COMMIT = lease_synchronous_commit
    make_replica(make_node(), "llama", 0, address="127.0.0.1:7000")
    asynchronous = not lease_synchronous_commit
    before = _session_synchronous_commit()

    with CaptureQueriesContext(connection) as queries:
        lease = Lease.objects.pick_and_grant("llama", ttl=TTL)
        assert Lease.objects.release(lease.pk)
    with transaction.atomic(), CaptureQueriesContext(connection) as in_transaction:
        held = Lease.objects.pick_and_grant("llama", ttl=TTL)
        assert Lease.objects.release(held.pk)

    commit_mode = "set_config('synchronous_commit', 'off', true)"
    assert [commit_mode in query["sql"] for query in queries] == [asynchronous, asynchronous]
    assert not any(commit_mode in query["sql"] for query in in_transaction)
    assert _session_synchronous_commit() == before == "on"
    assert_in_flight_equals_live_leases()
    assert not Lease.objects.live().exists()


# --- PostgreSQL, threads -----------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_many_concurrent_routes_and_releases_keep_in_flight_equal_to_live_leases(settings, close_thread_connections):
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600
    rows = [make_replica(make_node(), "llama", 0, address=f"127.0.0.1:{7000 + i}") for i in range(3)]
    make_scheduling("llama", node_selector={})
    rounds = 20

    def churn(i):
        kept = 0
        for round_ in range(rounds):
            lease = router.route("llama").lease
            if round_ % 4 == 0:
                kept += 1  # left live
            elif round_ % 4 == 1:
                # A double release from two threads at once (a retrying frontend): once only.
                twice = run_pair(lambda pk=lease.pk: Lease.objects.release(pk))
                assert sorted(twice) == [False, True]
            else:
                assert Lease.objects.release(lease.pk)
        return kept

    def run_pair(release):
        results = []
        other = threading.Thread(target=lambda: (results.append(release()), close_thread_connections()))
        other.start()
        results.append(release())
        other.join(timeout=30)
        return results

    kept = run_in_threads(churn, close_thread_connections)

    assert sum(kept) == THREADS * rounds // 4 == Lease.objects.live().count()
    assert_in_flight_equals_live_leases()
    assert sum(NodeModel.objects.filter(pk__in=[r.pk for r in rows]).values_list("in_flight", flat=True)) == sum(kept)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_routes_racing_replica_removal_never_leave_a_slot_counted_without_its_lease(close_thread_connections):
    nodes = [make_node(slots=8) for _ in range(4)]
    for node in nodes:
        for index in range(8):
            make_replica(node, "llama", index)
    removed = [(node.pk, index) for node in nodes[:2] for index in range(8)]

    def work(i):
        if i == 0:  # the remover: half the replicas go while the others route
            return sum(NodeModel.objects.remove_replica(node_id, "llama", index) for node_id, index in removed)
        granted = 0
        for round_ in range(30):
            lease = Lease.objects.pick_and_grant("llama", ttl=TTL, by_selector=True)
            assert lease is not None  # half the rows always remain
            granted += 1
            if round_ % 2:
                Lease.objects.release(lease.pk)
        return granted

    results = run_in_threads(work, close_thread_connections)

    assert results[0] == len(removed)
    assert NodeModel.objects.count() == 16
    assert Lease.objects.count() == sum(results[1:])  # every lease granted was written
    # The remaining rows count exactly their live leases; those of removed rows lost their
    # replica (SET NULL), never a decrement that hit another row.
    assert_in_flight_equals_live_leases()
    assert Lease.objects.live().filter(replica__isnull=False).count() == sum(
        NodeModel.objects.values_list("in_flight", flat=True)
    )
