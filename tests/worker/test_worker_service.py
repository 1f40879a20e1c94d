"""The worker's gRPC service (controlplane.worker.v1.Worker) in-process, with real backends.

The service is built directly (``BackendSupervisor`` + ``build_server``), without a control
plane; see conftest.py for why this and not ``--no-register``.
"""

import os
import signal
import sys
import threading
import time

import grpc
import pytest

from proto import backend_pb2, worker_pb2
from tests.processes import pid_alive, wait_for
from tests.worker.conftest import AUTH, SERVICE_AUTH, backend_stub, free_backend_port


def start(stub, model="tiny", replica=0, backend="echo", metadata=SERVICE_AUTH, timeout=30):
    request = worker_pb2.StartBackendRequest(model_name=model, backend_type=backend, replica_index=replica)
    return stub.StartBackend(request, metadata=metadata, timeout=timeout)


def list_backends(stub):
    return stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=SERVICE_AUTH, timeout=5)


def status_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_two_replicas_of_one_model_get_their_own_ports_and_serve(make_worker):
    worker = make_worker()
    stub = worker.stub()
    first, second = start(stub, replica=0), start(stub, replica=1)
    assert first.address != second.address
    assert first.pid != second.pid
    assert not first.reused and not second.reused
    for i, address in enumerate((first.address, second.address)):
        backend = backend_stub(address)
        assert backend.LoadModel(backend_pb2.ModelOptions(Model="tiny"), metadata=AUTH, timeout=10).success
        reply = backend.Predict(backend_pb2.PredictOptions(Prompt=f"replica {i}"), metadata=AUTH, timeout=5)
        assert reply.message == f"replica {i}".encode()
    listed = list_backends(stub).backends
    assert [(b.model_name, b.replica_index, b.state) for b in listed] == [
        ("tiny", 0, worker_pb2.BackendProcess.RUNNING),
        ("tiny", 1, worker_pb2.BackendProcess.RUNNING),
    ]


def test_starting_a_live_key_again_reuses_the_process(make_worker):
    stub = make_worker().stub()
    first = start(stub)
    again = start(stub)
    assert (again.address, again.pid, again.reused) == (first.address, first.pid, True)


def test_concurrent_starts_of_one_key_start_one_process(make_worker):
    stub = make_worker().stub()
    answers, errors = [], []

    def call():
        try:
            answers.append(start(stub))
        except grpc.RpcError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({a.pid for a in answers}) == 1
    assert sorted(a.reused for a in answers) == [False, True, True, True, True]
    assert len(list_backends(stub).backends) == 1


def test_a_killed_backend_shows_as_exited_and_a_new_start_restarts_it(make_worker):
    stub = make_worker().stub()
    first = start(stub)
    os.kill(first.pid, signal.SIGKILL)

    def exited():
        backends = list_backends(stub).backends
        return backends and backends[0].state == worker_pb2.BackendProcess.EXITED and backends[0]

    gone = wait_for(exited, timeout=5)
    assert gone.exit_code == -signal.SIGKILL
    assert gone.pid == first.pid

    again = start(stub)
    assert not again.reused
    assert again.pid != first.pid
    assert backend_stub(again.address).Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).message == b"OK"
    assert [b.state for b in list_backends(stub).backends] == [worker_pb2.BackendProcess.RUNNING]


def test_an_unknown_backend_type_is_invalid_argument(make_worker):
    stub = make_worker().stub()
    code, details = status_code(lambda: start(stub, backend="no-such-backend"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-backend" in details
    code, _ = status_code(lambda: start(stub, model=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_calls_without_the_registration_token_are_unauthenticated(make_worker):
    stub = make_worker().stub()
    code, _ = status_code(lambda: stub.ListBackends(worker_pb2.ListBackendsRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = status_code(lambda: start(stub, metadata=[("authorization", "Bearer wrong")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_call_for_another_node_id_is_failed_precondition(make_worker):
    worker = make_worker()
    stub = worker.stub()
    addressed = [*SERVICE_AUTH, ("x-node-id", "node-b")]
    # Before registration the worker does not know its id and cannot tell.
    assert stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=addressed, timeout=5).node_id == ""
    worker.node_id = "node-a"
    code, details = status_code(
        lambda: stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=addressed, timeout=5)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-a" in details
    mine = [*SERVICE_AUTH, ("x-node-id", "node-a")]
    assert stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=mine, timeout=5).node_id == "node-a"


def test_stop_backend_stops_the_process_and_forgets_it(make_worker):
    stub = make_worker().stub()
    started = start(stub)
    request = worker_pb2.StopBackendRequest(model_name="tiny", replica_index=0)
    assert stub.StopBackend(request, metadata=SERVICE_AUTH, timeout=15).stopped
    assert not pid_alive(started.pid)
    assert list_backends(stub).backends == []
    assert not stub.StopBackend(request, metadata=SERVICE_AUTH, timeout=15).stopped


def test_unload_model_stops_every_replica_of_that_model_only(make_worker):
    stub = make_worker().stub()
    a0, a1, other = start(stub, "a", 0), start(stub, "a", 1), start(stub, "b", 0)
    answer = stub.UnloadModel(worker_pb2.UnloadModelRequest(model_name="a"), metadata=SERVICE_AUTH, timeout=15)
    assert answer.stopped == 2
    assert not pid_alive(a0.pid) and not pid_alive(a1.pid) and pid_alive(other.pid)
    assert [b.model_name for b in list_backends(stub).backends] == ["b"]


def test_a_backend_that_exits_at_start_fails_with_its_output(make_worker):
    crash = f"crash={sys.executable} -c \"import sys; print('boom: no GPU found', file=sys.stderr); sys.exit(3)\""
    stub = make_worker([crash]).stub()
    code, details = status_code(lambda: start(stub, backend="crash"))
    assert code == grpc.StatusCode.INTERNAL
    assert "boom: no GPU found" in details
    [failed] = list_backends(stub).backends
    assert (failed.state, failed.exit_code) == (worker_pb2.BackendProcess.EXITED, 3)
    assert "boom: no GPU found" in failed.last_stderr


def test_a_backend_that_never_answers_health_is_killed(make_worker):
    mute = f"mute={sys.executable} -c \"import time; print('starting', flush=True); time.sleep(60)\""
    worker = make_worker([mute], health_timeout=1.0)
    stub = worker.stub()
    began = time.monotonic()
    code, details = status_code(lambda: start(stub, backend="mute"))
    assert code == grpc.StatusCode.INTERNAL
    assert "Health" in details and "starting" in details
    assert time.monotonic() - began < 10
    [failed] = list_backends(stub).backends
    assert failed.state == worker_pb2.BackendProcess.EXITED
    assert not pid_alive(failed.pid)


def test_a_stop_does_not_wait_for_a_backend_that_is_still_starting(make_worker):
    """SIGTERM while StartBackend waits (up to the health timeout, 30 s here) for a backend that
    never answers Health: the stop ends that wait at once, kills the process, and the start is
    refused as shutting down, so the worker exits within seconds."""
    mute = f'mute={sys.executable} -c "import time; time.sleep(60)"'
    worker = make_worker([mute], health_timeout=30.0)
    stub = worker.stub()
    outcome = {}
    starter = threading.Thread(target=lambda: outcome.update(code=status_code(lambda: start(stub, backend="mute"))))
    starter.start()
    wait_for(lambda: list_backends(stub).backends, timeout=10)
    [starting] = list_backends(stub).backends
    began = time.monotonic()
    worker.supervisor.stop_all()
    took = time.monotonic() - began
    starter.join(10)
    assert took < 5, f"stop_all took {took:.1f}s"
    assert outcome["code"][0] == grpc.StatusCode.UNAVAILABLE, outcome
    assert not pid_alive(starting.pid)


def test_ports_are_exhausted_then_reused_after_a_stop(make_worker):
    port = free_backend_port()
    stub = make_worker(port_range=(port, port)).stub()
    first = start(stub, "a")
    assert first.address == f"127.0.0.1:{port}"
    code, _ = status_code(lambda: start(stub, "b"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.StopBackend(worker_pb2.StopBackendRequest(model_name="a"), metadata=SERVICE_AUTH, timeout=15)
    assert start(stub, "b").address == f"127.0.0.1:{port}"


def test_memory_in_use_sums_what_backends_report(make_worker):
    worker = make_worker()
    stub = worker.stub()
    assert worker.supervisor.memory_in_use() == 0  # nothing running: known, zero
    first, second = start(stub, replica=0), start(stub, replica=1)
    for address, size in ((first.address, 1000), (second.address, 234)):
        options = backend_pb2.ModelOptions(Model="tiny", Options=[f"echo.memory_bytes={size}"])
        assert backend_stub(address).LoadModel(options, metadata=AUTH, timeout=10).success
    assert worker.supervisor.memory_in_use() == 1234
    assert sorted(b.memory_bytes for b in list_backends(stub).backends) == [234, 1000]


def test_a_busy_backend_counts_with_its_last_figure_and_an_unknown_one_makes_the_sum_unknown(make_worker):
    worker = make_worker()
    stub = worker.stub()
    started = start(stub)
    backend = backend_stub(started.address)
    options = backend_pb2.ModelOptions(Model="tiny", Options=["echo.memory_bytes=500", "echo.predict_delay_s=1.5"])
    assert backend.LoadModel(options, metadata=AUTH, timeout=10).success
    assert worker.supervisor.memory_in_use() == 500
    busy = backend.Predict.future(backend_pb2.PredictOptions(Prompt="slow"), metadata=AUTH, timeout=10)
    time.sleep(0.2)
    assert worker.supervisor.memory_in_use(timeout=0.3) == 500  # Status timed out: last figure
    busy.result()

    second = start(stub, replica=1)
    slow_load = backend_pb2.ModelOptions(Model="tiny", Options=["echo.load_delay_s=1.5"])
    loading = backend_stub(second.address).LoadModel.future(slow_load, metadata=AUTH, timeout=10)
    time.sleep(0.2)
    assert worker.supervisor.memory_in_use(timeout=0.3) is None  # never answered Status
    assert loading.result().success
