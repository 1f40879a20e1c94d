"""Staleness on the reconciler's own clock, and after the control plane could not observe
heartbeats (issue 11, item 3). Every heartbeat goes through the heartbeat verb with the clock
of the web process that received it; every pass is a real ``reconcile_once`` at a fixed time."""

from datetime import timedelta

import pytest

from reconciler.models import ModelCondition
from registry.models import Node, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db


def status(node):
    node.refresh_from_db()
    return node.status


@pytest.fixture
def fleet_pass(reconcile, now):
    """fleet_pass(offset, heartbeats={node: web_clock_skew_seconds}) -> PassSummary: the given
    nodes heartbeat through web processes whose clocks are off by their skew, then one pass runs
    at ``now + offset`` on the reconciler's (correct) clock."""

    def run(offset, heartbeats=None):
        at = now + timedelta(seconds=offset)
        for node, skew in (heartbeats or {}).items():
            Node.objects.heartbeat(node.pk, now=at + timedelta(seconds=skew))
        return reconcile(at=at)

    return run


def test_a_heartbeat_received_by_a_web_process_with_a_slow_clock_is_as_fresh_as_any(now, fleet_pass):
    """A web process whose clock is 60 s behind stamps every heartbeat a minute in the past.
    The old rule (``last_heartbeat`` against the pass's clock) reaped that node on every pass
    although it heartbeated every 10 s."""
    behind = make_node(name="gpu-behind", now=now)
    others = [make_node(name=f"gpu-{i}", now=now) for i in range(3)]

    summaries = [fleet_pass(t, {behind: -60, **{node: 0 for node in others}}) for t in range(0, 61, 10)]

    assert all("nodes_marked_offline" not in s.actions for s in summaries)
    assert status(behind) == Node.Status.HEALTHY


def test_a_dead_node_is_reaped_on_time_even_if_its_last_web_process_ran_fast(now, fleet_pass):
    """A web process whose clock is 2 minutes ahead received the last heartbeat of a node that
    then died. Its timestamp stays "in the future" for two minutes; the reconciler counts from
    when it saw that heartbeat and reaps the node one stale threshold (+ one pass) later."""
    dying = make_node(name="gpu-dying", now=now)
    others = [make_node(name=f"gpu-{i}", now=now) for i in range(3)]
    fleet_pass(0, {dying: 120, **{node: 0 for node in others}})  # its last heartbeat

    reaped_at = None
    for t in range(10, 71, 10):
        summary = fleet_pass(t, {node: 0 for node in others})
        if summary.actions.get("nodes_marked_offline"):
            reaped_at = t
            break

    assert reaped_at == 40  # seen at 0, stale after 30 s, the next pass reaps it
    assert status(dying) == Node.Status.OFFLINE


def test_after_a_database_outage_nothing_is_reaped_and_a_node_that_died_meanwhile_is(now, fleet_pass):
    """The database is down from 25 s to 85 s: no pass runs, no heartbeat is stored. Right
    after it is back, two workers' heartbeats have arrived, a third's not yet (its next tick is
    a few seconds away), and the fourth worker died during the outage. The old rule saw two of
    four stale (exactly half: no guard) and reaped both, the live one included."""
    fast = [make_node(name=f"gpu-fast-{i}", now=now) for i in range(2)]
    slow = make_node(name="gpu-slow", now=now)
    dead = make_node(name="gpu-dead", now=now)
    make_replica(slow, "llama", 0, last_probe_at=now + timedelta(hours=1))
    everyone = {node: 0 for node in (*fast, slow, dead)}
    for t in (0, 10, 20):
        fleet_pass(t, everyone)

    after = fleet_pass(90, {node: 0 for node in fast})  # first pass after the outage

    assert "nodes_marked_offline" not in after.actions
    assert status(slow) == Node.Status.HEALTHY and NodeModel.objects.filter(node=slow).exists()
    assert after.actions["observation_restarted"] == 1

    alive = {node: 0 for node in (*fast, slow)}
    summaries = {t: fleet_pass(t, alive) for t in range(95, 141, 5)}
    reaped = [t for t, s in summaries.items() if s.actions.get("nodes_marked_offline")]
    assert reaped == [125]  # one stale threshold (30 s) after observation resumed, next pass
    assert status(dead) == Node.Status.OFFLINE
    assert status(slow) == Node.Status.HEALTHY


def test_while_no_heartbeat_arrives_nothing_is_reaped_and_counting_restarts_when_they_do(now, fleet_pass):
    """The web tier is down from 25 s to 95 s while passes keep running: no heartbeat of any
    node arrives (ingestion silence). Nothing is reaped during it; when heartbeats come back, a
    node whose next heartbeat is a few seconds later is not reaped, a node that died is."""
    fast = [make_node(name=f"gpu-fast-{i}", now=now) for i in range(2)]
    slow = make_node(name="gpu-slow", now=now)
    dead = make_node(name="gpu-dead", now=now)
    everyone = {node: 0 for node in (*fast, slow, dead)}
    for t in (0, 10, 20):
        fleet_pass(t, everyone)

    during = [fleet_pass(t) for t in range(30, 91, 10)]

    assert all("nodes_marked_offline" not in s.actions for s in during)
    paused = ModelCondition.objects.get(model_name="", type=ModelCondition.Type.REAPING_PAUSED)
    paused_during = (paused.status, paused.reason)

    back = fleet_pass(100, {node: 0 for node in fast})

    assert "nodes_marked_offline" not in back.actions
    assert back.actions["observation_restarted"] == 1
    assert during[-1].skipped["heartbeat_ingestion_silent"] >= 1
    assert paused_during == (True, "heartbeat_ingestion_silent")
    alive = {node: 0 for node in (*fast, slow)}
    summaries = {t: fleet_pass(t, alive) for t in range(105, 151, 5)}
    reaped = [t for t, s in summaries.items() if s.actions.get("nodes_marked_offline")]
    assert reaped == [135]
    assert (status(dead), status(slow)) == (Node.Status.OFFLINE, Node.Status.HEALTHY)
    paused.refresh_from_db()
    assert paused.status is False


def test_a_pass_costs_one_observation_update_whatever_the_fleet_size(now, fleet_pass):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def updates(nodes):
        Node.objects.all().delete()
        fleet = [make_node(name=f"gpu-{nodes}-{i}", now=now) for i in range(nodes)]
        fleet_pass(0, {node: 0 for node in fleet})
        with CaptureQueriesContext(connection) as captured:
            fleet_pass(10, {node: 0 for node in fleet})
        return [q["sql"] for q in captured.captured_queries if "heartbeat_seen_at" in q["sql"] and "UPDATE" in q["sql"]]

    assert len(updates(2)) == len(updates(20)) == 1


@pytest.mark.postgres
def test_reconcilers_on_machines_with_different_clocks_count_on_the_databases(monkeypatch, scheduler, prober):
    """Leader runs move between qcluster processes, possibly on machines whose clocks disagree.
    Here three passes run within a second on machines whose clocks are 20 s slow, 10 s slow and
    15 s fast: on their own clocks gpu-0 (not heartbeating) would have been unseen for 35 s and
    reaped. A pass without a fixed ``now`` takes the database's clock instead."""
    from django.utils import timezone

    from reconciler.reconcile import reconcile_once

    real_now = timezone.now
    quiet, *others = [make_node(name=f"gpu-{i}", now=real_now()) for i in range(3)]

    def on_machine(skew_seconds):
        monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=skew_seconds))
        return reconcile_once(scheduler=scheduler, prober=prober)

    on_machine(-20)
    for node in others:
        Node.objects.heartbeat(node.pk, now=real_now())
    on_machine(-10)
    last = on_machine(+15)

    assert "nodes_marked_offline" not in last.actions
    assert status(quiet) == Node.Status.HEALTHY
    assert abs(last.started_at - real_now()) < timedelta(seconds=5)


def test_a_clock_read_that_fails_does_not_escape_the_pass(monkeypatch, scheduler, prober):
    """The database clock is read before the pass's error handling starts; when the database is
    gone there, the pass still returns a summary (the leader loop relies on it)."""
    from django.db import OperationalError

    from reconciler import reconcile as module

    def unavailable():
        raise OperationalError("connection refused")

    monkeypatch.setattr(module, "database_now", unavailable)
    summary = module.run_pass(scheduler=scheduler, prober=prober)

    assert summary.started_at is not None
