"""Node health: stale heartbeats, recovery, draining, and the mass-staleness guard."""

from datetime import timedelta

import pytest
from django.test import override_settings

from reconciler.models import Event, ModelCondition
from registry.models import ModelLoadInfo, Node, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

STALE = timedelta(seconds=31)


def status(node):
    node.refresh_from_db()
    return node.status


def test_a_lone_stale_node_is_marked_offline_and_loses_its_rows_but_not_load_info(now, reconcile, load_info):
    stale = make_node(name="gpu-a", now=now - STALE)
    fresh = [make_node(name=f"gpu-{i}", now=now) for i in "bcd"]
    make_replica(stale, "llama", 0)
    make_replica(fresh[0], "llama", 0)
    load_info("llama")

    summary = reconcile()

    assert summary.actions["nodes_marked_offline"] == 1
    assert status(stale) == Node.Status.OFFLINE
    assert all(status(node) == Node.Status.HEALTHY for node in fresh)
    assert list(NodeModel.objects.values_list("node_id", flat=True)) == [fresh[0].pk]
    assert ModelLoadInfo.objects.filter(model_name="llama").exists()
    event = Event.objects.get(kind=Event.Kind.NODE_OFFLINE)
    assert (event.node_id, event.node_name) == (stale.pk, "gpu-a")


def test_a_heartbeat_between_snapshot_and_update_wins(now, reconcile, monkeypatch):
    """mark_offline is conditional on the heartbeat still being old."""
    from reconciler import reconcile as module

    stale = make_node(name="gpu-a", now=now - STALE)
    make_node(name="gpu-b", now=now)
    make_node(name="gpu-c", now=now)
    real = module.take_snapshot

    def snapshot_then_heartbeat(**kwargs):
        snapshot = real(**kwargs)
        Node.objects.heartbeat(stale.pk, now=now)
        return snapshot

    monkeypatch.setattr(module, "take_snapshot", snapshot_then_heartbeat)
    summary = reconcile()

    assert "nodes_marked_offline" not in summary.actions
    assert status(stale) == Node.Status.HEALTHY


def test_fresh_heartbeat_brings_offline_and_unhealthy_nodes_back(now, reconcile):
    offline = make_node(name="gpu-a", now=now, status=Node.Status.OFFLINE)
    unhealthy = make_node(name="gpu-b", now=now, status=Node.Status.UNHEALTHY)
    pending = make_node(name="gpu-c", now=now, status=Node.Status.PENDING)
    still_silent = make_node(name="gpu-d", now=now - timedelta(hours=1), status=Node.Status.OFFLINE)

    summary = reconcile()

    assert summary.actions["nodes_recovered"] == 2
    assert (status(offline), status(unhealthy)) == (Node.Status.HEALTHY, Node.Status.HEALTHY)
    assert status(pending) == Node.Status.PENDING  # needs approval, not a heartbeat
    assert status(still_silent) == Node.Status.OFFLINE
    assert Event.objects.filter(kind=Event.Kind.NODE_RECOVERED).count() == 2


def test_draining_nodes_are_not_reaped(now, reconcile):
    draining = make_node(name="gpu-a", now=now - timedelta(hours=1), status=Node.Status.DRAINING)
    make_replica(draining, "llama", 0)
    make_node(name="gpu-b", now=now)

    reconcile()

    assert status(draining) == Node.Status.DRAINING
    assert NodeModel.objects.filter(node=draining).exists()


def test_mass_staleness_guard_reaps_no_node_and_says_why_once(now, reconcile):
    nodes = [make_node(name=f"gpu-{i}", now=now - STALE) for i in range(3)]
    make_node(name="gpu-fresh", now=now)
    for node in nodes:
        make_replica(node, "llama", 0)

    first = reconcile()
    second = reconcile(at=now + timedelta(seconds=10))

    assert all(status(node) == Node.Status.HEALTHY for node in nodes)
    assert NodeModel.objects.count() == 3
    assert first.skipped["mass_staleness"] == 3
    assert second.skipped["mass_staleness"] == 3
    guard = ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED)
    assert (guard.status, guard.reason) == (True, "mass_staleness")
    assert "3 of 4" in guard.message
    assert Event.objects.filter(kind=Event.Kind.MASS_STALENESS_GUARD).count() == 1


def test_guard_lifts_when_heartbeats_resume(now, reconcile):
    nodes = [make_node(name=f"gpu-{i}", now=now - STALE) for i in range(2)]
    reconcile()
    for node in nodes:
        Node.objects.heartbeat(node.pk, now=now)

    reconcile()

    guard = ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED)
    assert guard.status is False
    assert Event.objects.filter(kind=Event.Kind.MASS_STALENESS_CLEARED).count() == 1


def test_half_of_the_nodes_stale_is_not_mass_staleness(now, reconcile):
    stale = [make_node(name=f"gpu-{i}", now=now - STALE) for i in range(2)]
    for i in range(2):
        make_node(name=f"gpu-fresh-{i}", now=now)

    summary = reconcile()

    assert summary.actions["nodes_marked_offline"] == 2
    assert all(status(node) == Node.Status.OFFLINE for node in stale)


@override_settings(RECONCILE_MASS_STALE_FRACTION=0.9)
def test_the_guard_fraction_is_a_setting(now, reconcile):
    for i in range(3):
        make_node(name=f"gpu-{i}", now=now - STALE)
    make_node(name="gpu-fresh", now=now)

    summary = reconcile()

    assert summary.actions["nodes_marked_offline"] == 3


def test_a_single_node_fleet_going_stale_is_reaped(now, reconcile):
    """At least two stale nodes are needed for the guard."""
    only = make_node(name="gpu-a", now=now - STALE)

    reconcile()

    assert status(only) == Node.Status.OFFLINE


@override_settings(STALE_AFTER=120)
def test_stale_after_is_read_from_settings(now, reconcile):
    node = make_node(name="gpu-a", now=now - timedelta(seconds=90))

    reconcile()

    assert status(node) == Node.Status.HEALTHY


def test_a_node_that_signed_off_is_not_recovered_until_it_heartbeats_again(reconcile, now):
    from registry.models import Node
    from tests.factories import make_node

    node = make_node(now=now)
    Node.objects.mark_offline(node.pk, forget_heartbeat=True)

    reconcile(at=now)
    node.refresh_from_db()
    assert node.status == Node.Status.OFFLINE

    Node.objects.heartbeat(node.pk, now=now)
    reconcile(at=now)
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY
