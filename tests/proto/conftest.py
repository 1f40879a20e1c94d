"""Real in-process gRPC servers on 127.0.0.1 (ephemeral ports) playing a LocalAI backend and a
worker, built from generic handlers so a test can record raw request bytes and leave methods
out (an absent method answers UNIMPLEMENTED, like an older backend).

Tests get these through fixtures (not ``from conftest import``, which breaks when several
conftest modules exist). No Django needed: tests pass ``token=""``/``timeout=`` explicitly wherever a configured
setting could otherwise change the outcome.
"""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # when pytest runs without the project's pythonpath config
    sys.path.insert(0, str(REPO_ROOT))

from proto import backend_pb2, client, worker_pb2  # noqa: E402

TOKEN = "s3cret-fleet-token"


@dataclass
class FakeBackend:
    """Behaviour knobs and a record of what the backend received."""

    health_reply: bytes = b"OK"
    health_delay: float = 0.0
    load_result: backend_pb2.Result = field(default_factory=lambda: backend_pb2.Result(success=True, message="loaded"))
    implements_free: bool = True
    loaded_model: str = ""  # ModelOptions.Model of the load; inference checks ModelIdentity against it
    load_requests: list[bytes] = field(default_factory=list)
    inference_requests: list[backend_pb2.PredictOptions] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    stream_pause: float = 0.0  # PredictStream waits this long after each chunk
    stream_ended: threading.Event = field(default_factory=threading.Event)

    def _record(self, context) -> None:
        self.metadata.append(dict(context.invocation_metadata()))

    def health(self, request, context):
        self._record(context)
        if self.health_delay:
            self.release.wait(self.health_delay)
        return backend_pb2.Reply(message=self.health_reply)

    def load_model(self, raw: bytes, context):
        self._record(context)
        self.load_requests.append(raw)
        return self.load_result

    def free(self, request, context):
        self._record(context)
        return backend_pb2.Result(success=True)

    def status(self, request, context):
        self._record(context)
        return backend_pb2.StatusResponse(
            state=backend_pb2.StatusResponse.READY,
            memory=backend_pb2.MemoryUsageData(total=123, breakdown={"weights": 100}),
        )

    def _check_identity(self, request, context) -> None:
        """As LocalAI's backends: a ModelIdentity other than the loaded Model is NOT_FOUND;
        an empty one skips the check."""
        self._record(context)
        self.inference_requests.append(request)
        if request.ModelIdentity and request.ModelIdentity != self.loaded_model:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model identity mismatch: request for {request.ModelIdentity!r}, loaded {self.loaded_model!r}",
            )

    def predict(self, request, context):
        self._check_identity(request, context)
        return backend_pb2.Reply(message=f"echo:{request.Prompt}".encode(), tokens=3)

    def predict_stream(self, request, context):
        self._check_identity(request, context)
        context.add_callback(self.stream_ended.set)  # runs when the call ends, also on cancel
        for word in request.Prompt.split():
            yield backend_pb2.Reply(message=word.encode(), tokens=1)
            if self.stream_pause:
                self.release.wait(self.stream_pause)

    def embedding(self, request, context):
        self._check_identity(request, context)
        return backend_pb2.EmbeddingResult(embeddings=[float(len(request.Embeddings)), 0.5])

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, request_cls, response_cls):
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=request_cls.FromString if request_cls else None,
                response_serializer=response_cls.SerializeToString,
            )

        methods = {
            "Health": unary(self.health, backend_pb2.HealthMessage, backend_pb2.Reply),
            # request_deserializer=None: the servicer gets the raw bytes off the wire.
            "LoadModel": unary(self.load_model, None, backend_pb2.Result),
            "Status": unary(self.status, backend_pb2.HealthMessage, backend_pb2.StatusResponse),
            "Predict": unary(self.predict, backend_pb2.PredictOptions, backend_pb2.Reply),
            "Embedding": unary(self.embedding, backend_pb2.PredictOptions, backend_pb2.EmbeddingResult),
            "PredictStream": grpc.unary_stream_rpc_method_handler(
                self.predict_stream,
                request_deserializer=backend_pb2.PredictOptions.FromString,
                response_serializer=backend_pb2.Reply.SerializeToString,
            ),
        }
        if self.implements_free:
            methods["Free"] = unary(self.free, backend_pb2.HealthMessage, backend_pb2.Result)
        return grpc.method_handlers_generic_handler("backend.Backend", methods)


@dataclass
class FakeWorker:
    node_id: str = "node-1"
    requests: list[tuple[str, object]] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def _wrap(self, name, fn):
        def handle(request, context):
            metadata = dict(context.invocation_metadata())
            self.metadata.append(metadata)
            self.requests.append((name, request))
            if metadata.get("x-node-id") not in (None, self.node_id):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "addressed to another node")
            return fn(request)

        return handle

    def handler(self) -> grpc.GenericRpcHandler:
        w = worker_pb2

        def start(req):
            return w.StartBackendResponse(address="127.0.0.1:50123", reused=False, pid=4242)

        def stop(req):
            return w.StopBackendResponse(stopped=req.model_name == "llama")

        def unload(req):
            return w.UnloadModelResponse(stopped=2)

        def listing(req):
            return w.ListBackendsResponse(
                node_id=self.node_id,
                backends=[w.BackendProcess(model_name="llama", state=w.BackendProcess.RUNNING)],
            )

        table = {
            "StartBackend": (start, w.StartBackendRequest, w.StartBackendResponse),
            "StopBackend": (stop, w.StopBackendRequest, w.StopBackendResponse),
            "UnloadModel": (unload, w.UnloadModelRequest, w.UnloadModelResponse),
            "ListBackends": (listing, w.ListBackendsRequest, w.ListBackendsResponse),
        }
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (fn, req, resp) in table.items()
        }
        return grpc.method_handlers_generic_handler("controlplane.worker.v1.Worker", methods)


class RequireBearer(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED unless `authorization: Bearer <token>` is present, as LocalAI
    backends started with LOCALAI_GRPC_AUTH_TOKEN do."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return continuation(handler_call_details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


@pytest.fixture
def serve():
    """serve(handler, interceptors=()) -> "127.0.0.1:<port>"; servers stop at teardown."""
    started: list[tuple[grpc.Server, object]] = []

    def start(fake, interceptors=()):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        server.add_generic_rpc_handlers((fake.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, fake))
        return f"127.0.0.1:{port}"

    yield start
    for server, fake in started:
        release = getattr(fake, "release", None)
        if release is not None:
            release.set()  # wake handlers still sleeping past a client deadline
        server.stop(grace=None)


@pytest.fixture
def fleet_token() -> str:
    return TOKEN


@pytest.fixture
def fake_backend():
    """Factory: fake_backend(**knobs) -> FakeBackend (see its fields)."""
    return FakeBackend


@pytest.fixture
def fake_worker():
    """Factory: fake_worker(node_id=...) -> FakeWorker."""
    return FakeWorker


@pytest.fixture
def require_bearer():
    """Factory: require_bearer() -> a server interceptor demanding the fleet token."""
    return lambda token=TOKEN: RequireBearer(token)


@pytest.fixture(autouse=True)
def _fresh_channels():
    client.close_all_channels()
    yield
    client.close_all_channels()
