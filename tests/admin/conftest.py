"""Fixtures of the admin tests: a populated fleet built through the registry verbs."""

from datetime import timedelta

import pytest
from django.utils import timezone

from proto import backend_pb2
from proto.codec import options_to_blob
from reconciler.models import Event, ModelCondition, ReconcilePass
from registry.models import ModelLoadInfo
from tests.factories import make_api_key, make_node, make_replica, make_scheduling

# An address nothing listens on: gRPC calls fail fast with "connection refused".
UNREACHABLE = "127.0.0.1:9"


def llama_blob() -> bytes:
    return options_to_blob(backend_pb2.ModelOptions(Model="llama-3-8b.gguf", ContextSize=4096, NGPULayers=99))


def populate(nodes: int = 3, models: int = 2) -> dict:
    """``nodes`` healthy nodes (the first one with a label ``gpu=a100``), ``models`` models each
    with a scheduling config, load info and one loaded replica per node, plus events, a
    condition and a reconcile pass."""
    now = timezone.now()
    fleet_nodes = [
        make_node(name=f"gpu-{i:02d}", address=UNREACHABLE, slots=2, labels={"gpu": "a100"} if i == 0 else None)
        for i in range(nodes)
    ]
    names = [f"model-{j}" for j in range(models)]
    for j, name in enumerate(names):
        make_scheduling(name, min_replicas=1, max_replicas=4)
        ModelLoadInfo.objects.upsert(name, "llama-cpp", llama_blob())
        for i, node in enumerate(fleet_nodes):
            make_replica(node, name, 0, in_flight=(i + j) % 2, address=f"127.0.0.1:{40000 + i}", last_used=now)
        Event.objects.record(Event.Kind.REPLICA_ADDED, model_name=name, node_id=fleet_nodes[0].pk,
                             node_name=fleet_nodes[0].name, message="scaled up")
        ModelCondition.objects.set_condition(name, ModelCondition.Type.AVAILABLE, True, "MinimumReplicasReady")
    ReconcilePass.objects.record(
        outcome=ReconcilePass.Outcome.OK,
        started_at=now - timedelta(seconds=3),
        duration=timedelta(milliseconds=42),
        summary={"outcome": "ok", "actions": {"replicas_probed": 4}, "skipped": {}},
        holder_host="test",
        holder_pid=1,
    )
    return {"nodes": fleet_nodes, "models": names}


@pytest.fixture
def fleet_rows(db):
    return populate()


@pytest.fixture
def api_key(db):
    return make_api_key("frontend", name="frontend-a")


@pytest.fixture
def staff_client(client, django_user_model):
    """A staff user with every permission of the fleet models (not a superuser)."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("operator", password="pw-operator", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label__in=["registry", "reconciler", "controlplane"])
    )
    client.force_login(user)
    return client


