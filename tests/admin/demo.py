"""A small demo fleet for the admin's screenshots: ``manage.py shell -c
"from tests.admin.demo import build; build()"`` against the database to fill.

Everything goes through the registry verbs; the addresses are unreachable on purpose (nothing
runs there), so run no reconcile pass against this data if you want it to stay as built.
"""

from datetime import timedelta

from django.utils import timezone

from proto import backend_pb2
from proto.codec import options_to_blob
from reconciler.models import Event, ModelCondition, ReconcilePass, ReplicaSample
from registry.models import LoadJob, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.factories import make_replica

GIB = 1024**3


def build() -> None:
    now = timezone.now()
    nodes = {}
    for name, vram, slots, labels in (
        ("gpu-a100-01", 80, 2, {"gpu": "a100", "zone": "eu-1"}),
        ("gpu-a100-02", 80, 2, {"gpu": "a100", "zone": "eu-2"}),
        ("gpu-l4-01", 24, 1, {"gpu": "l4", "zone": "eu-1"}),
    ):
        registration = Node.objects.register(
            name=name,
            address=f"10.0.0.{len(nodes) + 11}:50051",
            total_vram=vram * GIB,
            available_vram=(vram - 20) * GIB,
            labels=labels,
            max_replicas_per_model=slots,
            now=now - timedelta(seconds=3 + len(nodes) * 4),
        )
        nodes[name] = registration.node
    Node.objects.mark_draining(nodes["gpu-l4-01"].pk, by=Node.DrainedBy.OPERATOR)
    Node.objects.register(name="gpu-h100-new", address="10.0.0.20:50051", total_vram=80 * GIB, auto_approve=False)
    # A LocalAI worker: bound to the fleet token, heartbeating its disk, found without the
    # worker gRPC service by the reconciler (so never placed on).
    localai = Node.objects.register(
        name="mac-studio-01",
        address="10.0.0.30:50051",
        gpu_vendor="apple",
        total_vram=64 * GIB,
        total_disk=2048 * GIB,
        auth_mode="fleet_token",
        serves_worker_api=False,
        now=now - timedelta(seconds=6),
    ).node
    Node.objects.heartbeat(localai.pk, total_disk=2048 * GIB, available_disk=900 * GIB, now=now - timedelta(seconds=2))
    Node.objects.record_worker_api(
        localai.pk,
        available=False,
        address=localai.address,
        now=now - timedelta(seconds=1),
        detail="10.0.0.30:50051: answers gRPC but not the worker service (ListBackends: UNIMPLEMENTED)",
    )

    for model, options, minimum, maximum, selector in (
        ("llama-3-8b", {"Model": "llama-3-8b.Q4_K_M.gguf", "ContextSize": 8192, "NGPULayers": 99}, 2, 4, {}),
        ("whisper-large", {"Model": "whisper-large-v3.bin", "Threads": 4}, 1, 2, {"gpu": "a100"}),
    ):
        ModelSchedulingConfig.objects.upsert(model, min_replicas=minimum, max_replicas=maximum, node_selector=selector)
        ModelLoadInfo.objects.upsert(model, "llama-cpp", options_to_blob(backend_pb2.ModelOptions(**options)))

    def replica(node, model, index, state=NodeModel.State.LOADED, in_flight=0):
        make_replica(
            nodes[node],
            model,
            index,
            state=state,
            in_flight=in_flight,
            address=f"{nodes[node].address.split(':')[0]}:{30000 + index}",
            last_used=now - timedelta(seconds=index * 7),
        )

    replica("gpu-a100-01", "llama-3-8b", 0, in_flight=1)
    replica("gpu-a100-01", "llama-3-8b", 1)
    replica("gpu-a100-02", "llama-3-8b", 0, in_flight=2)
    replica("gpu-a100-02", "whisper-large", 0, state=NodeModel.State.LOADING)
    replica("gpu-l4-01", "whisper-large", 0)

    for kind, model, node, message in (
        (Event.Kind.REPLICA_ADDED, "llama-3-8b", "gpu-a100-02", "scale-up to 2 replicas"),
        (Event.Kind.MODEL_AVAILABLE, "llama-3-8b", "", "2 of 2 replicas ready"),
        (Event.Kind.MODEL_UNAVAILABLE, "whisper-large", "", "0 of 1 replicas ready (gpu-l4-01 draining)"),
        (Event.Kind.REPLICA_ADDED, "whisper-large", "gpu-a100-02", "loading replica 0"),
    ):
        Event.objects.record(
            kind, model_name=model, node_id=nodes[node].pk if node else None, node_name=node, message=message
        )
    ModelCondition.objects.set_condition("llama-3-8b", ModelCondition.Type.AVAILABLE, True, "MinimumReplicasReady")
    ModelCondition.objects.set_condition(
        "whisper-large", ModelCondition.Type.AVAILABLE, False, "BelowMinimum", "0 of 1 ready"
    )
    ModelCondition.objects.set_condition("whisper-large", ModelCondition.Type.PROGRESSING, True, "ReplicaLoading")
    # The last hour, for the charts: a pass every 30 s (a slow one at a scale-up, one error),
    # the models' replica counts as they changed, and a few cold loads through the router.
    for index in range(120, 0, -1):
        seconds = 3600 - index * 30
        outcome = ReconcilePass.Outcome.ERROR if index == 40 else ReconcilePass.Outcome.OK
        busy = index in (100, 99, 60, 20)
        ReconcilePass.objects.record(
            outcome=outcome,
            started_at=now - timedelta(seconds=3600 - seconds),
            duration=timedelta(milliseconds=(420 if busy else 30 + index % 7 * 4)),
            summary={"outcome": outcome, "actions": {"replicas_added": 2 if busy else 0, "replicas_probed": 5}},
            holder_host="cp-web-1",
            holder_pid=4242,
        )
    for minutes, samples in (
        (58, [("llama-3-8b", 0, 2), ("whisper-large", 0, 1)]),
        (49, [("llama-3-8b", 2, 2), ("whisper-large", 1, 1)]),
        (30, [("llama-3-8b", 1, 2)]),
        (29, [("llama-3-8b", 2, 2)]),
        (9, [("whisper-large", 0, 1)]),
    ):
        ReplicaSample.objects.record_changes(samples, now=now - timedelta(minutes=minutes))
    for minutes, model, took, error in (
        (50, "llama-3-8b", 14, ""),
        (49, "whisper-large", 6, ""),
        (30, "llama-3-8b", 11, ""),
        (9, "whisper-large", 4, "load_failed"),
    ):
        job, _ = LoadJob.objects.claim_or_attach(model, now=now - timedelta(minutes=minutes, seconds=took))
        LoadJob.objects.start(job.pk, "cp-web-1:4242", now=now - timedelta(minutes=minutes, seconds=took))
        finished = now - timedelta(minutes=minutes)
        if error:
            LoadJob.objects.fail(job.pk, code=error, message="backend exited while loading", now=finished)
        else:
            LoadJob.objects.succeed(job.pk, "cp-web-1:4242", NodeModel.objects.filter(model_name=model).first(),
                                    now=finished)
    ReconcilePass.objects.record(
        outcome=ReconcilePass.Outcome.OK,
        started_at=now - timedelta(seconds=4),
        duration=timedelta(milliseconds=38),
        summary={"outcome": "ok", "actions": {"replicas_added": 1, "replicas_probed": 5}, "skipped": {}},
        holder_host="cp-web-1",
        holder_pid=4242,
    )
