"""The snapshot reads the fleet in a fixed number of queries; a steady fleet costs the same."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reconciler.snapshot import take_snapshot
from registry.models import ModelLoadInfo, ModelSchedulingConfig, NodeLabel, NodeModel
from tests.factories import make_node

pytestmark = pytest.mark.django_db


def fleet(models: int, nodes: int = 4, now=None):
    """``models`` autoscaled models, each with load info and one loaded replica."""
    hosts = [make_node(name=f"gpu-{i}", slots=models, labels={"zone": "a"}, now=now) for i in range(nodes)]
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=f"m-{i}", min_replicas=1, node_selector={"zone": "a"}) for i in range(models)
    )
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(model_name=f"m-{i}", backend_type="llama-cpp", model_opts_blob=b"x", updated_at=timezone.now())
        for i in range(models)
    )
    NodeModel.objects.bulk_create(
        NodeModel(node=hosts[i % nodes], model_name=f"m-{i}", replica_index=0, state=NodeModel.State.LOADED, last_used=now)
        for i in range(models)
    )
    return hosts


def count_queries(fn) -> int:
    with CaptureQueriesContext(connection) as captured:
        fn()
    return len(captured)


@pytest.mark.parametrize("models", [10, 1000])
def test_snapshot_takes_seven_queries_whatever_the_fleet_size(models, now, django_assert_num_queries):
    fleet(models, now=now)

    with django_assert_num_queries(7):
        snapshot = take_snapshot(now=now)

    assert len(snapshot.configs) == models
    assert len(snapshot.replicas) == models
    assert snapshot.nodes[next(iter(snapshot.nodes))].labels["zone"] == "a"
    assert NodeLabel.objects.count() > len(snapshot.nodes)  # labels came along, in the same seven


def test_a_steady_pass_costs_the_same_for_10_and_1000_models(now, reconcile):
    """Two passes over fleets that need nothing: the second pass (conditions already written)
    issues as many queries for 1,000 models as for 10."""

    def steady_pass_queries(models):
        NodeModel.objects.all().delete()
        NodeLabel.objects.all().delete()
        for model in (ModelSchedulingConfig, ModelLoadInfo):
            model.objects.all().delete()
        from registry.models import Node

        Node.objects.all().delete()
        fleet(models, now=now)
        reconcile()
        return count_queries(reconcile)

    assert steady_pass_queries(10) == steady_pass_queries(1000)
