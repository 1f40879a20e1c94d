"""Housekeeping in a pass: dead loaders' leftovers, expired leases, leaked in-flight counts."""

from datetime import timedelta

import pytest

from registry.models import Lease, Node, NodeModel
from tests.factories import GIB, make_node, make_replica

pytestmark = pytest.mark.django_db


def test_a_loading_row_older_than_every_load_deadline_is_discarded_with_its_reservation(reconcile, now, settings):
    settings.RECONCILE_STALE_LOADING_AFTER = 200
    node = make_node(total_vram=16 * GIB, now=now, slots=2)
    # Both loading rows are claimed by the router's verb (row + VRAM reservation), each with
    # its loader's clock; the first loader then died.
    NodeModel.objects.claim_loading(
        node.pk, "llama", slots=2, backend_type="llama-cpp", reserved_vram=4 * GIB, now=now - timedelta(seconds=201)
    )
    live = NodeModel.objects.claim_loading(
        node.pk, "llama", slots=2, backend_type="llama-cpp", reserved_vram=2 * GIB, now=now - timedelta(seconds=10)
    )

    summary = reconcile(heartbeat=False)

    assert summary.actions.get("stale_loading_rows_discarded") == 1
    assert set(NodeModel.objects.values_list("pk", flat=True)) == {live.pk}
    node.refresh_from_db()
    assert node.reserved_vram == 2 * GIB  # the live load keeps its reservation


def test_a_successful_loads_reservation_is_left_for_the_next_heartbeat(reconcile, now):
    node = make_node(total_vram=16 * GIB, now=now)
    make_replica(node, "llama", 0, reserved_vram=4 * GIB, last_probe_at=now)  # claimed, then loaded

    reconcile()

    node.refresh_from_db()
    assert node.reserved_vram == 4 * GIB
    Node.objects.heartbeat(node.pk, available_vram=12 * GIB, now=now)
    node.refresh_from_db()
    assert node.reserved_vram == 0


def test_expired_leases_give_their_in_flight_back_in_a_pass(reconcile, now):
    node = make_node(now=now)
    replica = make_replica(node, "llama", 0, last_probe_at=now)
    expiring = Lease.objects.pick_and_grant("llama", ttl=60, now=now - timedelta(minutes=5))
    live = Lease.objects.pick_and_grant("llama", ttl=600, now=now)
    assert expiring and live

    summary = reconcile()

    assert summary.actions.get("leases_expired") == 1
    replica.refresh_from_db()
    assert replica.in_flight == 1  # what the one live lease holds


def test_a_leaked_in_flight_count_is_set_back_to_the_live_leases(reconcile, now):
    node = make_node(now=now)
    replica = make_replica(node, "llama", 0, in_flight=3, last_probe_at=now)  # a crashed frontend's

    reconcile()

    replica.refresh_from_db()
    assert replica.in_flight == 0
