"""A steady pass (nothing to do) costs a fixed number of queries, whatever the fleet size, and
its per-pass writes are one statement each, not one per node or per model."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reconciler.models import ModelCondition
from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.factories import make_node

pytestmark = pytest.mark.django_db


def steady_fleet(prober, *, models: int, nodes: int, now):
    """``nodes`` healthy nodes and ``models`` autoscaled models (min 1), each with load info and
    one loaded, recently probed replica, and every worker listing exactly its node's rows."""
    hosts = [make_node(name=f"gpu-{i:03d}", slots=models, now=now) for i in range(nodes)]
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=f"m-{i:04d}", min_replicas=1) for i in range(models)
    )
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(model_name=f"m-{i:04d}", backend_type="echo", model_opts_blob=b"x", updated_at=timezone.now())
        for i in range(models)
    )
    for i in range(models):
        host = hosts[i % nodes]
        NodeModel.objects.record_loaded(host.pk, f"m-{i:04d}", 0, address=f"{host.address}-0", now=now)
        prober.listings.setdefault(host.address, []).append((f"m-{i:04d}", 0, "RUNNING"))
    for host in hosts:
        prober.listings.setdefault(host.address, [])
    return hosts


def steady_pass_queries(reconcile, prober, *, models: int, nodes: int, now) -> list[str]:
    steady_fleet(prober, models=models, nodes=nodes, now=now)
    first = reconcile(heartbeat=True)  # writes every condition once
    assert first.outcome == "ok", first
    with CaptureQueriesContext(connection) as captured:
        summary = reconcile()
    assert summary.outcome == "ok", summary
    assert summary.actions.get("workers_listed") == nodes
    assert summary.known_models == models
    assert "conditions_changed" not in summary.actions  # steady: nothing to write
    return [query["sql"] for query in captured.captured_queries]


def test_a_steady_pass_costs_the_same_queries_for_a_small_and_a_ten_times_larger_fleet(reconcile, prober, now):
    small = steady_pass_queries(reconcile, prober, models=20, nodes=3, now=now)
    for table in (NodeModel, ModelLoadInfo, ModelSchedulingConfig, ModelCondition, Node):
        table.objects.all().delete()
    prober.listings.clear()
    large = steady_pass_queries(reconcile, prober, models=200, nodes=30, now=now)

    assert len(small) == len(large), (small, large)


def test_a_steady_pass_records_the_answering_workers_in_one_update_at_most_once_a_minute(reconcile, prober, now):
    hosts = steady_fleet(prober, models=6, nodes=3, now=now)
    reconcile(heartbeat=True)

    def worker_api_updates(at):
        for host in hosts:
            Node.objects.heartbeat(host.pk, now=at)
        with CaptureQueriesContext(connection) as captured:
            reconcile(at=at)
        return [
            q["sql"] for q in captured.captured_queries if q["sql"].startswith('UPDATE "registry_node" SET "worker_api"')
        ]

    # Known to answer and checked less than WORKER_API_RECHECK_AFTER ago: nothing is rewritten.
    assert worker_api_updates(now + timezone.timedelta(seconds=10)) == []
    later = now + timezone.timedelta(seconds=61)
    assert len(worker_api_updates(later)) == 1  # every node at once, in one statement
    checked = set(Node.objects.filter(pk__in=[h.pk for h in hosts]).values_list("worker_api_checked_at", flat=True))
    assert checked == {later}


def test_record_workers_answering_keeps_the_address_condition(now):
    kept = make_node(name="kept", address="10.0.0.1:50051", now=now)
    moved = make_node(name="moved", address="10.0.0.2:50051", now=now)
    Node.objects.record_worker_api(kept.pk, available=False, detail="nothing answers", address=kept.address, now=now)
    Node.objects.record_worker_api(moved.pk, available=False, detail="nothing answers", address=moved.address, now=now)
    later = now + timezone.timedelta(seconds=5)

    # ``moved`` was asked at an address it no longer registers: that answer is not about it.
    written = Node.objects.record_workers_answering({kept.pk: kept.address, moved.pk: "10.0.0.99:50051"}, now=later)

    assert written == 1
    rows = {row.name: row for row in Node.objects.filter(pk__in=[kept.pk, moved.pk])}
    assert (rows["kept"].worker_api, rows["kept"].worker_api_detail, rows["kept"].worker_api_checked_at) == (
        Node.WorkerApi.AVAILABLE,
        "",
        later,
    )
    assert (rows["moved"].worker_api, rows["moved"].worker_api_checked_at) == (Node.WorkerApi.MISSING, now)
    assert Node.objects.record_workers_answering({}, now=later) == 0


def test_set_conditions_with_known_rows_reads_and_writes_only_what_differs(now, django_assert_num_queries):
    from reconciler.managers import ConditionState

    Type = ModelCondition.Type
    ModelCondition.objects.set_condition("llama", Type.AVAILABLE, True, "minimum_replicas_ready", "1 of 1", now=now)
    ModelCondition.objects.set_condition("phi", Type.AVAILABLE, True, "minimum_replicas_ready", "1 of 1", now=now)
    known = ModelCondition.objects.as_map()
    same = [
        ConditionState("llama", Type.AVAILABLE, True, "minimum_replicas_ready", "1 of 1"),
        ConditionState("phi", Type.AVAILABLE, True, "minimum_replicas_ready", "1 of 1"),
    ]

    with django_assert_num_queries(0):
        assert ModelCondition.objects.set_conditions(same, now=now, known=known) == []

    later = now + timezone.timedelta(seconds=30)
    changed = [same[0], ConditionState("phi", Type.AVAILABLE, False, "below_minimum", "0 of 1")]
    transitions = ModelCondition.objects.set_conditions(changed, now=later, known=known)

    assert [(t.state.model_name, t.previous_reason) for t in transitions] == [("phi", "minimum_replicas_ready")]
    rows = {row.model_name: row for row in ModelCondition.objects.filter(type=Type.AVAILABLE)}
    assert (rows["phi"].status, rows["phi"].since, rows["phi"].updated_at) == (False, later, later)
    assert (rows["llama"].since, rows["llama"].updated_at) == (now, now)  # equal to known: not written


def test_the_snapshot_decodes_each_distinct_node_selector_once(now):
    from reconciler.snapshot import take_snapshot

    ModelSchedulingConfig.objects.bulk_create(
        [
            ModelSchedulingConfig(model_name="a", min_replicas=1, node_selector={"zone": "eu", "gpu": "h100"}),
            ModelSchedulingConfig(model_name="b", min_replicas=1, node_selector={"zone": "eu", "gpu": "h100"}),
            ModelSchedulingConfig(model_name="b2", min_replicas=1, node_selector={"gpu": "h100", "zone": "eu"}),
            ModelSchedulingConfig(model_name="c", min_replicas=1, node_selector={}),
            ModelSchedulingConfig(model_name="d", min_replicas=1),
        ]
    )

    configs = take_snapshot(now=now).configs

    assert dict(configs["a"].node_selector) == {"zone": "eu", "gpu": "h100"}
    assert configs["a"].node_selector is configs["b"].node_selector  # one view per distinct selector
    assert dict(configs["b2"].node_selector) == dict(configs["a"].node_selector)
    assert dict(configs["c"].node_selector) == dict(configs["d"].node_selector) == {}


def test_rows_now_sees_rows_written_and_removed_since_the_snapshot(now, django_assert_num_queries):
    from reconciler.snapshot import rows_now, take_snapshot

    node = make_node(name="gpu-a", slots=4, now=now)
    kept = NodeModel.objects.record_loaded(node.pk, "kept", 0, address="a:1", now=now)
    gone = NodeModel.objects.record_loaded(node.pk, "gone", 0, address="a:2", now=now)
    refreshed = NodeModel.objects.record_loaded(node.pk, "refreshed", 0, address="a:3", now=now)
    snapshot = take_snapshot(now=now)
    later = now + timezone.timedelta(seconds=5)
    NodeModel.objects.remove_replica(node.pk, "gone", 0)
    NodeModel.objects.record_loaded(node.pk, "refreshed", 0, address="a:5", now=later)  # reported again, moved
    new = NodeModel.objects.record_loaded(node.pk, "new", 0, address="a:4", now=later)

    with django_assert_num_queries(2):  # the ids, then the new and the refreshed rows in full
        rows = rows_now(snapshot, [node.pk], refresh={refreshed.pk})[node.pk]

    assert [(row.id, row.model_name, row.state_changed_at) for row in rows] == [
        (kept.pk, "kept", now),
        (new.pk, "new", later),
        (refreshed.pk, "refreshed", later),
    ]
    assert gone.pk not in {row.id for row in rows}
    fresh = take_snapshot(now=later)
    with django_assert_num_queries(1):  # nothing changed since this snapshot: the ids only
        assert [row.id for row in rows_now(fresh, [node.pk])[node.pk]] == [
            kept.pk,
            new.pk,
            refreshed.pk,
        ]


def test_a_pass_pauses_the_cyclic_collector_and_resumes_it_even_when_it_fails(reconcile, monkeypatch):
    import gc

    from reconciler import apply

    seen = []
    real = apply.take_snapshot

    def snapshot_then_fail(**kwargs):
        seen.append(gc.isenabled())
        if len(seen) > 1:
            raise RuntimeError("snapshot failed")
        return real(**kwargs)

    monkeypatch.setattr(apply, "take_snapshot", snapshot_then_fail)
    assert gc.isenabled()

    assert reconcile().outcome == "ok"
    assert reconcile().outcome == "error"

    assert seen == [False, False]
    assert gc.isenabled()
