"""cpclient against the real app (pytest-django's live_server, the router's inline load-job
runner, fake workers and backends on real gRPC), and its retry rules against a stub server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

import tests.router.conftest as router_fleet
from core.credentials import backend_token
from cpclient import (
    AuthenticationError,
    ConflictError,
    ControlPlaneClient,
    DeadlineExceeded,
    Lease,
    LoadFailed,
    NotFoundError,
    TransportError,
    UnavailableError,
    ValidationError,
)
from proto import backend_pb2
from proto import client as proto_client
from proto.client import GrpcCallError
from registry.models import Lease as LeaseRow
from registry.models import NodeModel
from tests.factories import make_api_key
from tests.processes import free_port
from worker.backends import echo

OPTIONS = {"Model": "client-model.gguf", "ContextSize": 512}


@pytest.fixture
def cp(live_server, transactional_db):
    _, secret = make_api_key("frontend")
    return ControlPlaneClient(live_server.url, secret, timeout=20)


def released(lease: Lease) -> bool:
    return LeaseRow.objects.get(pk=lease.lease_id).released_at is not None


def test_the_lease_context_manager_releases_on_exit_and_on_exceptions(cp, fleet):
    entry = fleet.add_node("client-a", slots=2)
    with cp.lease("client-model", backend_type="echo", model_options=OPTIONS, wait_seconds=10) as lease:
        assert lease.node_name == "client-a"
        assert lease.address == entry.worker.backends[("client-model", 0)][1]
        assert not released(lease)
        row = NodeModel.objects.get(model_name="client-model")
        assert row.in_flight == 1
    assert released(lease)
    assert NodeModel.objects.get(model_name="client-model").in_flight == 0
    assert entry.worker.count("StartBackend") == 1

    with pytest.raises(RuntimeError, match="inference failed"):
        with cp.lease("client-model") as second:
            raise RuntimeError("inference failed")
    assert released(second)
    assert second.lease_id != lease.lease_id


def test_renew_release_and_their_problem_codes(cp, fleet):
    fleet.add_node("client-b")
    lease = cp.route("client-model", backend_type="echo", model_options=OPTIONS, wait_seconds=10)
    assert cp.renew(lease, ttl_seconds=60) is not None
    assert cp.release(lease) is True
    assert cp.release(lease.lease_id) is False
    with pytest.raises(ConflictError) as gone:
        cp.renew(lease)
    assert gone.value.code == "lease_released"
    assert gone.value.status == 409


def test_load_info_model_and_replica_reports(cp, fleet):
    entry = fleet.add_node("client-c", slots=2)
    with pytest.raises(NotFoundError) as missing:
        cp.get_load_info("client-model")
    assert missing.value.code
    stored = cp.put_load_info("client-model", "echo", model_options=OPTIONS)
    assert stored.backend_type == "echo"
    assert cp.get_load_info("client-model").model_options["ContextSize"] == 512

    address, _ = entry.worker.launch("client-model", 1)  # the node's worker runs it
    replica = cp.report_replica(
        node_id=str(entry.node.pk),
        model="client-model",
        replica_index=1,
        address=address,
        backend_type="echo",
        model_options_b64=stored.model_options_b64,
    )
    assert replica["state"] == "loaded"
    assert cp.get_model("client-model")["model_name"] == "client-model"
    with pytest.raises(ValidationError) as invalid:
        cp.report_replica(
            node_id="not-a-uuid", model="m", replica_index=0, address="a:1", backend_type="echo", model_options={}
        )
    assert invalid.value.code == "validation_error"


def test_a_bad_key_is_an_authentication_error_with_its_code(live_server, transactional_db):
    client = ControlPlaneClient(live_server.url, "cpk_wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as denied:
        client.get_model("anything")
    assert denied.value.code == "invalid_token"


# --- calling the leased replica with its model identity --------------------------------------


class InferenceBackend(router_fleet.FakeBackend):
    """The router tests' fake backend plus Predict, PredictStream and Embedding that record
    each request and check ``ModelIdentity`` as LocalAI's backends do: against the ``Model``
    of the LoadModel served (or ``loaded_model`` for a backend nobody loads in the test);
    another identity is NOT_FOUND "model identity mismatch", an empty one skips the check."""

    def __init__(self, knobs, loaded_model: str = "", token: str | None = None) -> None:
        super().__init__(knobs, token=token)
        self.loaded_model = loaded_model
        self.inference_requests: list[backend_pb2.PredictOptions] = []

    def load_model(self, raw, context):
        self.loaded_model = backend_pb2.ModelOptions.FromString(raw).Model
        return super().load_model(raw, context)

    def _check(self, request, context):
        self.inference_requests.append(request)
        if request.ModelIdentity and request.ModelIdentity != self.loaded_model:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model identity mismatch: loaded {self.loaded_model!r}")

    def predict(self, request, context):
        self._check(request, context)
        return backend_pb2.Reply(message=request.Prompt.encode())

    def predict_stream(self, request, context):
        self._check(request, context)
        for word in request.Prompt.split():
            yield backend_pb2.Reply(message=word.encode())

    def embedding(self, request, context):
        self._check(request, context)
        return backend_pb2.EmbeddingResult(embeddings=[float(len(request.Embeddings))])

    def handler(self):
        def unary(method, response_cls):
            return grpc.unary_unary_rpc_method_handler(
                self._checked(method),
                request_deserializer=backend_pb2.PredictOptions.FromString,
                response_serializer=response_cls.SerializeToString,
            )

        inference = grpc.method_handlers_generic_handler(
            "backend.Backend",
            {
                "Predict": unary(self.predict, backend_pb2.Reply),
                "Embedding": unary(self.embedding, backend_pb2.EmbeddingResult),
                "PredictStream": grpc.unary_stream_rpc_method_handler(
                    self._checked(self.predict_stream),
                    request_deserializer=backend_pb2.PredictOptions.FromString,
                    response_serializer=backend_pb2.Reply.SerializeToString,
                ),
            },
        )
        return FirstOf(inference, super().handler())


class FirstOf(grpc.GenericRpcHandler):
    """The first of several generic handlers that serves a method."""

    def __init__(self, *handlers) -> None:
        self.handlers = handlers

    def service(self, handler_call_details):
        for handler in self.handlers:
            found = handler.service(handler_call_details)
            if found is not None:
                return found
        return None


@pytest.fixture
def inference_fleet(fleet, monkeypatch):
    """The fake fleet whose workers start :class:`InferenceBackend` processes."""
    monkeypatch.setattr(router_fleet, "FakeBackend", InferenceBackend)
    return fleet


def test_a_lease_calls_its_replica_with_the_identity_the_replica_was_loaded_with(cp, inference_fleet):
    entry = inference_fleet.add_node("client-d")

    with cp.lease("client-model", backend_type="echo", model_options=OPTIONS, wait_seconds=10) as lease:
        reply = lease.predict("hello there", Tokens=4)
        chunks = [chunk.message for chunk in lease.predict_stream("one two")]
        embedded = lease.embedding("four")

    backend = entry.worker.backend("client-model")
    (loaded,) = backend.load_requests
    assert lease.model_identity == backend_pb2.ModelOptions.FromString(loaded).Model == "client-model.gguf"
    assert [r.ModelIdentity for r in backend.inference_requests] == ["client-model.gguf"] * 3
    assert (backend.inference_requests[0].Prompt, backend.inference_requests[0].Tokens) == ("hello there", 4)
    assert (reply.message, chunks, list(embedded.embeddings)) == (b"hello there", [b"one", b"two"], [4.0])
    assert lease.predict_options(TopK=3) == backend_pb2.PredictOptions(TopK=3, ModelIdentity="client-model.gguf")
    with pytest.raises(TypeError, match="ModelIdentity"):
        lease.predict("x", ModelIdentity="something-else")


def test_a_replica_now_serving_another_model_refuses_the_leases_request(cp, inference_fleet):
    """A recycled port: the row says client-model, the process there holds another model. The
    identity the lease sends makes the backend refuse instead of answering from that model."""
    entry = inference_fleet.add_node("client-e")
    address, _ = entry.worker.launch("client-model", 0)
    stranger = entry.worker.backend("client-model")
    stranger.loaded_model = "someone-else.gguf"  # what the process at that port holds now
    cp.report_replica(
        node_id=str(entry.node.pk),
        model="client-model",
        replica_index=0,
        address=address,
        backend_type="echo",
        model_options=OPTIONS,
    )

    with cp.lease("client-model") as lease:
        assert lease.address == address
        with pytest.raises(GrpcCallError) as refused:
            lease.predict("hello")

    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert "model identity mismatch" in refused.value.detail
    assert [r.ModelIdentity for r in stranger.inference_requests] == ["client-model.gguf"]


def test_the_echo_backend_serves_a_leases_calls_once_loaded(cp, fleet):
    """The reference worker's echo backend (in process, real gRPC) loaded with the recipe, then
    reported: the lease's calls, identity included, are answered."""
    entry = fleet.add_node("client-f")
    address = f"127.0.0.1:{free_port()}"
    token = backend_token(entry.node.pk)  # as the reference worker starts it: the node's backend token
    server = echo.serve(address, token=token)
    entry.worker.external[("client-model", 0)] = address  # the worker lists it as its own
    try:
        assert proto_client.load_model(address, backend_pb2.ModelOptions(**OPTIONS), token=token, timeout=5)[0]
        cp.report_replica(
            node_id=str(entry.node.pk),
            model="client-model",
            replica_index=0,
            address=address,
            backend_type="echo",
            model_options=OPTIONS,
        )
        with cp.lease("client-model") as lease:
            assert lease.model_identity == "client-model.gguf"
            # The lease carries the node's backend token and its calls present it by default.
            assert lease.backend_token == token and token not in repr(lease)
            assert lease.predict("hello echo").message == b"hello echo"
            assert b"".join(chunk.message for chunk in lease.predict_stream("a b")) == b"a b"
            assert len(lease.embedding("hello").embeddings) > 0
            with pytest.raises(GrpcCallError) as refused:
                lease.predict("hello echo", token="")
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=None)
        proto_client.close_channel(address)


# --- retries, against a stub --------------------------------------------------------------
# A stub rather than the app: the app answers 503 or 202 only while its database or a load is
# failing or slow, which a test cannot sequence exactly; the stub plays a fixed sequence of
# answers and records what the client asked, so the waits can be asserted to the second.

LEASE = {
    "lease_id": "3f1c3c1e-0000-4000-8000-000000000001",
    "model_name": "m",
    "node_id": "3f1c3c1e-0000-4000-8000-0000000000aa",
    "node_name": "stub-node",
    "address": "10.0.0.1:9000",
    "replica_index": 0,
    "expires_at": "2026-11-26T12:10:00Z",
}


class Stub:
    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[tuple[str, str, dict | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.requests.append((self.command, self.path, body))
                status, headers, payload = stub.answers.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(status)
                content_type = "application/problem+json" if status >= 400 else "application/json"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    made = []

    def make(*answers):
        made.append(Stub(answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


def unavailable(retry_after="2"):
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return 503, headers, {"status": 503, "code": "database_unavailable", "detail": "try later"}


def client_for(server, **kwargs):
    slept: list[float] = []
    return ControlPlaneClient(server.url, "cpk_test", sleep=slept.append, **kwargs), slept


def test_route_retries_503_honouring_retry_after(stub):
    server = stub(unavailable("2"), unavailable("3"), (200, {}, LEASE))
    client, slept = client_for(server)
    lease = client.route("m", wait_seconds=5)
    assert lease == Lease.from_json(LEASE)
    assert slept == [2.0, 3.0]
    assert [path for _, path, _ in server.requests] == ["/api/v1/models/m/route"] * 3
    assert server.requests[0][2] == {"wait_seconds": 5}


def test_route_sends_the_affinity_key_when_given(stub):
    server = stub((200, {}, LEASE), (200, {}, LEASE))
    client, _ = client_for(server)
    client.route("m", wait_seconds=5, affinity_key="session-9")
    client.route("m", wait_seconds=5)
    assert server.requests[0][2] == {"wait_seconds": 5, "affinity_key": "session-9"}
    assert server.requests[1][2] == {"wait_seconds": 5}


def test_a_lease_answer_without_model_identity_reads_as_none_to_send():
    """An older control plane's answer has no model_identity: send none (no check)."""
    assert Lease.from_json(LEASE).model_identity == ""
    assert Lease.from_json({**LEASE, "model_identity": "m.gguf"}).model_identity == "m.gguf"


def test_503_without_retry_after_backs_off_exponentially_and_gives_up(stub):
    server = stub(*[unavailable(None)] * 4)
    client, slept = client_for(server, max_retries=3, backoff_base=1.0, backoff_max=3.0)
    with pytest.raises(UnavailableError) as gave_up:
        client.get_model("m")
    assert gave_up.value.code == "database_unavailable"
    assert len(slept) == 3
    assert 0.5 <= slept[0] <= 1.0 and 1.0 <= slept[1] <= 2.0 and 1.5 <= slept[2] <= 3.0


def test_a_retry_after_past_the_deadline_is_not_waited_for(stub):
    server = stub(unavailable("30"))
    client, slept = client_for(server)
    with pytest.raises(UnavailableError):
        client.route("m", deadline=5)
    assert slept == []


def test_202_polls_the_load_job_then_routes_again(stub):
    job = {"id": "job-1", "state": "running", "model_name": "m"}
    server = stub(
        (202, {"Retry-After": "1"}, {"load_job": job}),
        (200, {}, {**job, "state": "running"}),
        (200, {}, {**job, "state": "succeeded"}),
        (200, {}, LEASE),
    )
    client, slept = client_for(server)
    assert client.route("m", model_options={"Model": "m"}).lease_id == LEASE["lease_id"]
    assert [(method, path) for method, path, _ in server.requests] == [
        ("POST", "/api/v1/models/m/route"),
        ("GET", "/api/v1/load-jobs/job-1"),
        ("GET", "/api/v1/load-jobs/job-1"),
        ("POST", "/api/v1/models/m/route"),
    ]
    assert slept == [1.0, 1.0]


def test_a_failed_load_job_raises_load_failed_with_its_code(stub):
    job = {"id": "job-2", "state": "running"}
    server = stub(
        (202, {"Retry-After": "0"}, {"load_job": job}),
        (200, {}, {**job, "state": "failed", "error_code": "no_capacity", "error_message": "full"}),
    )
    client, _ = client_for(server)
    with pytest.raises(LoadFailed) as failed:
        client.route("m")
    assert failed.value.code == "no_capacity"


def test_route_stops_at_its_deadline(stub):
    now = [0.0]
    job = {"id": "job-3", "state": "running"}
    server = stub((202, {"Retry-After": "5"}, {"load_job": job}), (200, {}, job), (200, {}, job))

    def sleep(seconds):
        now[0] += seconds

    client = ControlPlaneClient(server.url, "k", sleep=sleep, clock=lambda: now[0])
    with pytest.raises(DeadlineExceeded):
        client.route("m", deadline=8)
    assert now[0] == 8


def test_model_names_with_slashes_keep_them_in_the_path(stub):
    server = stub((200, {}, {"model_name": "org/m"}))
    client, _ = client_for(server)
    client.get_model("org/m v2")
    assert server.requests[0][1] == "/api/v1/models/org/m%20v2"


def test_an_unreachable_control_plane_is_a_transport_error():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slept = []
    client = ControlPlaneClient(f"http://127.0.0.1:{port}", "k", sleep=slept.append, max_retries=2)
    with pytest.raises(TransportError):
        client.get_model("m")
    assert len(slept) == 2  # reads are retried
    with pytest.raises(TransportError):
        client.route("m")
    assert len(slept) == 2  # a route call is not repeated blindly
