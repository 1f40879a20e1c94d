"""The built-in echo backend, run as a real subprocess (``python -m worker.backends.echo``)."""

import signal

import grpc
import pytest

from proto import backend_pb2
from tests.worker.conftest import AUTH, backend_stub
from worker.backends.echo import EchoSettings, embed


def rpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_health_answers_ok_with_the_token(echo_backend):
    address, _ = echo_backend()
    reply = backend_stub(address).Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert reply.message == b"OK"


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    assert rpc_code(lambda: stub.Health(backend_pb2.HealthMessage(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("authorization", "Bearer nope")]
    assert (
        rpc_code(lambda: stub.LoadModel(backend_pb2.ModelOptions(Model="m"), metadata=wrong, timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    # A streaming method is guarded too.
    assert (
        rpc_code(lambda: list(stub.PredictStream(backend_pb2.PredictOptions(Prompt="x"), timeout=5)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_without_a_configured_token_any_caller_is_served(echo_backend):
    address, _ = echo_backend(token=None)
    assert backend_stub(address).Health(backend_pb2.HealthMessage(), timeout=5).message == b"OK"


def test_load_predict_and_status_report_the_configured_memory(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    status = stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert status.state == backend_pb2.StatusResponse.READY  # idle, not loaded: LocalAI says READY too
    assert status.memory.total == 0

    result = stub.LoadModel(
        backend_pb2.ModelOptions(Model="tiny", Options=["echo.memory_bytes=1000000", "unrelated:option"]),
        metadata=AUTH,
        timeout=10,
    )
    assert result.success, result.message

    reply = stub.Predict(backend_pb2.PredictOptions(Prompt="hello distributed world"), metadata=AUTH, timeout=5)
    assert reply.message == b"hello distributed world"
    assert reply.tokens == 3

    chunks = stub.PredictStream(backend_pb2.PredictOptions(Prompt="one two three"), metadata=AUTH, timeout=5)
    assert b"".join(chunk.message for chunk in chunks) == b"one two three"

    vector = stub.Embedding(backend_pb2.PredictOptions(Embeddings="some text"), metadata=AUTH, timeout=5)
    assert list(vector.embeddings) == pytest.approx(embed("some text"))
    assert len(vector.embeddings) == 8

    status = stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert status.state == backend_pb2.StatusResponse.READY
    assert status.memory.total == 1_000_000

    assert stub.Free(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).success
    status = stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert (status.state, status.memory.total) == (backend_pb2.StatusResponse.READY, 0)
    code = rpc_code(lambda: stub.Predict(backend_pb2.PredictOptions(Prompt="x"), metadata=AUTH, timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # freed: nothing to predict with


def test_memory_footprint_defaults_come_from_the_environment(echo_backend):
    address, _ = echo_backend(ECHO_MEMORY_BYTES="4096")
    stub = backend_stub(address)
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="m"), metadata=AUTH, timeout=10).success
    assert stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).memory.total == 4096


def test_fail_load_answers_success_false_with_the_reason(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    result = stub.LoadModel(
        backend_pb2.ModelOptions(Model="m", Options=["echo.fail_load=out of memory"]), metadata=AUTH, timeout=10
    )
    assert (result.success, result.message) == (False, "out of memory")
    status = stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert status.state == backend_pb2.StatusResponse.READY
    code = rpc_code(lambda: stub.Predict(backend_pb2.PredictOptions(Prompt="x"), metadata=AUTH, timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_health_waits_behind_a_slow_predict_like_localai_python_backends(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    options = backend_pb2.ModelOptions(Model="m", Options=["echo.predict_delay_s=1.5"])
    assert stub.LoadModel(options, metadata=AUTH, timeout=10).success
    slow = stub.Predict.future(backend_pb2.PredictOptions(Prompt="slow"), metadata=AUTH, timeout=10)
    try:
        code = rpc_code(lambda: stub.Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # busy, not dead
    finally:
        assert slow.result().message == b"slow"


def test_exits_cleanly_on_sigterm(echo_backend):
    _, proc = echo_backend()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_settings_read_options_in_both_separators():
    settings = EchoSettings().with_options(["echo.load_delay_s=0.25", "echo.memory_bytes:77", "other=1"])
    assert (settings.load_delay_s, settings.memory_bytes, settings.fail_load) == (0.25, 77, None)


def test_status_reports_the_number_of_successful_loads(echo_backend):
    # breakdown["echo.loads"]: the fault suite's "one successful LoadModel per replica" invariant
    address, _ = echo_backend()
    stub = backend_stub(address)

    def loads():
        return dict(stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).memory.breakdown)["echo.loads"]

    assert loads() == 0
    failed = backend_pb2.ModelOptions(Model="m", Options=["echo.fail_load=no"])
    assert not stub.LoadModel(failed, metadata=AUTH, timeout=10).success
    assert loads() == 0  # a failed load is not counted
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="m"), metadata=AUTH, timeout=10).success
    assert loads() == 1
    assert stub.Free(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).success
    assert loads() == 1  # survives Free: it counts loads served, not the current state
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="m"), metadata=AUTH, timeout=10).success
    assert loads() == 2


def test_the_counter_is_per_process_in_process_backend():
    from worker.backends.echo import EchoBackend

    backend = EchoBackend(EchoSettings())
    assert backend.loads == 0
    assert backend.LoadModel(backend_pb2.ModelOptions(Model="m"), None).success
    status = backend.Status(backend_pb2.HealthMessage(), None)
    assert (backend.loads, status.memory.breakdown["echo.loads"], status.memory.breakdown["model"]) == (1, 1, 0)


# ----- LocalAI's strict behaviour: READY proves nothing, identity is enforced -------------------


def guarded_calls(stub, identity: str = ""):
    """Each guarded RPC as a thunk, every request carrying ``identity`` as ModelIdentity."""
    return {
        "Predict": lambda: stub.Predict(
            backend_pb2.PredictOptions(Prompt="a b", ModelIdentity=identity), metadata=AUTH, timeout=5
        ),
        "PredictStream": lambda: list(
            stub.PredictStream(
                backend_pb2.PredictOptions(Prompt="a b", ModelIdentity=identity), metadata=AUTH, timeout=5
            )
        ),
        "Embedding": lambda: stub.Embedding(
            backend_pb2.PredictOptions(Embeddings="a b", ModelIdentity=identity), metadata=AUTH, timeout=5
        ),
        "TokenizeString": lambda: stub.TokenizeString(
            backend_pb2.PredictOptions(Prompt="a b", ModelIdentity=identity), metadata=AUTH, timeout=5
        ),
    }


def test_before_any_load_status_is_ready_and_every_guarded_call_fails_precondition(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)

    status = stub.Status(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5)
    assert status.state == backend_pb2.StatusResponse.READY
    assert dict(status.memory.breakdown) == {"echo.loads": 0}
    for identity in ("", "tiny"):  # nothing loaded: the identity check is skipped, the load check is not
        for name, call in guarded_calls(stub, identity).items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert (name, info.value.code()) == (name, grpc.StatusCode.FAILED_PRECONDITION)
            assert "not loaded" in info.value.details()


def test_a_request_for_another_model_is_refused_with_not_found_and_the_mismatch_sentinel(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="tiny"), metadata=AUTH, timeout=10).success

    for name, call in guarded_calls(stub, "other.gguf").items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (name, info.value.code()) == (name, grpc.StatusCode.NOT_FOUND)
        assert info.value.details() == "model identity mismatch: loaded 'tiny', requested 'other.gguf'"


def test_the_loaded_identity_and_an_empty_identity_are_both_served(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="tiny"), metadata=AUTH, timeout=10).success

    for identity in ("tiny", ""):  # empty: a caller that predates the field is not judged
        calls = guarded_calls(stub, identity)
        assert calls["Predict"]().message == b"a b"
        assert b"".join(chunk.message for chunk in calls["PredictStream"]()) == b"a b"
        assert list(calls["Embedding"]().embeddings) == pytest.approx(embed("a b"))
        tokens = calls["TokenizeString"]()
        assert (tokens.length, list(tokens.tokens)) == (2, [0, 1])


def test_a_load_without_a_model_name_records_no_identity_so_nothing_is_refused(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    assert stub.LoadModel(backend_pb2.ModelOptions(), metadata=AUTH, timeout=10).success

    reply = stub.Predict(backend_pb2.PredictOptions(Prompt="hi", ModelIdentity="any"), metadata=AUTH, timeout=5)
    assert reply.message == b"hi"


def test_a_failed_load_records_no_identity_and_free_keeps_the_loaded_one(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    failed = backend_pb2.ModelOptions(Model="other.gguf", Options=["echo.fail_load=no"])
    assert not stub.LoadModel(failed, metadata=AUTH, timeout=10).success
    assert stub.LoadModel(backend_pb2.ModelOptions(Model="tiny"), metadata=AUTH, timeout=10).success
    assert stub.Free(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).success

    calls = guarded_calls(stub, "other.gguf")
    assert rpc_code(calls["TokenizeString"]) == grpc.StatusCode.NOT_FOUND  # identity 'tiny' kept, as LocalAI does
    assert rpc_code(guarded_calls(stub, "tiny")["TokenizeString"]) == grpc.StatusCode.FAILED_PRECONDITION
