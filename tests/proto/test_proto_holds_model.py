"""client.holds_model: the proof a reused backend process must give before it is adopted, against
real in-process gRPC servers answering TokenizeString the ways LocalAI's backends do."""

from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc
import pytest

from proto import backend_pb2, client


class TokenizingBackend:
    """TokenizeString answers ``code`` (OK, or aborts with it); None leaves the method out
    (UNIMPLEMENTED, a backend without a tokenizer). Records each request's ModelIdentity."""

    def __init__(self, code: grpc.StatusCode | None, delay: float = 0.0) -> None:
        self.code = code
        self.delay = delay
        self.identities: list[str] = []
        self.release = threading.Event()

    def tokenize(self, request, context):
        self.identities.append(request.ModelIdentity)
        if self.delay:
            self.release.wait(self.delay)
        if self.code != grpc.StatusCode.OK:
            context.abort(self.code, "model identity mismatch: loaded 'a', requested 'b'")
        return backend_pb2.TokenizationResponse(length=1, tokens=[0])

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {}
        if self.code is not None:
            methods["TokenizeString"] = grpc.unary_unary_rpc_method_handler(
                self.tokenize,
                request_deserializer=backend_pb2.PredictOptions.FromString,
                response_serializer=backend_pb2.TokenizationResponse.SerializeToString,
            )
        return grpc.method_handlers_generic_handler("backend.Backend", methods)


@pytest.fixture
def backend_at():
    servers: list[tuple[grpc.Server, TokenizingBackend]] = []

    def start(code: grpc.StatusCode | None, delay: float = 0.0) -> tuple[str, TokenizingBackend]:
        backend = TokenizingBackend(code, delay)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((backend.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, backend))
        return f"127.0.0.1:{port}", backend

    yield start
    for server, backend in servers:
        backend.release.set()
        server.stop(grace=None)
    client.close_all_channels()


def test_only_an_ok_answer_to_the_identity_carrying_call_is_proof(backend_at):
    address, backend = backend_at(grpc.StatusCode.OK)

    assert client.holds_model(address, "llama.gguf", token="", timeout=2) is True
    assert backend.identities == ["llama.gguf"]


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL, None],
    ids=["identity-mismatch", "not-loaded", "error", "no-tokenize-string"],
)
def test_a_refusal_or_a_missing_method_proves_nothing(backend_at, code):
    address, _ = backend_at(code)

    assert client.holds_model(address, "llama.gguf", token="", timeout=2) is False


def test_a_busy_backend_cannot_tell_yet(backend_at):
    address, _ = backend_at(grpc.StatusCode.OK, delay=5)

    assert client.holds_model(address, "llama.gguf", token="", timeout=0.3) is None


def test_nothing_listening_proves_nothing():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"

    assert client.holds_model(address, "llama.gguf", token="", timeout=2) is False


def test_an_empty_identity_is_never_proof_and_no_call_is_made(backend_at):
    address, backend = backend_at(grpc.StatusCode.OK)

    assert client.holds_model(address, "", token="", timeout=2) is False
    assert backend.identities == []
