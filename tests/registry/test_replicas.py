"""Replica rows: upsert, removal, in-flight accounting, warm pick, placement queries."""

from datetime import timedelta

import pytest

from registry.models import Node, NodeModel
from tests.factories import GIB, make_node, make_replica

pytestmark = pytest.mark.django_db


def test_record_loaded_upserts_on_the_triple_and_keeps_the_row_id(now):
    node = make_node(slots=2)
    first = NodeModel.objects.record_loaded(node.pk, "llama", 0, address="a:1", now=now)
    row_id = NodeModel.objects.get().pk

    later = now + timedelta(seconds=5)
    NodeModel.objects.record_loaded(node.pk, "llama", 0, address="a:2", now=later)

    row = NodeModel.objects.get()
    assert row.pk == row_id == first.pk
    assert (row.address, row.state, row.state_changed_at, row.last_used) == ("a:2", NodeModel.State.LOADED, later, now)


def test_record_loaded_without_load_info_keeps_the_per_replica_blob(now):
    node = make_node()
    NodeModel.objects.record_loaded(node.pk, "llama", 0, address="a:1", backend_type="llama-cpp", opts_blob=b"blob")
    NodeModel.objects.record_loaded(node.pk, "llama", 0, address="a:1")
    row = NodeModel.objects.get()
    assert (row.backend_type, bytes(row.model_opts_blob)) == ("llama-cpp", b"blob")


def test_set_replica_load_info_stamps_the_row():
    node = make_node()
    make_replica(node, "llama", 0)
    assert NodeModel.objects.set_replica_load_info(node.pk, "llama", 0, "vllm", b"x")
    assert not NodeModel.objects.set_replica_load_info(node.pk, "llama", 9, "vllm", b"x")


def test_remove_one_replica_and_forget_every_replica_of_a_node():
    node, other = make_node(slots=3), make_node(slots=3)
    for index in range(3):
        make_replica(node, "llama", index)
    make_replica(node, "phi", 0)
    make_replica(other, "llama", 0)

    assert NodeModel.objects.remove_replica(node.pk, "llama", 2)
    assert not NodeModel.objects.remove_replica(node.pk, "llama", 2)
    assert NodeModel.objects.forget_node_replicas(node.pk) == 3
    assert NodeModel.objects.forget_node_replicas(node.pk) == 0
    assert set(NodeModel.objects.values_list("node_id", "model_name")) == {(other.pk, "llama")}


def test_claim_loading_inserts_the_row_and_reserves_its_vram_together(now):
    node = make_node(slots=2, total_vram=10 * GIB)

    first = NodeModel.objects.claim_loading(
        node.pk, "llama", slots=2, backend_type="llama-cpp", reserved_vram=6 * GIB, now=now
    )
    # the second slot is free but the VRAM is not: no row is left behind
    assert NodeModel.objects.claim_loading(node.pk, "llama", slots=2, reserved_vram=5 * GIB, now=now) is None

    assert (first.replica_index, first.state, first.reserved_vram, first.state_changed_at) == (
        0,
        NodeModel.State.LOADING,
        6 * GIB,
        now,
    )
    assert list(NodeModel.objects.values_list("pk", flat=True)) == [first.pk]
    node.refresh_from_db()
    assert node.reserved_vram == 6 * GIB

    second = NodeModel.objects.claim_loading(node.pk, "llama", slots=2, reserved_vram=4 * GIB, now=now)
    assert second.replica_index == 1
    assert NodeModel.objects.claim_loading(node.pk, "llama", slots=2, now=now) is None  # no slot left
    node.refresh_from_db()
    assert node.reserved_vram == 10 * GIB


def test_next_free_index_takes_the_lowest_gap_below_the_slot_count():
    node = make_node(slots=3)
    make_replica(node, "llama", 0)
    failed_load = make_replica(node, "llama", 1, state=NodeModel.State.LOADING)
    make_replica(node, "llama", 2, state=NodeModel.State.LOADING)
    assert NodeModel.objects.discard_loading(failed_load.pk)  # leaves a gap below index 2
    assert NodeModel.objects.next_free_index(node, "llama") == 1
    make_replica(node, "llama", 1)
    assert NodeModel.objects.next_free_index(node, "llama") is None
    assert NodeModel.objects.next_free_index(node, "phi") == 0


def test_in_flight_never_goes_below_zero():
    row = make_replica(make_node())
    assert NodeModel.objects.increment_in_flight(row.pk)
    assert NodeModel.objects.decrement_in_flight(row.pk)
    assert not NodeModel.objects.decrement_in_flight(row.pk)
    row.refresh_from_db()
    assert row.in_flight == 0


def test_warm_pick_prefers_least_in_flight_then_least_recently_used(now):
    node = make_node(slots=3)
    busy = make_replica(node, "llama", 0, in_flight=2, last_used=now - timedelta(hours=1))
    recent = make_replica(node, "llama", 1, in_flight=0, last_used=now - timedelta(seconds=1))
    old = make_replica(node, "llama", 2, in_flight=0, last_used=now - timedelta(minutes=1))

    picks = [NodeModel.objects.warm_pick("llama", now=now + timedelta(seconds=i)).pk for i in range(4)]

    # old (lru) -> recent -> old/recent again by last use; busy only once the others reach 2
    assert picks[:2] == [old.pk, recent.pk]
    assert busy.pk not in picks[:4]
    assert NodeModel.objects.get(pk=old.pk).in_flight == 2


def test_warm_pick_breaks_ties_by_most_free_vram(now):
    small = make_node(total_vram=8 * GIB)
    large = make_node(total_vram=80 * GIB)
    make_replica(small, "llama", 0, last_used=now)
    on_large = make_replica(large, "llama", 0, last_used=now)
    assert NodeModel.objects.warm_pick("llama", now=now).pk == on_large.pk


def test_warm_pick_reserves_and_skips_unhealthy_nodes_and_loading_rows(now):
    make_replica(make_node(status=Node.Status.UNHEALTHY), "llama", 0)
    make_replica(make_node(), "llama", 0, state=NodeModel.State.LOADING)
    assert NodeModel.objects.warm_pick("llama", now=now) is None

    good = make_replica(make_node(), "llama", 0)
    picked = NodeModel.objects.warm_pick("llama", now=now)
    assert picked.pk == good.pk and picked.in_flight == 1
    good.refresh_from_db()
    assert (good.in_flight, good.last_used) == (1, now)


def test_warm_pick_respects_the_candidate_filter(now):
    first, second = make_node(), make_node()
    make_replica(first, "llama", 0)
    on_second = make_replica(second, "llama", 0, in_flight=5)
    assert NodeModel.objects.warm_pick("llama", node_ids=[second.pk], now=now).pk == on_second.pk
    assert NodeModel.objects.warm_pick("llama", node_ids=[], now=now) is None


def test_warm_pick_runs_a_constant_number_of_queries(django_assert_max_num_queries, now):
    node = make_node(slots=50)
    for index in range(50):
        make_replica(node, "llama", index)
    # savepoint + select for update + update + release savepoint
    with django_assert_max_num_queries(4):
        assert NodeModel.objects.warm_pick("llama", now=now) is not None


def test_vram_reservation_cannot_over_commit_or_underflow():
    node = make_node(total_vram=10 * GIB)
    assert Node.objects.reserve_vram(node.pk, 6 * GIB)
    assert not Node.objects.reserve_vram(node.pk, 5 * GIB)
    assert Node.objects.reserve_vram(node.pk, 4 * GIB)
    assert Node.objects.release_vram(node.pk, 6 * GIB)
    assert not Node.objects.release_vram(node.pk, 6 * GIB)
    node.refresh_from_db()
    assert node.reserved_vram == 4 * GIB


def test_in_flight_check_constraint_holds_in_the_database():
    from django.db import IntegrityError, transaction

    row = make_replica(make_node())
    with pytest.raises(IntegrityError), transaction.atomic():
        NodeModel.objects.filter(pk=row.pk).update(in_flight=-1)


def test_duplicate_replica_triple_is_refused_by_the_database():
    from django.db import IntegrityError, transaction

    node = make_node()
    make_replica(node, "llama", 0)
    # A bare insert on purpose: every verb upserts or claims a free index, so only the schema
    # is left to refuse a second row of the same triple.
    with pytest.raises(IntegrityError), transaction.atomic():
        NodeModel.objects.create(node=node, model_name="llama", replica_index=0)
