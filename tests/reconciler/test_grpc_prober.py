"""The default prober (proto.client) against real in-process gRPC servers."""

import socket
import threading
from concurrent import futures
from datetime import timedelta

import grpc
import pytest
from django.test import override_settings

from core.credentials import backend_token, worker_command_token
from proto import backend_pb2, backend_pb2_grpc, client, worker_pb2, worker_pb2_grpc
from reconciler.models import Event
from reconciler.probes import GrpcProber, probe_outcome
from reconciler.reconcile import reconcile_once
from registry.models import NodeModel
from tests.factories import make_node, make_replica
from tests.reconciler.fakes import FakeScheduler

TOKEN = "fleet-token-for-tests"


class Backend(backend_pb2_grpc.BackendServicer):
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.release = threading.Event()
        self.authorizations = []

    def Health(self, request, context):
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))
        if self.delay:
            self.release.wait(self.delay)
        return backend_pb2.Reply(message=b"OK")


class Worker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, node_id: str, backends):
        self.node_id = node_id
        self.backends = backends
        self.stops = []
        self.metadata = []

    def _check(self, context):
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        if metadata.get("authorization") != f"Bearer {worker_command_token(self.node_id)}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        if metadata.get("x-node-id") not in (None, self.node_id):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "addressed to another node")

    def ListBackends(self, request, context):
        self._check(context)
        return worker_pb2.ListBackendsResponse(node_id=self.node_id, backends=self.backends)

    def StopBackend(self, request, context):
        self._check(context)
        self.stops.append((request.model_name, request.replica_index))
        return worker_pb2.StopBackendResponse(stopped=True)


@pytest.fixture
def serve():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if isinstance(servicer, Backend):
            backend_pb2_grpc.add_BackendServicer_to_server(servicer, server)
        else:
            worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, servicer))
        return f"127.0.0.1:{port}"

    client.close_all_channels()
    yield start
    for server, servicer in servers:
        if isinstance(servicer, Backend):
            servicer.release.set()
        server.stop(grace=None)
    client.close_all_channels()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_probe_classifies_alive_busy_and_unreachable(serve):
    prober = GrpcProber()
    alive = serve(Backend())
    slow = serve(Backend(delay=5))

    assert probe_outcome(prober.probe(alive, node_id="n1", timeout=1)) == "alive"
    assert probe_outcome(prober.probe(slow, node_id="n1", timeout=0.2)) == "busy"
    assert probe_outcome(prober.probe(closed_port(), node_id="n1", timeout=1)) == "unreachable"


@pytest.mark.django_db
@override_settings(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN)
def test_a_pass_with_the_default_prober_reconciles_against_real_servers(serve, now):
    node = make_node(name="gpu-a", now=now, slots=4, address="127.0.0.1:1")
    backend = Backend()
    alive_address = serve(backend)
    dead_address = closed_port()
    worker = Worker(
        str(node.pk),
        [
            worker_pb2.BackendProcess(model_name="llama", replica_index=0, address=alive_address, state=2),
            worker_pb2.BackendProcess(model_name="llama", replica_index=1, address=dead_address, state=2),
            worker_pb2.BackendProcess(model_name="orphan", replica_index=0, address="127.0.0.1:9", state=2),
        ],
    )
    make_node(name="gpu-a", now=now, slots=4, address=serve(worker))  # re-registered where its worker serves
    old = now - timedelta(minutes=1)
    alive = make_replica(node, "llama", 0, address=alive_address, last_probe_at=old, probe_failures=2)
    dead = make_replica(node, "llama", 1, address=dead_address, last_probe_at=old, probe_failures=2)

    summary = reconcile_once(now=now, scheduler=FakeScheduler())

    alive.refresh_from_db()
    assert (alive.probe_failures, alive.last_probe_at) == (0, now)
    assert not NodeModel.objects.filter(pk=dead.pk).exists()  # third unreachable probe
    assert summary.actions["replicas_removed_unreachable"] == 1
    # The worker still lists llama#1 as running although nothing answers at its address: with
    # its row gone it is an orphan like the other one, and is stopped so it can be reloaded.
    assert worker.stops == [("llama", 1), ("orphan", 0)]
    assert all(m.get("x-node-id") == str(node.pk) for m in worker.metadata)
    # Each call carried the node's own credential for its job, never the registration token.
    assert {m.get("authorization") for m in worker.metadata} == {f"Bearer {worker_command_token(node.pk)}"}
    assert set(backend.authorizations) == {f"Bearer {backend_token(node.pk)}"}
    assert Event.objects.filter(kind=Event.Kind.ORPHAN_BACKEND_STOPPED).count() == 2
