"""The write verbs of issue 16 part 4: ``Node.objects.set_vram_budget`` and the placement
fields of ``ModelSchedulingConfig.objects.upsert`` (``disk_bytes``, ``spread_by``). Validation
on both lanes; concurrent writers with real threads on PostgreSQL."""

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError

from registry.models import ModelSchedulingConfig, Node
from tests.concurrency import THREADS, run_in_threads
from tests.factories import GIB, make_node, make_scheduling


@pytest.mark.django_db
def test_set_vram_budget_sets_and_clears_the_cap():
    node = make_node(name="gpu")
    assert Node.objects.set_vram_budget(node.pk, 10 * GIB)
    node.refresh_from_db()
    assert node.vram_budget == 10 * GIB
    assert Node.objects.set_vram_budget(node.pk, None)
    node.refresh_from_db()
    assert node.vram_budget is None


@pytest.mark.django_db
def test_set_vram_budget_refuses_negative_and_answers_false_for_an_unknown_node():
    import uuid

    node = make_node(name="gpu")
    with pytest.raises(ValueError):
        Node.objects.set_vram_budget(node.pk, -1)
    assert not Node.objects.set_vram_budget(uuid.uuid4(), GIB)


@pytest.mark.django_db
def test_upsert_writes_disk_bytes_and_spread_by_only_when_given():
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=1, disk_bytes=7 * GIB, spread_by="zone")
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=2)
    row = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (row.min_replicas, row.disk_bytes, row.spread_by) == (2, 7 * GIB, "zone")
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=2, disk_bytes=0, spread_by="")
    row.refresh_from_db()
    assert (row.disk_bytes, row.spread_by) == (0, "")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "key"),
    [({"disk_bytes": -1}, "disk_bytes"), ({"disk_bytes": True}, "disk_bytes"), ({"spread_by": " zone"}, "spread_by")],
)
def test_upsert_refuses_bad_placement_fields(fields, key):
    with pytest.raises(ValidationError) as caught:
        ModelSchedulingConfig.objects.upsert("llama", **fields)
    assert key in caught.value.message_dict


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_budget_writes_leave_one_written_value_and_clear_cooldowns(close_thread_connections):
    node = make_node(name="gpu")
    make_scheduling("llama", min_replicas=1)
    ModelSchedulingConfig.objects.record_unsatisfiable("llama", threshold=1, cooldown=timedelta(hours=1))
    written = [(i + 1) * GIB for i in range(THREADS)]

    results = run_in_threads(lambda i: Node.objects.set_vram_budget(node.pk, written[i]), close_thread_connections)

    assert results == [True] * THREADS
    node.refresh_from_db()
    assert node.vram_budget in written
    assert ModelSchedulingConfig.objects.get(model_name="llama").unsatisfiable_until is None


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_budget_writes_racing_heartbeats_lose_neither(close_thread_connections):
    node = make_node(name="gpu")

    def act(i):
        if i % 2:
            return Node.objects.heartbeat(node.pk, available_vram=20 * GIB, available_disk=50 * GIB)
        return Node.objects.set_vram_budget(node.pk, 8 * GIB)

    assert all(run_in_threads(act, close_thread_connections))
    node.refresh_from_db()
    assert (node.vram_budget, node.available_vram, node.available_disk) == (8 * GIB, 20 * GIB, 50 * GIB)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_upserts_of_placement_fields_leave_one_row_with_one_writer_values(close_thread_connections):
    written = [(i * GIB, f"zone-{i}") for i in range(THREADS)]

    run_in_threads(
        lambda i: ModelSchedulingConfig.objects.upsert(
            "llama", min_replicas=i, disk_bytes=written[i][0], spread_by=written[i][1]
        ),
        close_thread_connections,
    )

    rows = list(ModelSchedulingConfig.objects.filter(model_name="llama"))
    assert len(rows) == 1
    row = rows[0]
    assert (row.disk_bytes, row.spread_by) in written
    assert written[row.min_replicas] == (row.disk_bytes, row.spread_by)  # one writer's whole row
