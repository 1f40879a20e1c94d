"""Pure placement: choosing a node, choosing an eviction victim, failed-load backoff. No
database, no network."""

from datetime import UTC, datetime, timedelta

import pytest

from registry import placement, rules
from registry.placement import NodeCandidate, ReplicaInfo, choose_node, choose_victim

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
GIB = 1024**3


def node(name, *, slots=1, rows=0, free=24 * GIB, in_flight=0, backoff=None, replicas=0):
    return NodeCandidate(
        node_id=name,
        name=name,
        slots=slots,
        model_rows=rows,
        free_vram=free,
        in_flight_total=in_flight,
        replica_count=replicas,
        failure_backoff_until=backoff,
    )


def pick(*candidates, needed=0, strategy=placement.SPREAD):
    return choose_node(candidates, needed_vram=needed, now=NOW, strategy=strategy)


def test_it_reports_no_candidates():
    decision = pick()
    assert decision.node is None and decision.reason == placement.NO_CANDIDATES
    assert not decision


def test_it_skips_nodes_without_a_free_slot_and_says_so_when_none_has_one():
    assert pick(node("a", rows=1), node("b", slots=2, rows=1)).node.name == "b"
    decision = pick(node("a", rows=1), node("b", slots=2, rows=2))
    assert decision.node is None and decision.reason == placement.NO_FREE_SLOT


def test_a_slot_count_below_one_counts_as_one():
    assert pick(node("a", slots=0)).node.name == "a"


def test_it_needs_enough_free_vram_and_lists_the_slotted_nodes_when_none_has_it():
    assert pick(node("small", free=4 * GIB), node("big", free=16 * GIB), needed=8 * GIB).node.name == "big"
    decision = pick(node("a", free=GIB), node("b", free=2 * GIB, rows=1), needed=8 * GIB)
    assert decision.reason == placement.NOT_ENOUGH_VRAM
    assert [c.name for c in decision.slotted] == ["a"]  # b has no slot: evicting there does not help


def test_unknown_vram_need_fits_every_node_even_one_with_negative_free_vram():
    assert pick(node("a", free=-GIB), needed=0).node.name == "a"


def test_idle_nodes_come_before_busy_ones_then_the_least_loaded():
    assert pick(node("busy", in_flight=1, free=80 * GIB), node("idle", free=8 * GIB)).node.name == "idle"
    assert pick(node("b3", in_flight=3), node("b1", in_flight=1), node("b2", in_flight=2)).node.name == "b1"


def test_spread_prefers_nodes_without_the_model():
    chosen = pick(node("has", slots=2, rows=1, free=80 * GIB), node("empty", free=8 * GIB))
    assert chosen.node.name == "empty"


def test_spread_puts_models_of_unknown_size_on_the_node_with_the_fewest_replicas():
    # VRAM reports lag behind loads: an idle node that already runs other models' replicas
    # still reports as much free VRAM as before, so the replica count must break the tie.
    chosen = pick(node("busy", replicas=5, free=80 * GIB), node("quiet", replicas=1, free=24 * GIB))
    assert chosen.node.name == "quiet"


def test_binpack_prefers_nodes_with_the_model_and_the_tightest_fit():
    chosen = pick(node("has", slots=2, rows=1, free=8 * GIB), node("empty"), strategy=placement.BINPACK)
    assert chosen.node.name == "has"
    chosen = pick(node("roomy", free=80 * GIB), node("tight", free=9 * GIB), needed=8 * GIB, strategy=placement.BINPACK)
    assert chosen.node.name == "tight"


def test_equal_nodes_tie_break_on_most_free_vram_then_name():
    assert pick(node("b", free=8 * GIB), node("a", free=8 * GIB)).node.name == "a"
    assert pick(node("a", free=8 * GIB), node("b", free=9 * GIB)).node.name == "b"


def test_a_node_in_failure_backoff_is_used_only_when_nothing_else_fits():
    later = NOW + timedelta(seconds=30)
    assert pick(node("failing", backoff=later, free=80 * GIB), node("ok", in_flight=5)).node.name == "ok"
    assert pick(node("failing", backoff=later), node("full", rows=1)).node.name == "failing"


def test_an_expired_backoff_no_longer_counts():
    assert pick(node("a", backoff=NOW - timedelta(seconds=1))).node.name == "a"
    assert pick(node("a", backoff=NOW), node("b", free=GIB)).node.name == "a"  # retry_after == now: usable


def test_when_every_node_is_backed_off_the_one_whose_backoff_ends_first_is_chosen():
    chosen = pick(node("long", backoff=NOW + timedelta(minutes=5)), node("short", backoff=NOW + timedelta(seconds=10)))
    assert chosen.node.name == "short"


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError):
        pick(node("a"), strategy="random")


# --- eviction ---------------------------------------------------------------------------------


def replica(rid, model="phi", *, node_id="n1", last_used_min=None, in_flight=0, floor=0, index=0, **extra):
    last_used = None if last_used_min is None else NOW - timedelta(minutes=last_used_min)
    return ReplicaInfo(
        replica_id=rid,
        node_id=node_id,
        model_name=model,
        replica_index=index,
        in_flight=in_flight,
        last_used=last_used,
        floor=floor,
        **extra,
    )


def test_the_victim_is_the_least_recently_used_idle_replica():
    victim = choose_victim([replica("new", last_used_min=1), replica("old", "qwen", last_used_min=30)])
    assert victim.replica_id == "old"


def test_a_never_used_replica_counts_as_oldest():
    assert choose_victim([replica("used", last_used_min=60), replica("never", "qwen")]).replica_id == "never"


def test_busy_loading_and_unhealthy_replicas_are_never_victims():
    candidates = [
        replica("busy", in_flight=1, last_used_min=90),
        replica("loading", "a", loaded=False, last_used_min=90),
        replica("sick", "b", node_healthy=False, last_used_min=90),
    ]
    assert choose_victim(candidates) is None
    assert choose_victim([*candidates, replica("idle", "c", last_used_min=1)]).replica_id == "idle"


def test_it_never_takes_a_model_below_its_floor():
    only = [replica("only", floor=1, last_used_min=60)]
    assert choose_victim(only) is None
    pair = [replica("r0", floor=1, last_used_min=60, index=0), replica("r1", floor=1, last_used_min=60, index=1)]
    assert choose_victim(pair).replica_id == "r1"  # equal age: the highest index goes


def test_the_floor_is_counted_fleet_wide_not_only_on_the_eviction_nodes():
    replicas = [replica("here", floor=1, last_used_min=60, node_id="n1"), replica("there", floor=1, node_id="n2")]
    assert choose_victim(replicas, node_ids=["n1"]).replica_id == "here"
    assert choose_victim(replicas[:1], node_ids=["n1"]) is None


def test_only_replicas_on_the_given_nodes_and_of_other_models_are_considered():
    replicas = [replica("elsewhere", node_id="n2", last_used_min=90), replica("same", "llama", last_used_min=90)]
    assert choose_victim(replicas, node_ids=["n1"], exclude_model="llama") is None


@pytest.mark.parametrize(
    ("min_replicas", "max_replicas", "floor"), [(0, 0, 0), (0, 3, 1), (2, 0, 2), (1, 4, 1), (3, 3, 3)]
)
def test_replica_floor_is_max_of_min_and_one_for_autoscaled_models(min_replicas, max_replicas, floor):
    assert rules.replica_floor(min_replicas, max_replicas) == floor


@pytest.mark.parametrize(
    ("failures", "seconds"), [(0, 0), (1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (50, 300), (10_000, 300)]
)
def test_failure_backoff_doubles_from_ten_seconds_to_five_minutes(failures, seconds):
    assert placement.failure_backoff(failures) == timedelta(seconds=seconds)


# --- the worker gRPC service ------------------------------------------------------------------


def test_only_nodes_answering_the_worker_service_take_a_replica():
    localai = NodeCandidate(node_id="m", name="a-localai", slots=4, free_vram=80 * GIB, worker_api="missing")
    unchecked = NodeCandidate(node_id="u", name="b-unchecked", slots=4, free_vram=80 * GIB, worker_api="unknown")
    reference = node("c-reference", free=8 * GIB, in_flight=3)

    # the LocalAI node is idle with the most VRAM, yet never chosen
    assert pick(localai, unchecked, reference).node.name == "c-reference"


def test_it_says_when_no_candidate_answers_the_worker_service():
    decision = pick(NodeCandidate(node_id="m", name="m", slots=1, worker_api="missing"))
    assert decision.node is None and decision.reason == placement.NO_WORKER_SERVICE
    # the eviction path has nothing to work with either
    assert decision.slotted == ()


@pytest.mark.parametrize(("worker_api", "placeable"), [("available", True), ("missing", False), ("unknown", False)])
def test_serves_worker_api(worker_api, placeable):
    assert placement.serves_worker_api(worker_api) is placeable
