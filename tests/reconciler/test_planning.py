"""The pure planners, on hand-built snapshots: no database."""

import uuid
from datetime import UTC, datetime, timedelta

from reconciler.conf import ReconcileConfig
from reconciler.managers import ConditionState
from reconciler.models import ModelCondition
from reconciler.planning import (
    ScaleOutcome,
    WorkerBackend,
    model_condition_values,
    model_conditions,
    plan_checks,
    plan_model,
    plan_node_health,
    plan_observation,
    plan_scaling,
    plan_worker_reconciliation,
    transition_event_kind,
)
from reconciler.snapshot import ConfigView, NodeView, ReplicaView, Snapshot
from registry.models import Node, NodeModel

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CFG = ReconcileConfig.from_settings()
_ids = iter(range(1, 10_000))


def node(name, status=Node.Status.HEALTHY, *, heartbeat=NOW, slots=1, labels=None, **fields):
    return NodeView(
        id=uuid.uuid5(uuid.NAMESPACE_DNS, name),
        name=name,
        status=status,
        last_heartbeat=heartbeat,
        slots=slots,
        labels=labels or {},
        address=f"{name}:50051",
        **fields,
    )


def row(on, model="llama", index=0, *, state=NodeModel.State.LOADED, in_flight=0, last_used=None, **fields):
    return ReplicaView(
        id=next(_ids),
        node_id=on.id,
        model_name=model,
        replica_index=index,
        state=state,
        in_flight=in_flight,
        last_used=last_used,
        **fields,
    )


def snapshot(nodes=(), replicas=(), configs=(), load_info=("llama",)):
    return Snapshot(
        taken_at=NOW,
        nodes={n.id: n for n in nodes},
        replicas=tuple(replicas),
        configs={c.model_name: c for c in configs},
        load_info_models=frozenset(load_info),
    )


# --- node health --------------------------------------------------------------------------------


def observed(name, status=Node.Status.HEALTHY, *, seen_at=NOW, heartbeat=NOW - timedelta(hours=3), **fields):
    """A node the reconciler last saw heartbeating at ``seen_at`` (its own clock); the
    heartbeat's own timestamp (a web process's clock) is deliberately far off."""
    return node(name, status, heartbeat=heartbeat, heartbeat_seen=heartbeat, heartbeat_seen_at=seen_at, **fields)


def observe(nodes, *, previous_pass_at=NOW - timedelta(seconds=10), now=NOW):
    return plan_observation(snapshot(nodes), CFG, now=now, previous_pass_at=previous_pass_at)


def health(nodes, **kwargs):
    observation = observe(nodes, **kwargs)
    return plan_node_health(snapshot(nodes), CFG, now=kwargs.get("now", NOW), observation=observation)


def test_staleness_is_counted_from_the_reconcilers_own_observations():
    stale = observed("a", seen_at=NOW - timedelta(seconds=31))
    # Its web process's clock says the heartbeat is an hour in the future: irrelevant.
    stale_ahead = observed("b", seen_at=NOW - timedelta(seconds=31), heartbeat=NOW + timedelta(hours=1))
    never = node("c", heartbeat=None, heartbeat_seen_at=NOW - timedelta(seconds=5))
    # A heartbeat stamped an hour ago by a slow clock, but new to the reconciler: fresh.
    changed = node(
        "d",
        heartbeat=NOW - timedelta(hours=1),
        heartbeat_seen=NOW - timedelta(hours=2),
        heartbeat_seen_at=NOW - timedelta(minutes=5),
    )
    back = node(
        "e",
        Node.Status.OFFLINE,
        heartbeat=NOW,
        heartbeat_seen=NOW - timedelta(seconds=40),
        heartbeat_seen_at=NOW - timedelta(seconds=40),
    )
    still_offline = observed("f", Node.Status.OFFLINE, seen_at=NOW - timedelta(hours=1))
    fine = [observed(f"ok-{i}", seen_at=NOW - timedelta(seconds=29)) for i in range(4)]
    plan = health([stale, stale_ahead, never, changed, back, still_offline, *fine])

    assert plan.guard is False and plan.silent is False
    assert {n.name for n in plan.mark_offline} == {"a", "b", "c"}
    assert [n.name for n in plan.mark_healthy] == ["e"]


def test_a_first_sight_of_an_offline_nodes_heartbeat_does_not_recover_it():
    """Nodes never observed (the first pass after an upgrade) are stamped, not recovered: a dead
    node's old heartbeat must not bring it back."""
    offline = node("a", Node.Status.OFFLINE, heartbeat=NOW - timedelta(hours=1))
    plan = health([offline, observed("b")])

    assert plan.mark_healthy == ()


def test_observation_gap_restarts_counting_for_every_node():
    nodes = [observed("a", seen_at=NOW - timedelta(minutes=5)), observed("b", seen_at=NOW - timedelta(minutes=5))]
    nodes.append(
        node(
            "c", heartbeat=NOW, heartbeat_seen=NOW - timedelta(seconds=2), heartbeat_seen_at=NOW - timedelta(minutes=5)
        )
    )

    after_outage = observe(nodes, previous_pass_at=NOW - timedelta(minutes=5))
    assert after_outage.restart is True
    assert health(nodes, previous_pass_at=NOW - timedelta(minutes=5)).mark_offline == ()

    # Passes kept running but no heartbeat changed for longer than the gap, then one did.
    resumed = observe(nodes, previous_pass_at=NOW - timedelta(seconds=1))
    assert (resumed.restart, resumed.silent) == (True, False)
    assert health(nodes, previous_pass_at=NOW - timedelta(seconds=1)).mark_offline == ()


def test_silent_ingestion_reaps_nothing_but_a_lone_node_is_still_reaped():
    quiet = [observed(f"s{i}", seen_at=NOW - timedelta(seconds=40 + i)) for i in range(3)]
    silent = health(quiet, previous_pass_at=NOW - timedelta(seconds=1))

    assert (silent.silent, silent.mark_offline) == (True, ())
    assert silent.guard_condition().reason == "heartbeat_ingestion_silent"
    assert len(silent.stale) == 3

    lone = health([quiet[0]], previous_pass_at=NOW - timedelta(seconds=1))
    assert lone.silent is False and [n.name for n in lone.mark_offline] == ["s0"]


def test_a_live_fleet_is_never_silent_and_never_restarts():
    # Heartbeats seen one interval ago, the previous pass one interval ago: a normal pass.
    nodes = [observed(f"n{i}", seen_at=NOW - timedelta(seconds=10)) for i in range(3)]
    plan = observe(nodes)

    assert (plan.restart, plan.silent, plan.changed) == (False, False, frozenset())


def test_guard_needs_more_than_the_fraction_and_at_least_two_nodes():
    old = NOW - timedelta(seconds=31)

    def guard(stale, fresh):
        nodes = [observed(f"s{i}", seen_at=old) for i in range(stale)] + [observed(f"f{i}") for i in range(fresh)]
        return health(nodes).guard

    assert guard(2, 0) is True
    assert guard(3, 2) is True
    assert guard(2, 2) is False  # exactly half
    assert guard(1, 0) is False  # a lone node
    assert guard(1, 1) is False


def test_guard_counts_only_healthy_nodes_and_reaps_none():
    old = NOW - timedelta(minutes=5)
    nodes = [
        observed("s1", seen_at=old),
        observed("s2", seen_at=old),
        observed("fresh"),
        observed("drain", Node.Status.DRAINING, seen_at=old),
        observed("off", Node.Status.OFFLINE, seen_at=old),
        observed("pend", Node.Status.PENDING, seen_at=old),
    ]
    plan = health(nodes)

    assert plan.guard is True and plan.swept == 3
    assert plan.mark_offline == ()
    assert plan.guard_condition().status is True


# --- checks ------------------------------------------------------------------------------


def test_checks_probe_old_loaded_rows_with_an_address_on_healthy_nodes():
    a, sick = node("a"), node("sick", Node.Status.UNHEALTHY)
    old = NOW - timedelta(seconds=11)
    due = row(a, address="x:1", last_probe_at=old)
    never = row(a, index=1, address="x:2")
    rows = [
        due,
        never,
        row(a, index=2, address="x:3", last_probe_at=NOW - timedelta(seconds=2)),  # recent
        row(a, index=3, last_probe_at=old),  # no address
        row(a, index=4, address="x:5", state=NodeModel.State.LOADING, last_probe_at=old),
        row(sick, address="x:6", last_probe_at=old),
    ]
    plan = plan_checks(snapshot([a, sick], rows), CFG, now=NOW)

    assert set(plan.probes) == {due, never}
    # The unhealthy node's worker is still asked: its first answer makes it healthy again.
    assert plan.listings == (a, sick)


def test_worker_reconciliation():
    a = node("a")
    before = NOW - timedelta(seconds=1)
    rows = [
        row(a, index=0, state_changed_at=before),
        row(a, index=1, state_changed_at=before),
        row(a, index=2, state_changed_at=NOW),  # loaded after the snapshot: judged next pass
        row(a, index=3, state_changed_at=NOW),  # re-recorded after the snapshot
        row(a, "phi", 0, state=NodeModel.State.LOADING),
    ]
    # What the snapshot read before the listing: rows 0 and 1 loaded, row 2 still loading (absent
    # from the map), row 3 loaded by an earlier state change.
    loaded_before_listing = {rows[0].id: before, rows[1].id: before, rows[3].id: before}
    reported = [
        WorkerBackend("llama", 0, "RUNNING"),
        WorkerBackend("llama", 1, "EXITED"),
        WorkerBackend("phi", 0, "RUNNING"),
        WorkerBackend("qwen", 3, "RUNNING"),
    ]
    plan = plan_worker_reconciliation(rows, reported, loaded_before_listing=loaded_before_listing)

    assert [r.replica_index for r in plan.remove] == [1]
    assert plan.stop == (WorkerBackend("qwen", 3, "RUNNING"),)


# --- scaling -----------------------------------------------------------------------------


def test_below_the_floor_scales_by_min_of_needed_and_capacity():
    a, b = node("a", slots=2), node("b", slots=1)
    plan = plan_model(snapshot([a, b]), ConfigView("llama", min_replicas=5), CFG, now=NOW)

    assert (plan.scale_up, plan.scale_up_reason, plan.capacity) == (3, "below_min", 3)
    assert plan.candidate_ids == (a.id, b.id)


def test_zero_capacity_records_unsatisfiable_instead():
    a = node("a")
    plan = plan_model(snapshot([a], [row(a)]), ConfigView("llama", min_replicas=2), CFG, now=NOW)

    assert plan.scale_up == 0
    assert plan.record_unsatisfiable and plan.skipped == "no_capacity"


def test_no_load_info_never_plans_a_scale_up():
    plan = plan_model(snapshot([node("a")], load_info=()), ConfigView("llama", min_replicas=1), CFG, now=NOW)

    assert plan.scale_up == 0 and plan.skipped == "no_load_info"


def test_cooldown_gates_everything_and_its_end_is_noticed():
    config = ConfigView("llama", min_replicas=1, unsatisfiable_until=NOW + timedelta(seconds=1))
    gated = plan_model(snapshot([node("a")]), config, CFG, now=NOW)
    over = plan_model(snapshot([node("a")]), config, CFG, now=NOW + timedelta(seconds=1))

    assert gated.in_cooldown and gated.scale_up == 0
    assert over.cooldown_over and over.scale_up == 1


def test_busy_scale_up_respects_the_ceiling_and_in_progress_loads():
    a = node("a", slots=4)
    busy = [row(a, index=i, in_flight=1) for i in range(2)]
    config = ConfigView("llama", min_replicas=1, max_replicas=3)

    assert plan_model(snapshot([a], busy), config, CFG, now=NOW).scale_up == 1
    at_max = [*busy, row(a, index=2, in_flight=1)]
    assert plan_model(snapshot([a], at_max), config, CFG, now=NOW).scale_up == 0
    loading = [*busy, row(a, index=2, state=NodeModel.State.LOADING)]
    assert plan_model(snapshot([a], loading), config, CFG, now=NOW).scale_up == 0
    unlimited = ConfigView("llama", min_replicas=1, max_replicas=0)
    assert plan_model(snapshot([a], busy), unlimited, CFG, now=NOW).scale_up == 1


def test_scale_down_order_and_floor():
    a, b = node("a", slots=3), node("b", slots=3)
    idle = NOW - timedelta(minutes=10)
    rows = [
        row(a, index=0, last_used=idle),
        row(a, index=1, last_used=idle - timedelta(minutes=1)),
        row(b, index=1, last_used=idle),
        row(b, index=2, last_used=NOW),  # used just now: not idle
    ]
    plan = plan_model(snapshot([a, b], rows), ConfigView("llama", min_replicas=2), CFG, now=NOW)

    # 4 ready, floor 2: the two idle ones with the highest index; at equal index, oldest use first
    assert [(r.node_id, r.replica_index) for r in plan.remove] == [(a.id, 1), (b.id, 1)]


# --- conditions ------------------------------------------------------------------------------


def test_conditions_for_a_model_in_cooldown():
    config = ConfigView("llama", min_replicas=2, unsatisfiable_until=NOW + timedelta(minutes=1))
    snap = snapshot([node("a")], configs=[config], load_info=())
    plan = plan_model(snap, config, CFG, now=NOW)
    states = {s.type: s for s in model_conditions(snap, "llama", plan, ScaleOutcome(), now=NOW)}

    Type = ModelCondition.Type
    assert (states[Type.AVAILABLE].status, states[Type.AVAILABLE].reason) == (False, "below_minimum")
    assert (states[Type.UNSATISFIABLE].status, states[Type.UNSATISFIABLE].reason) == (True, "no_capacity")
    assert (states[Type.PROGRESSING].status, states[Type.PROGRESSING].reason) == (False, "cooldown")
    assert (states[Type.NO_LOAD_INFO].status, states[Type.NO_LOAD_INFO].reason) == (True, "no_load_info")


def test_transition_events_skip_new_conditions_in_their_normal_state():
    Type = ModelCondition.Type
    assert transition_event_kind(Type.NO_LOAD_INFO, False, is_new=True) is None
    assert transition_event_kind(Type.NO_LOAD_INFO, True, is_new=True) == "no_load_info"
    assert transition_event_kind(Type.NO_LOAD_INFO, False, is_new=False) == "load_info_found"
    assert transition_event_kind(Type.PROGRESSING, True, is_new=False) is None


def test_memoised_condition_values_equal_the_ones_computed_per_model():
    """A pass computes the conditions once per distinct set of facts (``memo``): every model
    of a varied fleet must get exactly what it gets computed on its own."""
    a, b = node("a", slots=2), node("b", slots=1, labels={"gpu": "h100"})
    soon = NOW + timedelta(minutes=1)
    configs = [
        ConfigView("steady", min_replicas=1),
        ConfigView("steady-2", min_replicas=1),
        ConfigView("floor-2", min_replicas=2),
        ConfigView("ceiling", min_replicas=1, max_replicas=1),
        ConfigView("cooling", min_replicas=1, unsatisfiable_until=soon),
        ConfigView("cooling-longer", min_replicas=1, unsatisfiable_until=soon + timedelta(minutes=1)),
        ConfigView("cooled", min_replicas=1, unsatisfiable_until=NOW - timedelta(seconds=1)),
        ConfigView("labelled", min_replicas=3, node_selector={"gpu": "h100"}),
        ConfigView("full", min_replicas=5),
        ConfigView("recipe-less", min_replicas=1),
        ConfigView("manual"),
    ]
    rows = [
        row(a, "steady"),
        row(b, "steady-2"),
        row(a, "floor-2"),
        row(a, "ceiling"),
        row(a, "labelled", state=NodeModel.State.LOADING),
        row(b, "unconfigured"),
        row(a, "manual", index=0),
        row(b, "manual", index=1),
    ]
    names = [config.model_name for config in configs if config.model_name != "recipe-less"] + ["unconfigured"]
    snap = snapshot([a, b], rows, configs=configs, load_info=names)
    plans = {plan.model_name: plan for plan in plan_scaling(snap, CFG, now=NOW)}
    outcomes = {"full": ScaleOutcome(added=1), "floor-2": ScaleOutcome(failed="LoadModel: boom")}

    memo = {}
    for name in snap.model_names:
        plan, outcome = plans.get(name), outcomes.get(name)
        memoised = model_condition_values(snap, name, plan, outcome, memo=memo)
        assert memoised == model_condition_values(snap, name, plan, outcome), name
        assert [ConditionState(name, type_, *value) for type_, value in memoised] == model_conditions(
            snap, name, plan, outcome, now=NOW
        )
    assert 0 < len(memo) < len(snap.model_names)  # shared, yet told apart
    by_type = dict(model_condition_values(snap, "labelled", plans["labelled"], None, memo=memo))
    assert by_type[ModelCondition.Type.PROGRESSING].reason == "replicas_loading"
    assert dict(model_condition_values(snap, "cooling", plans["cooling"], None, memo=memo))[
        ModelCondition.Type.UNSATISFIABLE
    ].status
