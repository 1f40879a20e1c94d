"""A big fleet for the dashboard's size tests and benchmark: rows written in bulk (thousands of
registrations through the API would take minutes), conditions through the reconciler's verb."""

from __future__ import annotations

from django.utils import timezone

from reconciler.managers import ConditionState
from reconciler.models import ModelCondition
from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeLabel, NodeModel

ZONES = 4


def build_big_fleet(*, nodes: int = 1000, models: int = 1000, replicas: int = 2, problem_every: int = 25) -> dict:
    """``nodes`` healthy nodes (label ``zone``), ``models`` models with a config, load info and
    ``replicas`` loaded replicas each on distinct healthy nodes; every ``problem_every``-th model is short
    of its floor and says so in its Available condition, every ``problem_every``-th node offline."""
    now = timezone.now()
    Node.objects.bulk_create(
        Node(
            name=f"node-{i:05d}",
            address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051",
            status=Node.Status.OFFLINE if i % problem_every == problem_every - 1 else Node.Status.HEALTHY,
            total_vram=80 * 1024**3,
            available_vram=80 * 1024**3,
            max_replicas_per_model=8,
            last_heartbeat=now,
        )
        for i in range(nodes)
    )
    fleet_nodes = list(Node.objects.order_by("name"))
    healthy = [node for node in fleet_nodes if node.status == Node.Status.HEALTHY]
    NodeLabel.objects.bulk_create(
        NodeLabel(node=node, key="zone", value=f"zone-{i % ZONES}", source=NodeLabel.Source.WORKER)
        for i, node in enumerate(fleet_nodes)
    )
    names = [f"model-{m:05d}" for m in range(models)]
    short = {name for m, name in enumerate(names) if m % problem_every == 0}
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=name, min_replicas=replicas + (name in short)) for name in names
    )
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(model_name=name, backend_type="echo", model_opts_blob=b"\x0a\x01m", updated_at=now)
        for name in names
    )
    NodeModel.objects.bulk_create(
        (
            NodeModel(
                node=healthy[(m * 7 + k * 13) % len(healthy)],
                model_name=name,
                replica_index=k,
                address=f"10.9.{m // 256 % 256}.{m % 256}:{20000 + k}",
                state=NodeModel.State.LOADED,
                in_flight=k % 2,
                last_used=now,
                last_probe_at=now,
            )
            for m, name in enumerate(names)
            for k in range(replicas)
        ),
        batch_size=2000,
    )
    ModelCondition.objects.set_conditions(
        [
            ConditionState(
                name,
                ModelCondition.Type.AVAILABLE,
                name not in short,
                "MinimumReplicasUnavailable" if name in short else "MinimumReplicasReady",
            )
            for name in names
        ],
        now=now,
    )
    return {"nodes": len(fleet_nodes), "models": names, "short": sorted(short)}
