"""Load-aware autoscaling in the pure planner (plan_model with a load target): no database."""

from datetime import timedelta

from reconciler.planning import plan_model
from reconciler.snapshot import ConfigView
from tests.reconciler.test_planning import CFG, NOW, node, row, snapshot


def config(**fields):
    fields.setdefault("target", 4)
    fields.setdefault("upscale_delay_s", 30)
    fields.setdefault("downscale_delay_s", 600)
    return ConfigView("llama", **fields)


def nodes(count, slots=4):
    return [node(f"n{i}", slots=slots) for i in range(count)]


def test_sustained_load_scales_up_to_ceil_of_load_over_target_after_the_delay():
    fleet = nodes(4)
    busy = [row(fleet[0], index=0, in_flight=12)]  # 12 in flight, target 4 -> 3 replicas
    cfg = config(min_replicas=1, max_replicas=8)
    first = plan_model(snapshot(fleet, busy, [cfg]), cfg, CFG, now=NOW)
    assert first.load.desired == 3 and first.load.reason == "up_pending" and first.scale_up == 0
    held = cfg._replace(
        load_avg=first.load.average, load_sampled_at=NOW, desired_replicas=3, desired_since=first.load.since
    )
    later = NOW + timedelta(seconds=30)
    second = plan_model(snapshot(fleet, busy, [held]), held, CFG, now=later)
    assert second.load.reason == "scale_up"
    assert second.scale_up == 2 and second.scale_up_reason == "load"
    assert second.load.message == "in-flight 12.0 avg over 60s, target 4 -> 3 replicas"


def test_ceiling_clamps_the_scale_up():
    fleet = nodes(4)
    cfg = config(min_replicas=1, max_replicas=2, upscale_delay_s=0)
    plan = plan_model(snapshot(fleet, [row(fleet[0], in_flight=40)], [cfg]), cfg, CFG, now=NOW)
    assert plan.load.desired == 2 and plan.scale_up == 1


def test_scale_down_removes_idle_replicas_only_after_the_delay():
    fleet = nodes(3)
    replicas = [row(fleet[0], index=0, in_flight=2), row(fleet[1], index=1), row(fleet[2], index=2)]
    cfg = config(min_replicas=1, desired_replicas=1, desired_since=NOW - timedelta(seconds=599))
    cfg = cfg._replace(load_avg=2.0, load_sampled_at=NOW - timedelta(seconds=10), load_busy_at=NOW)
    early = plan_model(snapshot(fleet, replicas, [cfg]), cfg, CFG, now=NOW)
    assert early.load.reason == "down_pending" and early.remove == ()
    due = plan_model(snapshot(fleet, replicas, [cfg]), cfg, CFG, now=NOW + timedelta(seconds=1))
    assert due.load.reason == "scale_down"
    assert sorted(r.replica_index for r in due.remove) == [1, 2]  # the busy one stays


def test_min_zero_goes_to_zero_after_the_downscale_delay():
    fleet = nodes(1)
    idle = [row(fleet[0], in_flight=0)]
    cfg = config(min_replicas=0, max_replicas=4, desired_replicas=0, desired_since=NOW - timedelta(seconds=600))
    plan = plan_model(snapshot(fleet, idle, [cfg]), cfg, CFG, now=NOW)
    assert plan.load.desired == 0 and len(plan.remove) == 1


def test_a_model_at_zero_with_waiting_requests_wakes_sized_and_without_delay():
    fleet = nodes(2, slots=4)
    # The route that found no replica started a load job: one row loading, 40 routes counted.
    loading = [row(fleet[0], state="loading")]
    cfg = config(min_replicas=0, target=8, waiting_at_zero=40)
    plan = plan_model(snapshot(fleet, loading, [cfg]), cfg, CFG, now=NOW)
    assert plan.load.desired == 5 and plan.load.reason == "scale_up"
    assert plan.scale_up == 4  # 5 wanted, 1 already loading
    assert plan.load.waiting == 40
    assert plan.load.average == 40.0  # the demand enters the average: the next pass still asks for 5


def test_the_demand_at_zero_still_sizes_the_wake_up_once_the_first_replica_is_ready():
    # The load job finished before the pass: its replica serves, the 40 routes are still
    # the demand that arrived at zero (routes count themselves only when nothing is ready).
    fleet = nodes(2, slots=4)
    ready = [row(fleet[0], in_flight=0)]
    cfg = config(min_replicas=0, target=8, waiting_at_zero=40, desired_replicas=0, desired_since=NOW)
    plan = plan_model(snapshot(fleet, ready, [cfg]), cfg, CFG, now=NOW)
    assert plan.load.desired == 5 and plan.load.reason == "scale_up" and plan.scale_up == 4


def test_model_without_target_keeps_the_old_rules():
    fleet = nodes(1)
    cfg = ConfigView("llama", min_replicas=1)
    plan = plan_model(snapshot(fleet, [row(fleet[0], in_flight=50)], [cfg]), cfg, CFG, now=NOW)
    assert plan.load is None
