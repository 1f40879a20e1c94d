"""Leases: granted with the warm pick's in-flight increment, released exactly once, renewed,
expired by TTL, and ``sweep_in_flight`` repairing drift, so ``in_flight`` equals live leases."""

from datetime import timedelta

import pytest

from registry.models import Lease, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

TTL = 600


def in_flight(row):
    return NodeModel.objects.values_list("in_flight", flat=True).get(pk=row.pk)


def test_pick_and_grant_leases_the_picked_replica_and_counts_it_in_flight(now):
    row = make_replica(make_node(), "llama", 0, address="127.0.0.1:7000")

    lease = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)

    assert lease.replica_id == row.pk and lease.replica.pk == row.pk
    assert (lease.model_name, lease.node_id, lease.replica_index, lease.address) == (
        "llama",
        row.node_id,
        0,
        "127.0.0.1:7000",
    )
    assert lease.expires_at == now + timedelta(seconds=TTL) and lease.is_live
    assert in_flight(row) == 1


def test_pick_and_grant_returns_none_without_a_loaded_replica(now):
    make_replica(make_node(), "llama", 0, state=NodeModel.State.LOADING)
    assert Lease.objects.pick_and_grant("llama", ttl=TTL, now=now) is None
    assert not Lease.objects.exists()


def test_grant_outside_the_increments_transaction_is_refused(now):
    row = make_replica(make_node())
    # pytest-django wraps non-transactional tests in atomic(); leave it to see the guard.
    from django.db import transaction

    connection = transaction.get_connection()
    was_atomic = connection.in_atomic_block
    connection.in_atomic_block = False
    try:
        with pytest.raises(RuntimeError):
            Lease.objects.grant(row, ttl=TTL, now=now)
    finally:
        connection.in_atomic_block = was_atomic


def test_release_is_idempotent_and_decrements_once(now):
    row = make_replica(make_node())
    first = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    assert in_flight(row) == 2

    assert Lease.objects.release(first.pk, now=now)
    assert not Lease.objects.release(first.pk, now=now)

    assert in_flight(row) == 1
    first.refresh_from_db()
    assert first.released_at == now and not first.is_live


def test_release_of_an_unknown_lease_is_false():
    import uuid

    assert not Lease.objects.release(uuid.uuid4())


def test_a_lease_outlives_its_replica_row_and_still_releases(now):
    node = make_node()
    make_replica(node)
    lease = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    NodeModel.objects.remove_replica(node.pk, "llama", 0)

    assert Lease.objects.release(lease.pk, now=now)
    lease.refresh_from_db()
    assert lease.replica_id is None and lease.address == ""


def test_renew_extends_a_live_lease_only(now):
    make_replica(make_node())
    lease = Lease.objects.pick_and_grant("llama", ttl=60, now=now)
    later = now + timedelta(seconds=90)  # already past its TTL, but not swept: still held

    assert Lease.objects.renew(lease.pk, ttl=60, now=later) == later + timedelta(seconds=60)
    Lease.objects.release(lease.pk, now=later)
    assert Lease.objects.renew(lease.pk, ttl=60, now=later) is None


def test_expire_releases_leases_past_their_ttl_and_gives_back_their_in_flight(now):
    row = make_replica(make_node())
    short = [Lease.objects.pick_and_grant("llama", ttl=60, now=now) for _ in range(3)]
    long = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    Lease.objects.release(short[0].pk, now=now)  # released by its caller: not expired again
    assert in_flight(row) == 3

    assert Lease.objects.expire(now + timedelta(seconds=61)) == 2
    assert Lease.objects.expire(now + timedelta(seconds=61)) == 0

    assert in_flight(row) == 1 == Lease.objects.live().count()
    assert Lease.objects.live().get().pk == long.pk
    # A late release of an expired lease is a no-op, not a second decrement.
    assert not Lease.objects.release(short[1].pk, now=now + timedelta(seconds=62))
    assert in_flight(row) == 1


def test_expire_works_in_batches(now):
    row = make_replica(make_node())
    for _ in range(5):
        Lease.objects.pick_and_grant("llama", ttl=1, now=now)

    assert Lease.objects.expire(now + timedelta(seconds=2), batch=2) == 5
    assert in_flight(row) == 0


def test_expire_never_takes_in_flight_below_zero(now):
    row = make_replica(make_node())
    Lease.objects.pick_and_grant("llama", ttl=1, now=now)
    assert NodeModel.objects.decrement_in_flight(row.pk)  # a release that counted twice zeroed it

    assert Lease.objects.expire(now + timedelta(seconds=2)) == 1
    assert in_flight(row) == 0


def test_sweep_sets_in_flight_to_the_live_lease_count(now):
    node = make_node(slots=3)
    leaked = make_replica(node, "llama", 0, in_flight=7)  # a crashed frontend never released
    held = make_replica(node, "llama", 1)
    exact = make_replica(node, "phi", 0)
    lease = Lease.objects.pick_and_grant("llama", ttl=TTL, node_ids=[node.pk], now=now)
    assert lease.replica_id == held.pk
    Lease.objects.pick_and_grant("phi", ttl=TTL, now=now)
    assert NodeModel.objects.decrement_in_flight(held.pk)  # a stray release: the count lost the lease

    assert Lease.objects.sweep_in_flight() == 2
    assert Lease.objects.sweep_in_flight() == 0

    assert (in_flight(leaked), in_flight(held), in_flight(exact)) == (0, 1, 1)


def test_purge_deletes_old_released_leases_only(now):
    make_replica(make_node())
    old = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    live = Lease.objects.pick_and_grant("llama", ttl=TTL, now=now)
    Lease.objects.release(old.pk, now=now - timedelta(days=2))

    assert Lease.objects.purge(released_before=now - timedelta(days=1)) == 1
    assert list(Lease.objects.values_list("pk", flat=True)) == [live.pk]
