"""Affinity routing through the warm pick (``Lease.objects.pick_and_grant(affinity_key=...)``,
``router.route``, ``POST /api/v1/models/{model}/route``): the statement (PostgreSQL) and the
SQLite path choose what ``registry.affinity.choose`` says for the rows as stored, a session stays
on its replica while load is even and spills to its next replica when its own is over the cap;
on PostgreSQL a keyed route is still one statement, and threads routing with keys keep
``in_flight`` equal to the live leases and every replica within the bound."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from registry import affinity, router
from registry.models import Lease, NodeModel
from tests.clients import assert_problem, client_for_role
from tests.concurrency import THREADS, run_in_threads
from tests.factories import make_node, make_replica, make_scheduling

pytestmark = pytest.mark.django_db

TTL = 600
FACTOR = 1.25


@pytest.fixture
def replicas(settings, now):
    """Four loaded replicas of ``llama`` on four nodes, confirmed at ``now`` (no Health probe)."""
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600
    settings.ROUTE_AFFINITY_LOAD_FACTOR = FACTOR
    rows = [
        make_replica(
            make_node(now=now),
            "llama",
            0,
            address=f"127.0.0.1:{7100 + i}",
            last_probe_at=now,
            backend_type="x",
            model_opts_blob=b"\x0a\x01x",  # its own recipe: the model identity costs no query
        )
        for i in range(4)
    ]
    make_scheduling("llama", node_selector={})
    return rows


def stored_candidates() -> list[affinity.Candidate]:
    rows = NodeModel.objects.filter(model_name="llama").values_list("pk", "node_id", "replica_index", "in_flight")
    return [affinity.Candidate(*row) for row in rows]


def expected_pick(key: str):
    return affinity.choose(key, stored_candidates(), FACTOR).pk


def assert_in_flight_equals_live_leases():
    live = Counter(Lease.objects.live().values_list("replica_id", flat=True))
    for pk, in_flight in NodeModel.objects.values_list("pk", "in_flight"):
        assert in_flight == live[pk] >= 0, (pk, in_flight, live[pk])


def test_the_pick_is_the_replica_the_preference_names_for_every_key(replicas, now):
    for i in range(40):
        key = f"session-{i}"
        expected = expected_pick(key)
        lease = Lease.objects.pick_and_grant("llama", ttl=TTL, affinity_key=key, now=now)
        assert lease.replica.pk == expected, key
        Lease.objects.release(lease.pk, now=now)
    assert_in_flight_equals_live_leases()


def test_a_session_stays_on_its_replica_while_load_is_even(replicas, now):
    """Other sessions keep every replica equally busy; the session's turns all land on one."""
    held = [Lease.objects.pick_and_grant("llama", ttl=TTL, now=now) for _ in range(8)]  # 2 each
    turns = []
    for _ in range(10):
        result = router.route("llama", affinity_key="chat-7", now=now)
        turns.append(result.lease.replica_id)
        Lease.objects.release(result.lease.pk, now=now)
    assert len(set(turns)) == 1
    assert turns[0] == affinity.preference("chat-7", stored_candidates())[0].pk
    assert len(held) == 8
    assert_in_flight_equals_live_leases()


def test_a_session_spills_to_its_next_replica_when_its_own_is_over_the_bound(replicas, now):
    order = [c.pk for c in affinity.preference("chat-7", stored_candidates())]
    preferred = NodeModel.objects.get(pk=order[0])
    # Hold 4 leases on the preferred replica: cap ceil(1.25 x 5 / 4) + 1 = 3, and 4 >= 3.
    for _ in range(4):
        Lease.objects.pick_and_grant("llama", ttl=TTL, node_ids=[preferred.node_id], now=now)

    spilled = [router.route("llama", affinity_key="chat-7", now=now).lease for _ in range(2)]

    # Both to the key's second choice: 0, then 1, below the caps ceil(1.25 x 5 / 4) + 1 and ceil(1.25 x 6 / 4) + 1, 3.
    assert [lease.replica_id for lease in spilled] == [order[1], order[1]]
    for lease in spilled:
        Lease.objects.release(lease.pk, now=now)
    # The held leases end: the session goes home.
    for lease in Lease.objects.live():
        Lease.objects.release(lease.pk, now=now)
    assert router.route("llama", affinity_key="chat-7", now=now).lease.replica_id == order[0]
    assert_in_flight_equals_live_leases()


def test_a_hot_key_fills_its_replica_to_the_bound_and_then_spreads(replicas, now):
    leases = [Lease.objects.pick_and_grant("llama", ttl=TTL, affinity_key="hot", now=now) for _ in range(40)]
    loads = sorted(NodeModel.objects.values_list("in_flight", flat=True))
    assert sum(loads) == 40
    assert max(loads) <= math.ceil(FACTOR * 40 / 4) + 1  # 14, not 40
    assert len({lease.replica_id for lease in leases}) >= 3
    assert_in_flight_equals_live_leases()


def test_the_key_only_chooses_among_the_candidates(replicas, now):
    allowed = [replicas[1].node_id, replicas[2].node_id]
    for i in range(12):
        lease = Lease.objects.pick_and_grant("llama", ttl=TTL, affinity_key=f"k{i}", node_ids=allowed, now=now)
        assert lease.node_id in allowed
    assert Lease.objects.pick_and_grant("llama", ttl=TTL, affinity_key="k", node_ids=[], now=now) is None


@pytest.mark.parametrize("key", [None, ""])
def test_no_key_is_least_in_flight(replicas, now, key):
    leases = [Lease.objects.pick_and_grant("llama", ttl=TTL, affinity_key=key, now=now) for _ in range(4)]
    assert len({lease.replica_id for lease in leases}) == 4


@pytest.mark.parametrize("key", ["x" * 257, "a\x00b"])
def test_a_bad_key_is_refused_before_anything_is_written(replicas, now, key):
    with pytest.raises(ValueError):
        router.route("llama", affinity_key=key, now=now)
    assert not Lease.objects.exists()
    assert set(NodeModel.objects.values_list("in_flight", flat=True)) == {0}


# --- the REST API ---------------------------------------------------------------------------


def test_the_route_api_takes_an_affinity_key(settings):
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600
    settings.ROUTE_AFFINITY_LOAD_FACTOR = FACTOR
    for i in range(3):
        make_replica(make_node(), "llama", 0, address=f"127.0.0.1:{7200 + i}", last_probe_at=timezone.now())
    api = client_for_role("frontend")
    expected = affinity.preference("conversation-1", stored_candidates())[0]

    answers = []
    for _ in range(3):
        response = api.post("/api/v1/models/llama/route", {"affinity_key": "conversation-1"}, format="json")
        assert response.status_code == 200, response.json()
        answers.append(response.json())
        api.post(f"/api/v1/leases/{response.json()['lease_id']}/release")

    assert {answer["node_id"] for answer in answers} == {str(expected.node_id)}
    response = api.post("/api/v1/models/llama/route", {"affinity_key": None}, format="json")
    assert response.status_code == 200


@pytest.mark.parametrize(
    "key", ["x" * 257, "tab\there", 42, ["a"], {"k": "v"}], ids=["too-long", "control", "number", "list", "object"]
)
def test_the_route_api_refuses_a_bad_affinity_key(key):
    make_replica(make_node(), "llama", 0, address="127.0.0.1:7300", last_probe_at=timezone.now())
    response = client_for_role("frontend").post("/api/v1/models/llama/route", {"affinity_key": key}, format="json")
    problem = assert_problem(response, 400, "validation_error")
    assert "affinity_key" in str(problem)
    assert not Lease.objects.exists()


# --- PostgreSQL: one statement, threads -----------------------------------------------------


@pytest.mark.postgres
def test_a_keyed_warm_route_is_one_statement(replicas, now):
    warm_up = [router.route("llama", now=now).lease for _ in replicas]  # one each: every node's name cached
    assert len({lease.node_id for lease in warm_up}) == len(replicas)
    for lease in warm_up:
        Lease.objects.release(lease.pk, now=now)
    with CaptureQueriesContext(connection) as queries:
        result = router.route("llama", affinity_key="chat-1", now=now)
    assert len(queries) == 1, [query["sql"] for query in queries]
    assert result.lease.replica_id == affinity.choose("chat-1", stored_candidates_before(result), FACTOR).pk


def stored_candidates_before(result) -> list[affinity.Candidate]:
    """The stored rows as they were before ``result``'s pick (its row counted one less)."""
    return [
        c._replace(in_flight=c.in_flight - 1) if c.pk == result.lease.replica_id else c for c in stored_candidates()
    ]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_keyed_routes_respect_the_bound_and_count_every_lease(settings, close_thread_connections):
    """Every thread routes the same hot key and a few of its own, holding every lease: without
    the bound they would all pile on one replica. Each placement is under the cap of its own
    snapshot, which only grows while nothing is released, so the busiest replica ends within
    ceil(1.25 x total / replicas) + 1."""
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600
    settings.ROUTE_AFFINITY_LOAD_FACTOR = FACTOR
    now = timezone.now()
    for i in range(4):
        make_replica(make_node(now=now), "llama", 0, address=f"127.0.0.1:{7400 + i}", last_probe_at=now)
    rounds = 12

    def route_and_hold(i):
        granted = []
        for round_ in range(rounds):
            key = "hot" if round_ % 2 == 0 else f"thread-{i}-{round_ % 3}"
            granted.append(router.route("llama", affinity_key=key).lease.replica_id)
        return granted

    results = run_in_threads(route_and_hold, close_thread_connections)

    total = THREADS * rounds
    loads = list(NodeModel.objects.values_list("in_flight", flat=True))
    assert sum(loads) == total == Lease.objects.live().count()
    assert max(loads) <= math.ceil(FACTOR * total / 4) + 1, loads
    assert len({replica for granted in results for replica in granted}) == 4
    assert_in_flight_equals_live_leases()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_keyed_routes_and_releases_keep_in_flight_equal_to_live_leases(settings, close_thread_connections):
    settings.ROUTE_PROBE_CACHE_SECONDS = 3600
    now = timezone.now()
    for i in range(3):
        make_replica(make_node(now=now), "llama", 0, address=f"127.0.0.1:{7500 + i}", last_probe_at=now)

    def churn(i):
        kept = 0
        for round_ in range(20):
            lease = router.route("llama", affinity_key=f"session-{(i + round_) % 5}").lease
            if round_ % 3 == 0:
                kept += 1
            else:
                Lease.objects.release(lease.pk)
        return kept

    kept = sum(run_in_threads(churn, close_thread_connections))

    assert Lease.objects.live().count() == kept
    assert_in_flight_equals_live_leases()
