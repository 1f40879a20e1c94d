"""The rollout's pure planning (``reconciler/rollout.py``): one step per pass, surge before
drain, the floor held at every pass, drains bounded by in-flight or the timeout."""

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.conf import ReconcileConfig
from reconciler.planning import plan_model, plan_scaling
from reconciler.rollout import plan_rollout, plan_rollouts
from reconciler.snapshot import ConfigView, NodeView, ReplicaView, Snapshot
from registry.models import Node, NodeModel

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CFG = replace(ReconcileConfig.from_settings(), rollout_drain_timeout=timedelta(seconds=60))
OLD, NEW = "template-old", "template-new"


def node(name, slots=2):
    return NodeView(
        id=uuid.uuid5(uuid.NAMESPACE_DNS, name),
        name=name,
        status=Node.Status.HEALTHY,
        last_heartbeat=NOW,
        slots=slots,
        address=f"{name}:50051",
    )


def replica(id_, on, index, revision, *, state=NodeModel.State.LOADED, in_flight=0, draining_since=None):
    return ReplicaView(
        id=id_,
        node_id=on.id,
        model_name="llama",
        replica_index=index,
        state=state,
        address=f"{on.name}:{7000 + index}",
        in_flight=in_flight,
        last_used=NOW,
        revision=revision,
        draining_since=draining_since,
    )


def snap(nodes, replicas, *, min_replicas=2, max_replicas=0, templates=None, current=2):
    return Snapshot(
        taken_at=NOW,
        nodes={n.id: n for n in nodes},
        replicas=tuple(replicas),
        configs={"llama": ConfigView("llama", min_replicas, max_replicas)},
        load_info_models=frozenset({"llama"}),
        templates=templates or {("llama", 1): OLD, ("llama", 2): NEW},
        current_revisions={"llama": current},
    )


def rollout_of(snapshot, now=NOW):
    scale = plan_model(snapshot, snapshot.configs["llama"], CFG, now=now)
    return plan_rollout(snapshot, scale, CFG, now=now)


A, B, C = node("a"), node("b"), node("c")


def test_nothing_outdated_is_no_plan():
    s = snap([A, B], [replica(1, A, 0, 2), replica(2, B, 0, 2)])
    assert rollout_of(s) is None
    assert plan_rollouts(s, plan_scaling(s, CFG, now=NOW), CFG, now=NOW)[1] == {}


def test_a_revision_with_the_same_template_is_not_outdated():
    # min_replicas changed (revision 2) but the recipe did not: nothing to replace.
    s = snap([A, B], [replica(1, A, 0, 1), replica(2, B, 0, 1)], templates={("llama", 1): OLD, ("llama", 2): OLD})
    assert rollout_of(s) is None


def test_unknown_revision_is_left_alone():
    s = snap([A, B], [replica(1, A, 0, None), replica(2, B, 0, None)])
    assert rollout_of(s) is None


def test_at_the_floor_it_surges_first_and_the_surge_is_a_scale_up():
    s = snap([A, B], [replica(1, A, 0, 1), replica(2, B, 0, 1)])
    plans, rollouts = plan_rollouts(s, plan_scaling(s, CFG, now=NOW), CFG, now=NOW)
    assert rollouts["llama"].surge and rollouts["llama"].drain is None
    assert (plans[0].scale_up, plans[0].scale_up_reason) == (1, "rollout")
    assert rollouts["llama"].progressing().reason == "rolling_out"


def test_it_waits_while_the_surge_loads():
    s = snap([A, B], [replica(1, A, 0, 1), replica(2, B, 0, 1), replica(3, A, 1, 2, state=NodeModel.State.LOADING)])
    plan = rollout_of(s)
    assert (plan.surge, plan.drain, plan.waiting) == (False, None, "replicas_loading")


def test_above_the_floor_with_a_current_replica_it_drains_the_least_busy_outdated_one():
    s = snap([A, B], [replica(1, A, 0, 1, in_flight=3), replica(2, B, 0, 1, in_flight=1), replica(3, A, 1, 2)])
    plan = rollout_of(s)
    assert plan.drain.id == 2 and not plan.surge


def test_a_draining_replica_is_stopped_when_idle_or_after_the_timeout_and_blocks_other_steps():
    busy = replica(1, A, 0, 1, in_flight=2, draining_since=NOW - timedelta(seconds=10))
    s = snap([A, B], [busy, replica(2, B, 0, 1), replica(3, A, 1, 2), replica(4, B, 1, 2)])
    plan = rollout_of(s)
    assert (plan.stop, plan.drain, plan.surge, plan.waiting) == ((), None, False, "draining")

    later = rollout_of(s, now=NOW + timedelta(seconds=60))
    assert later.stop == (busy,)

    idle = busy._replace(in_flight=0)
    assert rollout_of(snap([A, B], [idle, replica(2, B, 0, 1), replica(3, A, 1, 2)])).stop == (idle,)


def test_a_draining_replica_is_not_ready():
    s = snap([A], [replica(1, A, 0, 1, draining_since=NOW)], min_replicas=1)
    assert s.ready("llama") == ()


def test_without_capacity_it_drains_first_only_when_the_floor_allows():
    one_slot = [node("a", slots=1), node("b", slots=1)]
    a, b = one_slot
    at_floor = snap(one_slot, [replica(1, a, 0, 1), replica(2, b, 0, 1)], min_replicas=2)
    stalled = rollout_of(at_floor)
    assert (stalled.surge, stalled.drain, stalled.waiting) == (False, None, "no_capacity")
    assert stalled.progressing().reason == "rollout_stalled"

    above = snap(one_slot, [replica(1, a, 0, 1), replica(2, b, 0, 1)], min_replicas=1)
    assert rollout_of(above).drain is not None


def test_the_idle_scale_down_never_removes_the_surge_during_a_rollout():
    s = snap([A, B], [replica(1, A, 0, 1, in_flight=1), replica(2, B, 0, 1, in_flight=1), replica(3, A, 1, 2)])
    s = replace(s, replicas=tuple(r._replace(last_used=None) for r in s.replicas))
    scale = plan_model(s, s.configs["llama"], CFG, now=NOW + timedelta(hours=1))
    assert all(r.id != 3 for r in scale.remove)


def test_it_waits_while_the_scaling_plan_removes_replicas():
    idle = [replica(i, n, k, 1) for i, (n, k) in enumerate([(A, 0), (B, 0), (C, 0)], start=1)]
    s = snap([A, B, C], [r._replace(last_used=NOW - timedelta(hours=1)) for r in idle], min_replicas=1)
    plan = rollout_of(s)
    assert plan.waiting == "scaling"


@pytest.mark.parametrize(
    ("min_replicas", "replicas", "slots"),
    [(1, 1, 2), (2, 2, 2), (3, 3, 2), (2, 3, 2), (1, 3, 1), (0, 1, 1), (2, 2, 1)],
)
def test_simulated_rollout_replaces_every_replica_and_holds_the_floor_every_pass(min_replicas, replicas, slots):
    """Apply each pass's plan as the reconciler would (a surge loads by the next pass, a
    draining replica's requests finish by the pass after) until nothing is outdated."""
    nodes = [node(name, slots=slots) for name in ("a", "b", "c")]
    ids = iter(range(1, 1000))
    rows = []
    for i in range(replicas):
        on = nodes[i % len(nodes)]
        index = sum(1 for r in rows if r.node_id == on.id)
        rows.append(replica(next(ids), on, index, 1, in_flight=1, state=NodeModel.State.LOADED))
    floor = max(min_replicas, 1)
    now = NOW
    for _ in range(40):
        s = snap(nodes, rows, min_replicas=min_replicas)
        ready = s.ready("llama")
        assert len(ready) >= min(floor, replicas), f"below the floor: {rows}"
        if not s.rolling_out("llama") and not any(r.draining_since for r in rows):
            break
        scale = plan_model(s, s.configs["llama"], CFG, now=now)
        plan = plan_rollout(s, scale, CFG, now=now)
        # the pass applies: loads finish, scale-down, stops, drain, surge
        rows = [r._replace(state=NodeModel.State.LOADED) for r in rows]
        gone = {r.id for r in scale.remove} | {r.id for r in plan.stop}
        rows = [r for r in rows if r.id not in gone]
        rows = [r._replace(in_flight=0) if r.draining_since else r for r in rows]
        if plan.drain is not None:
            rows = [r._replace(draining_since=now) if r.id == plan.drain.id else r for r in rows]
        if plan.surge or scale.scale_up:
            for _ in range(plan.surge or scale.scale_up):
                on = next(n for n in nodes if sum(1 for r in rows if r.node_id == n.id) < n.slots)
                used = {r.replica_index for r in rows if r.node_id == on.id}
                index = min(set(range(on.slots)) - used)
                rows.append(replica(next(ids), on, index, 2, state=NodeModel.State.LOADING))
        now += timedelta(seconds=10)
    else:
        pytest.fail(f"rollout did not finish: {rows}")
    assert rows and all(r.revision == 2 for r in rows)
    assert len([r for r in rows if r.state == NodeModel.State.LOADED]) >= floor
