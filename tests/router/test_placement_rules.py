"""Pure placement, issue 16 part 4: per-node VRAM budget, disk headroom, topology spread,
size-aware eviction and the per-node verdicts ("why here / why not there"). No database."""

from datetime import UTC, datetime, timedelta

from registry import placement
from registry.placement import NodeCandidate, ReplicaInfo, choose_node, choose_victim, explain

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
GIB = 1024**3


def node(name, *, slots=1, rows=0, free=24 * GIB, budget=None, used=0, disk=None, total_disk=0, zone=None, **kw):
    return NodeCandidate(
        node_id=name,
        name=name,
        slots=slots,
        model_rows=rows,
        free_vram=free,
        vram_budget=budget,
        budget_used=used,
        available_disk=disk or 0,
        total_disk=total_disk,
        labels=(("zone", zone),) if zone else (),
        **kw,
    )


def verdicts(*candidates, **kw):
    kw.setdefault("now", NOW)
    found, reason = explain(candidates, **kw)
    return {v.node.name: v.reason for v in found}, reason


# ---- VRAM budget --------------------------------------------------------------------------


def test_budget_caps_the_free_vram_placement_sees():
    capped = node("a", free=24 * GIB, budget=10 * GIB, used=4 * GIB)
    assert capped.budget_free == 6 * GIB
    assert capped.placeable_vram == 6 * GIB
    assert node("b", free=3 * GIB, budget=10 * GIB).placeable_vram == 3 * GIB  # the report is lower
    assert node("c", free=3 * GIB).placeable_vram == 3 * GIB  # no budget


def test_a_node_over_its_budget_is_rejected_with_reason_budget():
    found, reason = verdicts(node("a", budget=10 * GIB, used=4 * GIB), node("b", free=8 * GIB), needed_vram=7 * GIB)
    assert found == {"a": placement.BUDGET, "b": placement.CHOSEN}
    assert reason == ""


def test_budget_short_everywhere_is_not_enough_vram_so_eviction_may_help():
    decision = choose_node([node("a", budget=4 * GIB)], needed_vram=5 * GIB, now=NOW)
    assert decision.node is None and decision.reason == placement.NOT_ENOUGH_VRAM
    assert [c.name for c in decision.slotted] == ["a"]


def test_reported_vram_short_is_reason_vram_even_with_a_budget():
    found, _ = verdicts(node("a", free=2 * GIB, budget=4 * GIB), needed_vram=3 * GIB)
    assert found == {"a": placement.VRAM}


def test_a_used_up_budget_rejects_models_of_unknown_size():
    found, reason = verdicts(node("a", budget=4 * GIB, used=4 * GIB), node("b"))
    assert found == {"a": placement.BUDGET, "b": placement.CHOSEN}
    assert choose_node([node("a", budget=4 * GIB, used=1)], now=NOW).node.name == "a"


# ---- disk headroom ------------------------------------------------------------------------


def test_a_model_is_not_placed_where_its_disk_size_does_not_fit():
    found, _ = verdicts(
        node("small", disk=10 * GIB, total_disk=100 * GIB),
        node("big", disk=50 * GIB, total_disk=100 * GIB, in_flight_total=5),
        needed_disk=20 * GIB,
    )
    assert found == {"small": placement.DISK, "big": placement.CHOSEN}


def test_no_disk_anywhere_is_its_own_reason_and_nothing_to_evict_for():
    decision = choose_node([node("a", disk=GIB, total_disk=10 * GIB)], needed_disk=2 * GIB, now=NOW)
    assert decision.node is None and decision.reason == placement.NOT_ENOUGH_DISK
    assert decision.slotted == ()


def test_unknown_disk_size_or_unreported_disk_fits():
    assert node("a", disk=0, total_disk=0).fits_disk(50 * GIB)
    assert node("a", disk=GIB, total_disk=10 * GIB).fits_disk(0)
    assert not node("a", disk=GIB, total_disk=10 * GIB).fits_disk(2 * GIB)


# ---- topology spread ----------------------------------------------------------------------


def test_spread_prefers_the_label_value_with_fewest_replicas():
    a1 = node("a1", zone="a", slots=2, rows=1)
    a2 = node("a2", zone="a")
    b1 = node("b1", zone="b", in_flight_total=9)  # busier, but zone b holds no replica yet
    found, _ = verdicts(a1, a2, b1, spread_by="zone")
    assert found == {"a1": placement.SPREAD_SKEW, "a2": placement.SPREAD_SKEW, "b1": placement.CHOSEN}


def test_spread_falls_back_to_a_crowded_value_when_the_emptier_one_does_not_fit():
    a1 = node("a1", zone="a", slots=2, rows=1)
    b1 = node("b1", zone="b", free=GIB)
    decision = choose_node([a1, b1], needed_vram=2 * GIB, now=NOW, spread_by="zone")
    assert decision.node.name == "a1"


def test_spread_skips_nodes_without_the_label():
    found, _ = verdicts(node("x"), node("a1", zone="a"), spread_by="zone")
    assert found == {"x": placement.SPREAD_LABEL_MISSING, "a1": placement.CHOSEN}


def test_spread_keeps_skew_at_most_one_over_successive_placements():
    nodes = {n: node(n, zone=n[0], slots=4) for n in ("a1", "a2", "b1", "c1")}
    for _ in range(8):
        chosen = choose_node(list(nodes.values()), now=NOW, spread_by="zone").node
        nodes[chosen.name] = node(chosen.name, zone=chosen.name[0], slots=4, rows=chosen.model_rows + 1)
        per_zone = placement.spread_counts(nodes.values(), "zone")
        assert max(per_zone.values()) - min(per_zone.values()) <= 1
    assert sorted(placement.spread_counts(nodes.values(), "zone").values()) == [2, 3, 3]


# ---- verdicts -----------------------------------------------------------------------------


def test_every_candidate_gets_one_verdict_in_filter_order():
    found, reason = verdicts(
        node("noapi", worker_api="unknown"),
        node("full", rows=1),
        node("nodisk", disk=1, total_disk=10),
        node("novram", free=1),
        node("backoff", failure_backoff_until=NOW + timedelta(minutes=1)),
        node("other", in_flight_total=3),
        node("best"),
        needed_vram=2,
        needed_disk=2,
    )
    assert found == {
        "noapi": placement.NOT_WORKER_SERVICE,
        "full": placement.SLOT_FULL,
        "nodisk": placement.DISK,
        "novram": placement.VRAM,
        "backoff": placement.BACKOFF,
        "other": placement.RANKED_LOWER,
        "best": placement.CHOSEN,
    }
    assert reason == ""


def test_choose_node_agrees_with_explain():
    candidates = [node("a", in_flight_total=2), node("b")]
    found, _ = explain(candidates, now=NOW)
    chosen = [v.node for v in found if v.chosen]
    assert chosen == [choose_node(candidates, now=NOW).node]


# ---- size-aware eviction ------------------------------------------------------------------


def replica(rid, *, node_id="n", model="m", idle_minutes=10, vram=GIB, index=0):
    return ReplicaInfo(
        replica_id=rid,
        node_id=node_id,
        model_name=model,
        replica_index=index,
        last_used=NOW - timedelta(minutes=idle_minutes),
        vram=vram,
    )


def test_eviction_weighs_idle_time_by_vram_freed():
    old_small = replica("old-small", model="x", idle_minutes=30, vram=1 * GIB)
    newer_big = replica("newer-big", model="y", idle_minutes=10, vram=8 * GIB)
    assert choose_victim([old_small, newer_big]) == old_small  # plain LRU without now
    assert choose_victim([old_small, newer_big], now=NOW) == newer_big  # 10 * 8 > 30 * 1
    assert placement.eviction_score(newer_big, NOW) == 600 * 8 * GIB


def test_eviction_prefers_a_replica_that_alone_covers_the_shortfall():
    huge_idle_small = replica("a", model="x", idle_minutes=600, vram=1 * GIB)
    fits = replica("b", model="y", idle_minutes=5, vram=6 * GIB)
    assert choose_victim([huge_idle_small, fits], now=NOW) == huge_idle_small
    assert choose_victim([huge_idle_small, fits], now=NOW, shortfall={"n": 5 * GIB}) == fits


def test_size_aware_eviction_still_honours_floors_and_in_flight():
    busy = ReplicaInfo("busy", "n", "x", vram=9 * GIB, in_flight=1, last_used=NOW - timedelta(hours=1))
    floored = ReplicaInfo("floored", "n", "y", vram=9 * GIB, floor=1, last_used=NOW - timedelta(hours=1))
    small = replica("small", model="z", vram=GIB)
    assert choose_victim([busy, floored, small], now=NOW, shortfall={"n": 5 * GIB}) == small


def test_size_aware_eviction_breaks_ties_by_lru():
    one = replica("one", model="x", idle_minutes=10, vram=2 * GIB, index=0)
    two = replica("two", model="y", idle_minutes=20, vram=GIB, index=0)
    assert choose_victim([one, two], now=NOW) == two  # equal score: least recently used
