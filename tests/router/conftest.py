"""A fake fleet on real gRPC: in-process Worker and Backend servicers on 127.0.0.1 ephemeral
ports, registered as nodes through the registry verbs.

``fleet.add_node(...)`` registers a node whose address is a fake worker; the worker's
StartBackend starts (or reuses) a fake backend server per (model, replica) and returns its
address, as the reference worker does. Both count every call so tests can assert "exactly one
LoadModel". Load jobs run inline (in the claiming thread) unless a test says otherwise.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from core.credentials import backend_token, worker_command_token
from proto import backend_pb2, client, codec, worker_pb2
from tests.factories import GIB, make_node


def options_blob(model: str = "llama.gguf", vram: int | None = None, **fields) -> bytes:
    """A serialized ModelOptions; ``vram`` becomes the ``vram_bytes=`` placement hint."""
    message = backend_pb2.ModelOptions(Model=model, **fields)
    if vram is not None:
        message.Options.append(f"vram_bytes={vram}")
    return codec.options_to_blob(message)


@dataclass
class BackendKnobs:
    """How a fake backend behaves. ``health``: "ok", "busy" (sleeps past the deadline) or
    "loading" (answers a non-OK message). ``tokenize=False``: a backend without TokenizeString
    (UNIMPLEMENTED)."""

    load_success: bool = True
    load_message: str = "loaded"
    load_delay: float = 0.0
    health: str = "ok"
    tokenize: bool = True


class FakeBackend:
    """LocalAI's behaviour where it matters to the router: ``Status`` says READY whenever idle,
    loaded or not; ``TokenizeString`` judges ``ModelIdentity`` against the ``Model`` of the last
    successful load (NOT_FOUND on a mismatch, skipped when either side is empty) and fails with
    FAILED_PRECONDITION before a load."""

    def __init__(self, knobs: BackendKnobs, token: str | None = None) -> None:
        self.knobs = knobs
        self.token = token  # the bearer token required (its node's backend token); None: any
        self.authorizations: list[str | None] = []  # what every call presented
        self.load_requests: list[bytes] = []
        self.health_calls = 0
        self.tokenize_identities: list[str] = []
        self.loaded = False
        self.identity = ""
        self.release = threading.Event()
        self._lock = threading.Lock()

    def health(self, request, context):
        with self._lock:
            self.health_calls += 1
        if self.knobs.health == "busy":
            self.release.wait(5)
        if self.knobs.health == "loading":
            return backend_pb2.Reply(message=b"LOADING")
        return backend_pb2.Reply(message=b"OK")

    def load_model(self, raw: bytes, context):
        with self._lock:
            self.load_requests.append(raw)
        if self.knobs.load_delay:
            time.sleep(self.knobs.load_delay)
        if self.knobs.load_success:
            self.loaded = True
            self.identity = backend_pb2.ModelOptions.FromString(raw).Model
        return backend_pb2.Result(success=self.knobs.load_success, message=self.knobs.load_message)

    def status(self, request, context):
        return backend_pb2.StatusResponse(state=backend_pb2.StatusResponse.READY)

    def tokenize_string(self, request, context):
        with self._lock:
            self.tokenize_identities.append(request.ModelIdentity)
        if not self.knobs.tokenize:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        if request.ModelIdentity and self.identity and request.ModelIdentity != self.identity:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model identity mismatch: loaded {self.identity!r}, requested {request.ModelIdentity!r}",
            )
        if not self.loaded:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model not loaded")
        return backend_pb2.TokenizationResponse(length=1, tokens=[0])

    def _checked(self, method):
        """``method`` behind the bearer check a backend started with LOCALAI_GRPC_AUTH_TOKEN does."""

        def call(request, context):
            presented = dict(context.invocation_metadata()).get("authorization")
            with self._lock:
                self.authorizations.append(presented)
            if self.token is not None and presented != f"Bearer {self.token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            return method(request, context)

        return call

    def handler(self):
        def unary(method, **kwargs):
            return grpc.unary_unary_rpc_method_handler(self._checked(method), **kwargs)

        return grpc.method_handlers_generic_handler(
            "backend.Backend",
            {
                "Health": unary(
                    self.health,
                    request_deserializer=backend_pb2.HealthMessage.FromString,
                    response_serializer=backend_pb2.Reply.SerializeToString,
                ),
                # Raw bytes in: the test sees exactly what the control plane sent.
                "LoadModel": unary(self.load_model, response_serializer=backend_pb2.Result.SerializeToString),
                "Status": unary(
                    self.status,
                    request_deserializer=backend_pb2.HealthMessage.FromString,
                    response_serializer=backend_pb2.StatusResponse.SerializeToString,
                ),
                "TokenizeString": unary(
                    self.tokenize_string,
                    request_deserializer=backend_pb2.PredictOptions.FromString,
                    response_serializer=backend_pb2.TokenizationResponse.SerializeToString,
                ),
            },
        )


class FakeWorker:
    """The Worker service of one node. ``start_error``: a grpc.StatusCode StartBackend aborts
    with (None = start normally)."""

    def __init__(self, servers: Servers, knobs: BackendKnobs) -> None:
        self.servers = servers
        self.knobs = knobs
        self.node_id: str | None = None
        self.start_error: grpc.StatusCode | None = None
        self.backends: dict[tuple[str, int], tuple[FakeBackend, str, grpc.Server]] = {}
        self.started_backends: list[FakeBackend] = []  # every backend ever started, stopped ones too
        self.calls: list[tuple[str, object]] = []
        self.authorizations: list[str | None] = []
        # Backend processes started some other way that ListBackends reports, (model, replica) -> address.
        self.external: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    @property
    def load_requests(self) -> list[bytes]:
        return [raw for backend in self.started_backends for raw in backend.load_requests]

    def backend(self, model_name: str, replica_index: int = 0) -> FakeBackend:
        return self.backends[(model_name, replica_index)][0]

    def _check(self, name, request, context):
        metadata = dict(context.invocation_metadata())
        with self._lock:
            self.calls.append((name, request))
            self.authorizations.append(metadata.get("authorization"))
        # As the reference worker: only the command token the registration answer handed over.
        if self.node_id and metadata.get("authorization") != f"Bearer {worker_command_token(self.node_id)}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if self.node_id and metadata.get("x-node-id") not in (None, self.node_id):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "addressed to another node")

    def start(self, request, context):
        self._check("StartBackend", request, context)
        if self.start_error is not None:
            context.abort(self.start_error, "backend exited during start")
        address, reused = self.launch(request.model_name, request.replica_index)
        return worker_pb2.StartBackendResponse(address=address, reused=reused, pid=1)

    def launch(self, model_name: str, replica_index: int = 0) -> tuple[str, bool]:
        """Start (or reuse) the backend of a replica, as StartBackend does; ``(address, reused)``."""
        key = (model_name, replica_index)
        with self._lock:
            if key in self.backends:
                return self.backends[key][1], True
            backend = FakeBackend(BackendKnobs(**vars(self.knobs)), token=backend_token(self.node_id))
            server, address = self.servers.start(backend.handler())
            self.backends[key] = (backend, address, server)
            self.started_backends.append(backend)
        return address, False

    def list_backends(self, request, context):
        self._check("ListBackends", request, context)
        with self._lock:
            running = [
                worker_pb2.BackendProcess(
                    model_name=model_name,
                    replica_index=replica_index,
                    address=address,
                    state=worker_pb2.BackendProcess.RUNNING,
                )
                for (model_name, replica_index), address in [
                    *((key, entry[1]) for key, entry in self.backends.items()),
                    *self.external.items(),
                ]
            ]
        return worker_pb2.ListBackendsResponse(node_id=self.node_id or "", backends=running)

    def stop(self, request, context):
        self._check("StopBackend", request, context)
        with self._lock:
            entry = self.backends.pop((request.model_name, request.replica_index), None)
        if entry is not None:
            entry[0].release.set()
            entry[2].stop(grace=None)
        return worker_pb2.StopBackendResponse(stopped=entry is not None)

    def handler(self):
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            "controlplane.worker.v1.Worker",
            {
                "StartBackend": unary(
                    self.start,
                    request_deserializer=worker_pb2.StartBackendRequest.FromString,
                    response_serializer=worker_pb2.StartBackendResponse.SerializeToString,
                ),
                "StopBackend": unary(
                    self.stop,
                    request_deserializer=worker_pb2.StopBackendRequest.FromString,
                    response_serializer=worker_pb2.StopBackendResponse.SerializeToString,
                ),
                "ListBackends": unary(
                    self.list_backends,
                    request_deserializer=worker_pb2.ListBackendsRequest.FromString,
                    response_serializer=worker_pb2.ListBackendsResponse.SerializeToString,
                ),
            },
        )


class Servers:
    """Every gRPC server a test started; all stopped at teardown."""

    def __init__(self) -> None:
        self.started: list[grpc.Server] = []

    def start(self, handler) -> tuple[grpc.Server, str]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.started.append(server)
        return server, f"127.0.0.1:{port}"

    def stop_all(self) -> None:
        for server in self.started:
            server.stop(grace=None)


@dataclass
class FleetNode:
    node: object
    worker: FakeWorker
    address: str


@dataclass
class Fleet:
    servers: Servers
    nodes: list[FleetNode] = field(default_factory=list)

    def add_node(self, name: str, *, slots: int = 1, total_vram: int = 24 * GIB, labels=None, **knobs) -> FleetNode:
        worker = FakeWorker(self.servers, BackendKnobs(**knobs))
        _, address = self.servers.start(worker.handler())
        node = make_node(name=name, slots=slots, total_vram=total_vram, labels=labels, address=address)
        worker.node_id = str(node.pk)
        entry = FleetNode(node=node, worker=worker, address=address)
        self.nodes.append(entry)
        return entry

    def backend_server(self, *, token: str | None = None, **knobs) -> tuple[FakeBackend, str]:
        """A lone fake backend (for replica rows created directly in a test); ``token``: the
        bearer token it requires (None: any)."""
        backend = FakeBackend(BackendKnobs(**knobs), token=token)
        _, address = self.servers.start(backend.handler())
        return backend, address


@pytest.fixture
def fleet():
    servers = Servers()
    yield Fleet(servers)
    servers.stop_all()
    client.close_all_channels()


@pytest.fixture(autouse=True)
def _router_settings(settings):
    settings.CONTROLPLANE_LOAD_JOB_RUNNER = "inline"
    settings.LOAD_JOB_HEARTBEAT_INTERVAL = 0
    settings.GRPC_HEALTH_TIMEOUT = 0.5
    settings.GRPC_LOAD_TIMEOUT = 10
    settings.CONTROLPLANE_REGISTRATION_TOKEN = "router-tests-token"
    client.close_all_channels()
    yield
    client.close_all_channels()


@pytest.fixture
def closed_address() -> str:
    """A 127.0.0.1 port nothing listens on (bound then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"
