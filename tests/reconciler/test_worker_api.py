"""Nodes that do not answer the worker gRPC service (LocalAI's workers take backend commands
over NATS): the reconciler records it from its ListBackends call, keeps them alive on their
heartbeats, and never places on them, so no StartBackend is sent to them pass after pass."""

from concurrent import futures
from datetime import timedelta
from types import MappingProxyType
from uuid import uuid4

import grpc
import pytest
from django.test import override_settings

from proto import backend_pb2, backend_pb2_grpc, client
from reconciler.conf import ReconcileConfig
from reconciler.models import Event
from reconciler.planning import WORKER_API_RECHECK_AFTER, plan_checks
from reconciler.probes import missing_worker_service
from reconciler.reconcile import reconcile_once
from reconciler.snapshot import NodeView, Snapshot
from registry.models import LoadFailure, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.clients import client_with
from tests.reconciler.test_grpc_prober import closed_port

TOKEN = "fleet-token-for-tests"
LIST_BACKENDS = "/controlplane.worker.v1.Worker/ListBackends"


def test_snapshot_candidates_leave_out_nodes_without_the_worker_service(now):
    nodes = {
        node.id: node
        for node in (
            NodeView(id=uuid4(), name="a-localai", status=Node.Status.HEALTHY, worker_api=Node.WorkerApi.MISSING),
            NodeView(id=uuid4(), name="b-new", status=Node.Status.HEALTHY, worker_api=Node.WorkerApi.UNKNOWN),
            NodeView(id=uuid4(), name="c-worker", status=Node.Status.HEALTHY, worker_api=Node.WorkerApi.AVAILABLE),
        )
    }
    snapshot = Snapshot(taken_at=now, nodes=MappingProxyType(nodes))

    assert [node.name for node in snapshot.candidates({})] == ["c-worker"]
    assert all(node.schedulable for node in nodes.values())  # alive: their replicas still count


def test_a_node_without_the_worker_service_is_listed_again_only_after_a_minute(now):
    missing = NodeView(
        id=uuid4(),
        name="localai",
        status=Node.Status.HEALTHY,
        address="10.0.0.9:50051",
        worker_api=Node.WorkerApi.MISSING,
        worker_api_checked_at=now - timedelta(seconds=30),
    )
    unknown = NodeView(id=uuid4(), name="new", status=Node.Status.HEALTHY, address="10.0.0.8:1", worker_api="unknown")
    snapshot = Snapshot(taken_at=now, nodes=MappingProxyType({missing.id: missing, unknown.id: unknown}))

    assert plan_checks(snapshot, ReconcileConfig.from_settings(), now=now).listings == (unknown,)
    later = now + WORKER_API_RECHECK_AFTER
    assert plan_checks(snapshot, ReconcileConfig.from_settings(), now=later).listings == (missing, unknown)


@pytest.mark.parametrize(
    ("code", "known_available", "missing"),
    [
        (grpc.StatusCode.UNIMPLEMENTED, True, True),
        (grpc.StatusCode.UNAVAILABLE, True, True),
        (grpc.StatusCode.UNAUTHENTICATED, True, True),
        (grpc.StatusCode.FAILED_PRECONDITION, True, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, False),  # a known worker may just be busy
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, True),
        (grpc.StatusCode.INTERNAL, False, False),
        (None, False, False),
    ],
)
def test_which_listing_failures_mean_no_worker_service(code, known_available, missing):
    error = client.GrpcCallError(LIST_BACKENDS, code, "x")
    reason = missing_worker_service(error, "10.0.0.9:50051", known_available=known_available)
    assert bool(reason) is missing
    if missing:
        assert reason.startswith("10.0.0.9:50051: ") and code.name in reason


class LocalAIBackend(backend_pb2_grpc.BackendServicer):
    """What often listens at a LocalAI worker's advertised address: a backend process."""

    def Health(self, request, context):
        return backend_pb2.Reply(message=b"OK")


class CallRecorder(grpc.GenericRpcHandler):
    """Records every method called on the server; handles none of them itself."""

    def __init__(self):
        self.methods: list[str] = []

    def service(self, handler_call_details):
        self.methods.append(handler_call_details.method)
        return None


@pytest.fixture
def localai_address():
    """A real gRPC server on loopback serving ``backend.Backend`` only; yields (address,
    recorder)."""
    recorder = CallRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((recorder,))
    backend_pb2_grpc.add_BackendServicer_to_server(LocalAIBackend(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client.close_all_channels()
    yield f"127.0.0.1:{port}", recorder
    server.stop(grace=None)
    client.close_all_channels()


def register_as_localai(name: str, address: str) -> Node:
    """LocalAI's worker registration: the fleet token, nothing declared."""
    api = client_with(TOKEN)
    body = {"name": name, "address": address, "total_vram": 0, "available_vram": 0, "max_replicas_per_model": 1}
    response = api.post("/api/node/register", body, format="json")
    assert response.status_code == 201, response.content
    return Node.objects.get(pk=response.json()["id"])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@override_settings(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN)
def test_a_node_without_the_worker_service_is_marked_missing_kept_healthy_and_never_sent_start_backend(
    localai_address, now
):
    address, recorder = localai_address
    localai = register_as_localai("localai-1", address)
    nothing_there = register_as_localai("localai-2", closed_port())
    ModelLoadInfo.objects.upsert("tiny", "echo", backend_pb2.ModelOptions(Model="tiny").SerializeToString())
    ModelSchedulingConfig.objects.upsert("tiny", min_replicas=1)

    passes = 8  # 70 s of passes, 10 s apart: ListBackends at 0 s, then again 60 s later
    for index in range(passes):
        at = now + timedelta(seconds=10 * index)
        for node in (localai, nothing_there):
            assert Node.objects.heartbeat(node.pk, now=at)
        summary = reconcile_once(now=at)  # the default prober and the router as scheduler
        assert summary.outcome == "ok", summary

    # ListBackends when first seen and once a minute after: no StartBackend, ever.
    assert recorder.methods == [LIST_BACKENDS] * 2
    localai.refresh_from_db()
    nothing_there.refresh_from_db()
    assert (localai.status, localai.worker_api) == (Node.Status.HEALTHY, Node.WorkerApi.MISSING)
    assert "UNIMPLEMENTED" in localai.worker_api_detail and address in localai.worker_api_detail
    assert localai.worker_api_checked_at == now + timedelta(seconds=60)
    assert (nothing_there.status, nothing_there.worker_api) == (Node.Status.HEALTHY, Node.WorkerApi.MISSING)
    assert "UNAVAILABLE" in nothing_there.worker_api_detail
    assert not NodeModel.objects.exists()
    assert not LoadFailure.objects.exists()
    assert not Event.objects.filter(kind=Event.Kind.SCALE_UP_FAILED).exists()
    assert not Event.objects.filter(kind=Event.Kind.NODE_OFFLINE).exists()


@pytest.mark.django_db
def test_recording_the_worker_service_follows_the_answers_and_ignores_an_old_address(now):
    node = Node.objects.register(name="w", address="10.0.0.1:1", serves_worker_api=False, now=now).node
    assert node.worker_api == Node.WorkerApi.UNKNOWN

    assert Node.objects.record_worker_api(
        node.pk, available=False, detail="nothing there", address="10.0.0.1:1", now=now
    )
    assert Node.objects.candidates().filter(pk=node.pk).count() == 0
    assert Node.objects.record_worker_api(node.pk, available=True, address="10.0.0.1:1", now=now)
    assert Node.objects.candidates().filter(pk=node.pk).count() == 1
    # an answer about an address the node no longer has is not about this node
    assert not Node.objects.record_worker_api(node.pk, available=False, detail="x", address="10.0.0.2:1", now=now)
    node.refresh_from_db()
    assert (node.worker_api, node.worker_api_detail) == (Node.WorkerApi.AVAILABLE, "")
