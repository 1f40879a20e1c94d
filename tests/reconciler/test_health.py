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


def test_a_lone_stale_node_is_marked_offline_and_loses_its_rows_but_not_load_info(now, watch, load_info):
    stale = make_node(name="gpu-a", now=now)
    fresh = [make_node(name=f"gpu-{i}", now=now) for i in "bcd"]
    make_replica(stale, "llama", 0)
    make_replica(fresh[0], "llama", 0)
    load_info("llama")

    summaries = watch(40, alive=fresh)

    # gpu-a was last seen heartbeating by the first pass: 30 s later it is not stale yet.
    assert all("nodes_marked_offline" not in summaries[t].actions for t in (0, 10, 20, 30))
    assert summaries[40].actions["nodes_marked_offline"] == 1
    assert status(stale) == Node.Status.OFFLINE
    assert all(status(node) == Node.Status.HEALTHY for node in fresh)
    assert list(NodeModel.objects.values_list("node_id", flat=True)) == [fresh[0].pk]
    assert ModelLoadInfo.objects.filter(model_name="llama").exists()
    event = Event.objects.get(kind=Event.Kind.NODE_OFFLINE)
    assert (event.node_id, event.node_name) == (stale.pk, "gpu-a")


def test_a_heartbeat_between_snapshot_and_update_wins(now, watch, monkeypatch):
    """mark_offline is conditional on the heartbeat still being the value observed, even when
    the new heartbeat's timestamp (from a web process with a slow clock) is older."""
    from reconciler import apply as module

    stale = make_node(name="gpu-a", now=now)
    fresh = [make_node(name="gpu-b", now=now), make_node(name="gpu-c", now=now)]
    watch(30, alive=fresh)
    real = module.take_snapshot

    def snapshot_then_heartbeat(**kwargs):
        snapshot = real(**kwargs)
        Node.objects.heartbeat(stale.pk, now=now - timedelta(hours=1))
        return snapshot

    monkeypatch.setattr(module, "take_snapshot", snapshot_then_heartbeat)
    summary = watch(40, alive=fresh, start=40)[40]

    assert "nodes_marked_offline" not in summary.actions
    assert status(stale) == Node.Status.HEALTHY


def test_a_new_heartbeat_brings_offline_nodes_back(now, reconcile):
    """(An unhealthy node heartbeats all along: it comes back when its worker answers again,
    tests/reconciler/test_unhealthy.py.)"""
    offline = make_node(name="gpu-a", now=now, status=Node.Status.OFFLINE)
    pending = make_node(name="gpu-c", now=now, status=Node.Status.PENDING)
    still_silent = make_node(name="gpu-d", now=now, status=Node.Status.OFFLINE)
    first = reconcile()  # first sight: observed, nobody recovered on an old heartbeat
    for node in (offline, pending):
        # the web process that received them has a clock an hour behind: a new value is news
        Node.objects.heartbeat(node.pk, now=now - timedelta(hours=1))

    summary = reconcile(at=now + timedelta(seconds=10))

    assert "nodes_recovered" not in first.actions
    assert summary.actions["nodes_recovered"] == 1
    assert status(offline) == Node.Status.HEALTHY
    assert status(pending) == Node.Status.PENDING  # needs approval, not a heartbeat
    assert status(still_silent) == Node.Status.OFFLINE
    assert Event.objects.filter(kind=Event.Kind.NODE_RECOVERED).count() == 1


def test_draining_nodes_are_not_reaped(now, watch):
    draining = make_node(name="gpu-a", now=now, status=Node.Status.DRAINING)
    make_replica(draining, "llama", 0)
    alive = make_node(name="gpu-b", now=now)

    watch(60, alive=[alive])

    assert status(draining) == Node.Status.DRAINING
    assert NodeModel.objects.filter(node=draining).exists()


def test_mass_staleness_guard_reaps_no_node_and_says_why_once(now, watch):
    nodes = [make_node(name=f"gpu-{i}", now=now) for i in range(3)]
    fresh = make_node(name="gpu-fresh", now=now)
    for node in nodes:
        make_replica(node, "llama", 0)

    summaries = watch(50, alive=[fresh])

    assert all(status(node) == Node.Status.HEALTHY for node in nodes)
    assert NodeModel.objects.count() == 3
    assert summaries[40].skipped["mass_staleness"] == 3
    assert summaries[50].skipped["mass_staleness"] == 3
    guard = ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED)
    assert (guard.status, guard.reason) == (True, "mass_staleness")
    assert "3 of 4" in guard.message
    assert Event.objects.filter(kind=Event.Kind.MASS_STALENESS_GUARD).count() == 1


def test_guard_lifts_when_heartbeats_resume(now, watch):
    nodes = [make_node(name=f"gpu-{i}", now=now) for i in range(2)]
    fresh = make_node(name="gpu-fresh", now=now)
    watch(40, alive=[fresh])
    assert ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED).status is True

    watch(50, alive=[*nodes, fresh], start=50)

    guard = ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED)
    assert guard.status is False
    assert Event.objects.filter(kind=Event.Kind.MASS_STALENESS_CLEARED).count() == 1


def test_half_of_the_nodes_stale_is_not_mass_staleness(now, watch):
    stale = [make_node(name=f"gpu-{i}", now=now) for i in range(2)]
    fresh = [make_node(name=f"gpu-fresh-{i}", now=now) for i in range(2)]

    summaries = watch(40, alive=fresh)

    assert summaries[40].actions["nodes_marked_offline"] == 2
    assert all(status(node) == Node.Status.OFFLINE for node in stale)


@override_settings(RECONCILE_MASS_STALE_FRACTION=0.9)
def test_the_guard_fraction_is_a_setting(now, watch):
    for i in range(3):
        make_node(name=f"gpu-{i}", now=now)
    fresh = make_node(name="gpu-fresh", now=now)

    summaries = watch(40, alive=[fresh])

    assert summaries[40].actions["nodes_marked_offline"] == 3


def test_a_single_node_fleet_going_stale_is_reaped(now, watch):
    """At least two stale nodes are needed for the guard, two swept nodes for silence."""
    only = make_node(name="gpu-a", now=now)

    watch(40)

    assert status(only) == Node.Status.OFFLINE


@override_settings(STALE_AFTER=120)
def test_stale_after_is_read_from_settings(now, watch):
    node = make_node(name="gpu-a", now=now)

    summaries = watch(120)
    assert status(node) == Node.Status.HEALTHY
    summaries = watch(130, start=130)

    assert summaries[130].actions["nodes_marked_offline"] == 1


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
