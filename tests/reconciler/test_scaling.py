"""Scaling per autoscaled model: floor, busy +1, idle scale-down, selector, capacity, breaker."""

from datetime import timedelta

import pytest

from reconciler.models import Event, ModelCondition
from registry.models import ModelSchedulingConfig, Node, NodeLabel, NodeModel
from tests.factories import make_node, make_replica, make_scheduling

pytestmark = pytest.mark.django_db

Type = ModelCondition.Type


@pytest.fixture
def reconcile(reconcile):
    """These tests are about scaling: every node heartbeats right before each pass."""

    def run(at=None, **overrides):
        return reconcile(at, heartbeat=True, **overrides)

    return run


def condition(model_name, type_):
    return ModelCondition.objects.get(model_name=model_name, type=type_)


def kinds(model_name=None):
    events = Event.objects.order_by("id")
    if model_name is not None:
        events = events.filter(model_name=model_name)
    return list(events.values_list("kind", flat=True))


# --- LocalAI's restart bug, end to end -----------------------------------------------------------


def test_seed_scenario_one_pass_asks_the_scheduler_for_both_replicas_after_every_row_was_removed(
    now, reconcile, scheduler, load_info
):
    earlier = now - timedelta(minutes=5)
    a = make_node(name="gpu-a", now=earlier)
    b = make_node(name="gpu-b", now=earlier)
    make_scheduling("llama", min_replicas=2)
    make_replica(a, "llama", 0)
    make_replica(b, "llama", 0)
    load_info("llama")
    # A frontend restart: nobody received heartbeats, the health monitor marked both offline
    # (LocalAI's path), which removed every replica row.
    for node in (a, b):
        assert Node.objects.mark_offline(node.pk, expected_heartbeat=earlier, now=now)
    assert not NodeModel.objects.exists()
    # The workers heartbeat again.
    reconcile(at=now - timedelta(seconds=10))  # the reconciler has watched the fleet before
    for node in (a, b):
        Node.objects.heartbeat(node.pk, now=now)

    summary = reconcile()

    assert scheduler.calls == [("llama", [a.pk, b.pk]), ("llama", [a.pk, b.pk])]
    assert summary.actions["nodes_recovered"] == 2
    assert summary.actions["replicas_added"] == 2
    assert NodeModel.objects.ready().filter(model_name="llama").count() == 2
    assert condition("llama", Type.NO_LOAD_INFO).status is False


def test_seed_scenario_without_load_info_shows_no_load_info_and_never_calls_the_scheduler(now, reconcile, scheduler):
    make_node(name="gpu-a", now=now)
    make_node(name="gpu-b", now=now)
    make_scheduling("llama", min_replicas=2)

    summary = reconcile()
    reconcile(at=now + timedelta(seconds=10))
    reconcile(at=now + timedelta(seconds=20))

    assert scheduler.calls == []
    assert summary.skipped["no_load_info"] == 1
    no_load_info = condition("llama", Type.NO_LOAD_INFO)
    assert (no_load_info.status, no_load_info.reason) == (True, "no_load_info")
    assert no_load_info.since == now  # not moved by the later passes
    assert condition("llama", Type.PROGRESSING).reason == "no_load_info"
    assert kinds("llama").count(Event.Kind.NO_LOAD_INFO) == 1  # once per state change


def test_load_info_arriving_clears_no_load_info_and_scales_up(now, reconcile, scheduler, load_info):
    make_node(name="gpu-a", now=now)
    make_scheduling("llama", min_replicas=1)
    reconcile()
    load_info("llama")

    reconcile()

    assert scheduler.models == ["llama"]
    assert condition("llama", Type.NO_LOAD_INFO).status is False
    assert kinds("llama").count(Event.Kind.LOAD_INFO_FOUND) == 1


def test_legacy_replica_blob_counts_as_load_info(now, reconcile, scheduler):
    a = make_node(name="gpu-a", now=now, slots=2)
    make_scheduling("llama", min_replicas=2)
    make_replica(a, "llama", 0, model_opts_blob=b"legacy", backend_type="llama-cpp")

    reconcile()

    assert scheduler.models == ["llama"]


# --- floor, ceiling, capacity -----------------------------------------------------------------


def test_scales_up_to_min_replicas_and_a_second_pass_adds_nothing(now, reconcile, scheduler, load_info):
    nodes = [make_node(name=f"gpu-{i}", now=now) for i in range(3)]
    make_scheduling("llama", min_replicas=3)
    load_info("llama")

    first = reconcile()
    second = reconcile()

    assert first.actions["replicas_added"] == 3
    assert len(scheduler.calls) == 3
    assert scheduler.calls[0][1] == [n.pk for n in nodes]
    assert "replicas_added" not in second.actions
    assert condition("llama", Type.AVAILABLE).status is True


def test_loading_rows_count_toward_the_floor(now, reconcile, scheduler, load_info):
    a = make_node(name="gpu-a", now=now, slots=2)
    make_scheduling("llama", min_replicas=2)
    load_info("llama")
    make_replica(a, "llama", 0, state=NodeModel.State.LOADING)

    reconcile()

    assert len(scheduler.calls) == 1
    assert condition("llama", Type.PROGRESSING).status is True


def test_scale_up_is_capped_by_cluster_capacity(now, reconcile, scheduler, load_info):
    make_node(name="gpu-a", now=now, slots=2)
    make_scheduling("llama", min_replicas=5)
    load_info("llama")

    summary = reconcile()

    assert len(scheduler.calls) == 2
    assert summary.actions["replicas_added"] == 2


def test_capacity_is_summed_over_candidates_only(now, reconcile, scheduler, load_info):
    scheduler.place = False  # count the calls only
    a = make_node(name="gpu-a", now=now, slots=3, labels={"zone": "a"})
    b = make_node(name="gpu-b", now=now, slots=2, labels={"zone": "a"})
    make_node(name="gpu-c", now=now, slots=8, labels={"zone": "b"})  # selector mismatch
    make_node(name="gpu-d", now=now, slots=8, labels={"zone": "a"}, status=Node.Status.DRAINING)
    make_node(name="gpu-e", now=now, slots=8, labels={"zone": "a"}, node_type=Node.NodeType.AGENT)
    make_scheduling("llama", min_replicas=10, node_selector={"zone": "a"})
    load_info("llama")
    make_replica(a, "llama", 0)
    make_replica(a, "llama", 1, state=NodeModel.State.LOADING)  # rows in any state use a slot

    reconcile()

    # free: a 3-2=1, b 2 -> 3, although 8 more replicas are wanted
    assert len(scheduler.calls) == 3
    assert {tuple(ids) for _, ids in scheduler.calls} == {(a.pk, b.pk)}


def test_selector_passes_only_matching_healthy_node_ids(now, reconcile, scheduler, load_info):
    make_node(name="gpu-a", now=now, labels={"zone": "a"})
    b = make_node(name="gpu-b", now=now, labels={"zone": "b", "tier": "gold"})
    make_node(name="gpu-c", now=now, labels={"zone": "b"})
    make_scheduling("llama", min_replicas=1, node_selector={"zone": "b", "tier": "gold"})
    load_info("llama")

    reconcile()

    assert scheduler.calls == [("llama", [b.pk])]


def test_scale_up_stops_at_the_first_failure_and_records_it(now, reconcile, scheduler, load_info):
    for i in range(3):
        make_node(name=f"gpu-{i}", now=now)
    make_scheduling("llama", min_replicas=3)
    load_info("llama")
    scheduler.fail_after = 1

    summary = reconcile()

    assert len(scheduler.calls) == 2
    assert summary.actions["replicas_added"] == 1
    assert summary.actions["scale_up_failed"] == 1
    failed = Event.objects.get(kind=Event.Kind.SCALE_UP_FAILED)
    assert "out of memory" in failed.message
    progressing = condition("llama", Type.PROGRESSING)
    assert (progressing.status, progressing.reason) == (False, "scale_up_failed")


def test_a_persisting_scale_up_failure_is_one_event_not_one_per_pass(now, reconcile, scheduler, load_info):
    make_node(name="gpu-a", now=now)
    make_scheduling("llama", min_replicas=1)
    load_info("llama")
    scheduler.fail_after = 0

    summaries = [reconcile(at=now + timedelta(seconds=10 * i)) for i in range(3)]
    scheduler.error = RuntimeError("another reason")
    reconcile(at=now + timedelta(seconds=30))

    assert len(scheduler.calls) == 4  # retried every pass
    assert [s.actions["scale_up_failed"] for s in summaries] == [1, 1, 1]
    failures = Event.objects.filter(kind=Event.Kind.SCALE_UP_FAILED).order_by("id")
    messages = list(failures.values_list("message", flat=True))
    assert messages == ["RuntimeError: load failed: out of memory", "RuntimeError: another reason"]


def test_models_without_autoscaling_are_not_scaled_but_get_conditions(now, reconcile, scheduler, load_info):
    a = make_node(name="gpu-a", now=now)
    make_replica(a, "phi", 0)
    make_scheduling("idle-model")  # min = max = 0
    load_info("phi")

    reconcile()

    assert scheduler.calls == []
    assert condition("phi", Type.AVAILABLE).status is True
    assert condition("idle-model", Type.AVAILABLE).status is False


# --- busy +1 ------------------------------------------------------------------------------------


def test_all_replicas_busy_adds_one_up_to_max_and_not_past_it(now, reconcile, scheduler, load_info):
    a = make_node(name="gpu-a", now=now, slots=4)
    make_scheduling("llama", min_replicas=1, max_replicas=2)
    load_info("llama")
    make_replica(a, "llama", 0, in_flight=2)

    reconcile()
    assert len(scheduler.calls) == 1
    for idle in NodeModel.objects.filter(model_name="llama", in_flight=0):
        NodeModel.objects.increment_in_flight(idle.pk)  # the new one is busy too

    reconcile()

    assert len(scheduler.calls) == 1  # at max_replicas
    assert NodeModel.objects.filter(model_name="llama").count() == 2


def test_one_idle_replica_means_no_busy_scale_up(now, reconcile, scheduler, load_info):
    a = make_node(name="gpu-a", now=now, slots=4)
    make_scheduling("llama", min_replicas=1, max_replicas=4)
    load_info("llama")
    make_replica(a, "llama", 0, in_flight=3)
    make_replica(a, "llama", 1, in_flight=0)

    reconcile()

    assert scheduler.calls == []


# --- idle scale-down ------------------------------------------------------------------------------


def test_idle_replicas_above_the_floor_are_removed_highest_index_first_after_the_delay(
    now, reconcile, scheduler, prober, load_info
):
    a = make_node(name="gpu-a", now=now, slots=4)
    make_scheduling("llama", min_replicas=2, max_replicas=4)
    load_info("llama")
    for index in range(4):
        make_replica(a, "llama", index, last_used=now - timedelta(minutes=1))

    reconcile()
    assert NodeModel.objects.count() == 4  # not idle for 5 minutes yet

    later = now + timedelta(minutes=5)
    summary = reconcile(at=later)

    assert summary.actions["replicas_scaled_down"] == 2
    assert sorted(NodeModel.objects.values_list("replica_index", flat=True)) == [0, 1]  # the floor stays
    assert [(model, index) for _, model, index, _ in prober.stopped] == [("llama", 3), ("llama", 2)]
    assert prober.stopped[0][3] == str(a.pk)
    assert kinds("llama").count(Event.Kind.REPLICA_REMOVED) == 2

    reconcile(at=later + timedelta(hours=1))
    assert NodeModel.objects.count() == 2  # never below the floor


def test_scale_down_with_min_zero_keeps_one_replica_and_never_removes_busy_ones(now, reconcile, load_info):
    a = make_node(name="gpu-a", now=now, slots=3)
    old = now - timedelta(hours=1)
    for model in ("idle", "mixed"):
        make_scheduling(model, min_replicas=0, max_replicas=3)
        load_info(model)
        make_replica(a, model, 0, last_used=old)
        make_replica(a, model, 1, last_used=old)
    make_replica(a, "mixed", 2, last_used=old, in_flight=1)  # busy: never removed

    reconcile()

    assert list(NodeModel.objects.filter(model_name="idle").values_list("replica_index", flat=True)) == [0]
    assert list(NodeModel.objects.filter(model_name="mixed").values_list("replica_index", flat=True)) == [2]


def test_replicas_above_a_lowered_max_go_once_nothing_is_in_flight(now, reconcile, load_info):
    a = make_node(name="gpu-a", now=now, slots=3)
    make_scheduling("llama", min_replicas=1, max_replicas=1)
    load_info("llama")
    for index in range(3):
        make_replica(a, "llama", index, last_used=now)  # used just now

    reconcile()

    assert list(NodeModel.objects.values_list("replica_index", flat=True)) == [0]


def test_a_failed_stop_after_scale_down_is_best_effort(now, reconcile, prober, load_info):
    a = make_node(name="gpu-a", now=now, slots=2)
    make_scheduling("llama", min_replicas=1, max_replicas=2)
    load_info("llama")
    make_replica(a, "llama", 0, last_used=now - timedelta(hours=1))
    make_replica(a, "llama", 1, last_used=now - timedelta(hours=1))
    prober.stop_error = RuntimeError("worker gone")

    summary = reconcile()

    assert summary.outcome == "ok"
    assert NodeModel.objects.count() == 1
    assert "worker gone" in Event.objects.get(kind=Event.Kind.REPLICA_REMOVED).details["stop_error"]


# --- circuit breaker ---------------------------------------------------------------------------


def _no_capacity(now):
    """min 2 on a one-slot node that already holds one replica: capacity 0."""
    a = make_node(name="gpu-a", now=now, slots=1)
    make_scheduling("llama", min_replicas=2)
    make_replica(a, "llama", 0)
    return a


def _passes(reconcile, now, count, start=0):
    return [reconcile(at=now + timedelta(seconds=10 * (start + i))) for i in range(count)]


def test_breaker_trips_after_three_passes_without_capacity(now, reconcile, scheduler, load_info):
    _no_capacity(now)
    load_info("llama")

    summaries = _passes(reconcile, now, 3)

    assert scheduler.calls == []
    assert [s.actions.get("cooldowns_entered", 0) for s in summaries] == [0, 0, 1]
    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert config.unsatisfiable_until == now + timedelta(seconds=20) + timedelta(minutes=5)
    unsatisfiable = condition("llama", Type.UNSATISFIABLE)
    assert (unsatisfiable.status, unsatisfiable.reason) == (True, "no_capacity")
    assert kinds("llama").count(Event.Kind.COOLDOWN_ENTERED) == 1

    gated = reconcile(at=now + timedelta(seconds=30))
    assert gated.skipped["cooldown"] == 1
    assert ModelSchedulingConfig.objects.get(model_name="llama").unsatisfiable_ticks == 0


def test_breaker_clears_when_a_node_registers(now, reconcile, scheduler, load_info):
    _no_capacity(now)
    load_info("llama")
    _passes(reconcile, now, 3)

    b = make_node(name="gpu-b", now=now + timedelta(seconds=30))  # register clears cooldowns
    reconcile(at=now + timedelta(seconds=30))

    assert scheduler.calls and scheduler.calls[0][1][-1] == b.pk
    assert condition("llama", Type.UNSATISFIABLE).status is False


def test_breaker_clears_when_labels_change(now, reconcile, scheduler, load_info):
    make_node(name="gpu-a", now=now)
    b = make_node(name="gpu-b", now=now)
    make_scheduling("llama", min_replicas=1, node_selector={"zone": "b"})
    load_info("llama")
    _passes(reconcile, now, 3)
    assert ModelSchedulingConfig.objects.get(model_name="llama").unsatisfiable_until is not None

    NodeLabel.objects.merge(b.pk, {"zone": "b"})
    reconcile(at=now + timedelta(seconds=30))

    assert scheduler.calls == [("llama", [b.pk])]


def test_cooldown_end_is_recorded_once_and_counting_restarts(now, reconcile, scheduler, load_info):
    _no_capacity(now)
    load_info("llama")
    _passes(reconcile, now, 3)

    after = now + timedelta(minutes=6)
    first = reconcile(at=after)
    reconcile(at=after + timedelta(seconds=10))

    assert first.actions["cooldowns_left"] == 1
    assert kinds("llama").count(Event.Kind.COOLDOWN_LEFT) == 1
    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (config.unsatisfiable_until, config.unsatisfiable_ticks) == (None, 2)


def test_capacity_again_resets_the_consecutive_count(now, reconcile, scheduler, load_info):
    a = _no_capacity(now)
    load_info("llama")
    _passes(reconcile, now, 2)
    # Its replica went away (as a reaped unreachable one does): a free slot, and no capacity
    # event to clear the count: only the next pass's placement can reset it.
    assert NodeModel.objects.remove_replica(a.pk, "llama", 0)

    reconcile(at=now + timedelta(seconds=20))

    assert ModelSchedulingConfig.objects.get(model_name="llama").unsatisfiable_ticks == 0
    assert len(scheduler.calls) == 1


# --- conditions ------------------------------------------------------------------------------


def test_available_condition_follows_ready_replicas_and_records_transitions(now, reconcile, load_info):
    a = make_node(name="gpu-a", now=now)
    make_scheduling("llama", min_replicas=1)
    load_info("llama")
    reconcile()  # the fake scheduler places one replica
    assert condition("llama", Type.AVAILABLE).status is True

    Node.objects.mark_draining(a.pk, by=Node.DrainedBy.OPERATOR)  # rows kept, but not ready
    reconcile()

    available = condition("llama", Type.AVAILABLE)
    assert (available.status, available.reason) == (False, "below_minimum")
    assert kinds("llama")[-1] == Event.Kind.MODEL_UNAVAILABLE


def test_conditions_of_forgotten_models_are_removed(now, reconcile):
    make_scheduling("gone", min_replicas=1)
    reconcile()
    assert ModelCondition.objects.filter(model_name="gone").exists()

    ModelSchedulingConfig.objects.filter(model_name="gone").delete()
    reconcile()

    assert not ModelCondition.objects.filter(model_name="gone").exists()
