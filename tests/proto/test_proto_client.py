"""proto.client against real in-process gRPC servers."""

from __future__ import annotations

import os
import socket
import time

import grpc
import pytest

from proto import backend_pb2, channels, client


def closed_port_address() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


def blob_with_unknown_field_between_known_ones() -> bytes:
    """Model (1), then field 199 (declared by no LocalAI yet), then DisableLogStatus (66).

    A parse + re-serialize would move field 199 after the known fields, so an exact match on
    the server side proves the client sent the bytes untouched.
    """
    assert 199 not in backend_pb2.ModelOptions.DESCRIPTOR.fields_by_number
    model = backend_pb2.ModelOptions(Model="llama.gguf").SerializeToString()
    future_field = bytes([0xBA, 0x0C, 0x03, 0x0A, 0x01, 0x78])  # field 199, len 3, {1:"x"}
    disable_log_status = bytes([0x90, 0x04, 0x01])  # field 66 varint true
    return model + future_field + disable_log_status


# --- probe ------------------------------------------------------------------------------------


def test_probe_reports_alive_when_health_says_ok(serve, fake_backend):
    address = serve(fake_backend())

    result = client.probe(address, token="", timeout=2)

    assert result.outcome is client.Probe.ALIVE
    assert result.code == grpc.StatusCode.OK


def test_probe_reports_busy_when_health_answers_something_else(serve, fake_backend):
    address = serve(fake_backend(health_reply=b"LOADING"))

    result = client.probe(address, token="", timeout=2)

    assert result.outcome is client.Probe.BUSY
    assert result.code == grpc.StatusCode.OK
    assert "LOADING" in result.detail


def test_probe_reports_busy_within_the_deadline_when_health_is_stuck(serve, fake_backend):
    address = serve(fake_backend(health_delay=3.0))

    started = time.monotonic()
    result = client.probe(address, token="", timeout=0.3)
    elapsed = time.monotonic() - started

    assert result.outcome is client.Probe.BUSY
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.0


def test_probe_reports_unreachable_quickly_for_a_closed_port():
    started = time.monotonic()
    result = client.probe(closed_port_address(), token="", timeout=2)
    elapsed = time.monotonic() - started

    assert result.outcome is client.Probe.UNREACHABLE
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1.5


def test_probe_without_token_on_an_auth_backend_is_busy_not_unreachable(serve, fake_backend, require_bearer):
    address = serve(fake_backend(), interceptors=(require_bearer(),))

    result = client.probe(address, token="", timeout=2)

    assert result.outcome is client.Probe.BUSY
    assert result.code == grpc.StatusCode.UNAUTHENTICATED


def test_probe_with_token_on_an_auth_backend_is_alive(serve, fake_backend, require_bearer, fleet_token):
    address = serve(fake_backend(), interceptors=(require_bearer(),))

    assert client.probe(address, token=fleet_token, timeout=2).outcome is client.Probe.ALIVE


def test_probe_against_a_server_without_health_is_busy(serve, fake_worker):
    address = serve(fake_worker())  # answers, but backend.Backend is UNIMPLEMENTED there

    result = client.probe(address, token="", timeout=2)

    assert result.outcome is client.Probe.BUSY
    assert result.code == grpc.StatusCode.UNIMPLEMENTED


# --- backend calls ----------------------------------------------------------------------------


def test_load_model_without_token_raises_unauthenticated(serve, fake_backend, require_bearer):
    address = serve(fake_backend(), interceptors=(require_bearer(),))

    with pytest.raises(client.GrpcCallError) as excinfo:
        client.load_model(address, backend_pb2.ModelOptions(Model="m"), token="", timeout=2)

    assert excinfo.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert excinfo.value.method == "/backend.Backend/LoadModel"
    assert not isinstance(excinfo.value, client.BackendUnavailable)


def test_load_model_with_token_succeeds_and_sends_bearer_metadata(serve, fake_backend, require_bearer, fleet_token):
    fake = fake_backend()
    address = serve(fake, interceptors=(require_bearer(),))

    ok, message = client.load_model(address, backend_pb2.ModelOptions(Model="m"), token=fleet_token, timeout=2)

    assert (ok, message) == (True, "loaded")
    assert fake.metadata[-1]["authorization"] == f"Bearer {fleet_token}"


def test_load_model_sends_a_stored_blob_byte_for_byte(serve, fake_backend):
    fake = fake_backend()
    address = serve(fake)
    blob = blob_with_unknown_field_between_known_ones()

    client.load_model(address, blob, token="", timeout=2)
    client.load_model(address, memoryview(blob), token="", timeout=2)

    assert fake.load_requests == [blob, blob]


def test_load_model_returns_the_backends_failure_reason(serve, fake_backend):
    fake = fake_backend(load_result=backend_pb2.Result(success=False, message="no such file"))
    address = serve(fake)

    assert client.load_model(address, b"", token="", timeout=2) == (False, "no such file")


def test_load_model_on_a_closed_port_raises_backend_unavailable():
    with pytest.raises(client.BackendUnavailable) as excinfo:
        client.load_model(closed_port_address(), b"", token="", timeout=2)

    assert excinfo.value.code == grpc.StatusCode.UNAVAILABLE


def test_free_returns_false_when_backend_does_not_implement_it(serve, fake_backend):
    address = serve(fake_backend(implements_free=False))

    assert client.free(address, token="", timeout=2) is False


def test_free_returns_true_when_backend_frees(serve, fake_backend):
    address = serve(fake_backend())

    assert client.free(address, token="", timeout=2) is True


def test_status_predict_and_embedding_round_trip(serve, fake_backend):
    address = serve(fake_backend())

    status = client.status(address, token="", timeout=2)
    reply = client.predict(address, "hi", options=backend_pb2.PredictOptions(Tokens=5), token="", timeout=2)
    embedded = client.embedding(address, "four", token="", timeout=2)

    assert status.state == backend_pb2.StatusResponse.READY
    assert dict(status.memory.breakdown) == {"weights": 100}
    assert reply.message == b"echo:hi"
    assert list(embedded.embeddings) == [4.0, 0.5]


def test_inference_calls_send_the_model_identity(serve, fake_backend):
    fake = fake_backend(loaded_model="llama.gguf")
    address = serve(fake)
    kw = {"model_identity": "llama.gguf", "token": "", "timeout": 2}

    reply = client.predict(address, "hi", options=backend_pb2.PredictOptions(Tokens=5), **kw)
    chunks = list(client.predict_stream(address, "one two three", **kw))
    embedded = client.embedding(address, "four", **kw)

    assert reply.message == b"echo:hi"
    assert [chunk.message for chunk in chunks] == [b"one", b"two", b"three"]
    assert list(embedded.embeddings) == [4.0, 0.5]
    assert [r.ModelIdentity for r in fake.inference_requests] == ["llama.gguf"] * 3
    assert (fake.inference_requests[0].Prompt, fake.inference_requests[0].Tokens) == ("hi", 5)
    assert fake.inference_requests[2].Embeddings == "four"


def test_without_an_identity_the_options_own_is_kept_and_none_means_none(serve, fake_backend):
    fake = fake_backend(loaded_model="llama.gguf")
    address = serve(fake)

    client.predict(address, "a", options=backend_pb2.PredictOptions(ModelIdentity="llama.gguf"), token="", timeout=2)
    client.predict(address, "b", token="", timeout=2)

    assert [r.ModelIdentity for r in fake.inference_requests] == ["llama.gguf", ""]


@pytest.mark.parametrize("call", ["predict", "predict_stream", "embedding"])
def test_an_identity_mismatch_is_a_not_found_call_error(serve, fake_backend, call):
    address = serve(fake_backend(loaded_model="other.gguf"))

    with pytest.raises(client.GrpcCallError) as excinfo:
        answer = getattr(client, call)(address, "hi", model_identity="llama.gguf", token="", timeout=2)
        list(answer) if call == "predict_stream" else None

    assert excinfo.value.code == grpc.StatusCode.NOT_FOUND
    assert "model identity mismatch" in excinfo.value.detail
    assert excinfo.value.method == f"/backend.Backend/{''.join(p.title() for p in call.split('_'))}"


def test_a_stream_left_early_is_cancelled_not_left_running_to_its_deadline(serve, fake_backend):
    fake = fake_backend(stream_pause=5.0)
    address = serve(fake)

    replies = client.predict_stream(address, "one two three", token="", timeout=10)
    first = next(replies)
    replies.close()

    assert first.message == b"one"
    assert fake.stream_ended.wait(2.0)  # the backend saw the call end long before its pause


# --- worker calls -----------------------------------------------------------------------------


def test_worker_calls_reach_the_worker_with_token_and_node_id(serve, fake_worker, fleet_token):
    fake = fake_worker(node_id="node-1")
    address = serve(fake)
    kw = {"node_id": "node-1", "token": fleet_token, "timeout": 2}

    started = client.start_backend(address, "llama", "llama-cpp", 1, **kw)
    stopped = client.stop_backend(address, "llama", 1, **kw)
    unloaded = client.unload_model(address, "llama", **kw)
    listed = client.list_backends(address, **kw)

    assert (started.address, started.pid, started.reused) == ("127.0.0.1:50123", 4242, False)
    assert stopped.stopped is True
    assert unloaded.stopped == 2
    assert [b.model_name for b in listed.backends] == ["llama"]
    name, request = fake.requests[0]
    assert (name, request.model_name, request.backend_type, request.replica_index) == (
        "StartBackend",
        "llama",
        "llama-cpp",
        1,
    )
    assert [n for n, _ in fake.requests] == [
        "StartBackend",
        "StopBackend",
        "UnloadModel",
        "ListBackends",
    ]
    for metadata in fake.metadata:
        assert metadata["x-node-id"] == "node-1"
        assert metadata["authorization"] == f"Bearer {fleet_token}"


def test_worker_call_for_another_node_raises_failed_precondition(serve, fake_worker):
    address = serve(fake_worker(node_id="node-1"))

    with pytest.raises(client.GrpcCallError) as excinfo:
        client.list_backends(address, node_id="node-2", token="", timeout=2)

    assert excinfo.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert excinfo.value.method == "/controlplane.worker.v1.Worker/ListBackends"


def test_worker_call_without_node_id_sends_no_node_header(serve, fake_worker):
    fake = fake_worker()
    address = serve(fake)

    client.list_backends(address, token="", timeout=2)

    assert "x-node-id" not in fake.metadata[-1]
    assert "authorization" not in fake.metadata[-1]


# --- deadlines and defaults -------------------------------------------------------------------


def test_defaults_apply_when_django_is_not_configured(monkeypatch):
    monkeypatch.setattr(client, "_django_setting", lambda name: None)

    assert client._timeout("health", None) == 2.0
    assert client._timeout("load", None) == 120.0
    assert client._timeout("worker_start", None) == 30.0
    assert client._timeout("worker", None) == 10.0
    assert client._metadata(None) == ()


def test_settings_override_defaults_and_explicit_timeout_wins(monkeypatch):
    settings = {
        "GRPC_HEALTH_TIMEOUT": 0.5,
        "GRPC_LOAD_TIMEOUT": 300,
        "GRPC_WORKER_TIMEOUT": 7,
        "CONTROLPLANE_REGISTRATION_TOKEN": "from-settings",
    }
    monkeypatch.setattr(client, "_django_setting", settings.get)

    assert client._timeout("health", None) == 0.5
    assert client._timeout("load", None) == 300.0
    assert client._timeout("worker", None) == 7.0
    assert client._timeout("health", 9) == 9.0
    # No default credential: the registration token in the settings is never sent.
    assert client._metadata(None) == ()
    assert client._metadata("") == ()


def test_the_registration_token_is_never_sent_when_the_caller_passes_no_token(
    serve, monkeypatch, fake_backend, require_bearer, fleet_token
):
    """Issue 12: anything that answers a probe must never receive the fleet registration
    token; the control plane passes each node's own credential explicitly."""
    monkeypatch.setattr(client, "_django_setting", {"CONTROLPLANE_REGISTRATION_TOKEN": fleet_token}.get)
    address = serve(fake_backend(), interceptors=(require_bearer(),))

    result = client.probe(address, timeout=2)
    assert (result.outcome, result.code) == (client.Probe.BUSY, grpc.StatusCode.UNAUTHENTICATED)
    assert client.probe(address, token=fleet_token, timeout=2).outcome is client.Probe.ALIVE


# --- channel cache ----------------------------------------------------------------------------


def test_channel_is_created_lazily_and_reused_within_a_process():
    address = closed_port_address()
    assert not any(addr == address for _, addr in channels._channels)

    first = client.get_channel(address)

    assert client.get_channel(address) is first


def test_closed_channel_is_rebuilt_on_next_use(serve, fake_backend):
    address = serve(fake_backend())
    first = client.get_channel(address)

    client.close_channel(address)

    assert client.get_channel(address) is not first
    assert client.probe(address, token="", timeout=2).outcome is client.Probe.ALIVE


def test_channel_made_by_another_pid_is_not_reused(monkeypatch):
    address = closed_port_address()
    parent_channel = client.get_channel(address)
    monkeypatch.setattr(channels.os, "getpid", lambda: -12345)

    assert client.get_channel(address) is not parent_channel


def test_forked_child_builds_its_own_working_channel(serve, fake_backend):
    address = serve(fake_backend())
    parent_channel = client.get_channel(address)
    assert client.probe(address, token="", timeout=2).outcome is client.Probe.ALIVE

    pid = os.fork()
    if pid == 0:  # child: report through the exit code only, never return into pytest
        code = 70
        try:
            fresh = client.get_channel(address) is not parent_channel
            alive = client.probe(address, token="", timeout=2).outcome is client.Probe.ALIVE
            code = 0 if fresh and alive else (1 if not fresh else 2)
        finally:
            os._exit(code)

    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not finish")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's channel still works after the child used its own.
    assert client.get_channel(address) is parent_channel
    assert client.probe(address, token="", timeout=2).outcome is client.Probe.ALIVE
