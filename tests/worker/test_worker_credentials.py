"""Three credentials, three jobs, on a real ``python -m worker run`` process: the fleet
registration token only registers; the worker service obeys only the command token the
registration answer handed over; backends answer only the node's backend token; and a
restarted worker re-registers its name with the node token it kept in its state file."""

import os
import signal
import stat
import subprocess

import grpc

from proto import backend_pb2, worker_pb2, worker_pb2_grpc
from tests.processes import wait_for
from tests.worker.conftest import (
    AUTH,
    BACKEND_TOKEN,
    SERVICE_AUTH,
    SERVICE_TOKEN,
    TOKEN,
    backend_stub,
    child_env,
    free_backend_port,
)
from tests.worker.test_worker_cli import worker_argv


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def code_of(method, request, token: str) -> grpc.StatusCode:
    """The status of one call presenting ``token``."""
    try:
        method(request, metadata=bearer(token), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_the_worker_service_obeys_only_the_command_token_and_backends_only_the_backend_token(
    control_plane, spawn, tmp_path
):
    port = free_backend_port()
    worker = spawn(
        worker_argv(control_plane.url, port),
        env=child_env(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN, WORKER_STATE_DIR=str(tmp_path)),
        stderr=subprocess.DEVNULL,
    )
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    wait_for(lambda: control_plane.calls("heartbeat"), timeout=15)
    listing = worker_pb2.ListBackendsRequest()

    # Neither the fleet registration token nor the data-plane credential commands a worker.
    start = worker_pb2.StartBackendRequest(model_name="m", backend_type="echo", replica_index=0)
    for wrong in (TOKEN, BACKEND_TOKEN, "node-token-1"):
        assert code_of(stub.ListBackends, listing, wrong) == grpc.StatusCode.UNAUTHENTICATED, wrong
        assert code_of(stub.StartBackend, start, wrong) == grpc.StatusCode.UNAUTHENTICATED, wrong
    started = stub.StartBackend(
        worker_pb2.StartBackendRequest(model_name="m", backend_type="echo", replica_index=0),
        metadata=SERVICE_AUTH,
        timeout=30,
    )

    # The backend was started with the backend token: the registration token and the command
    # token open nothing there.
    backend = backend_stub(started.address)
    for wrong in (TOKEN, SERVICE_TOKEN):
        assert code_of(backend.Health, backend_pb2.HealthMessage(), wrong) == grpc.StatusCode.UNAUTHENTICATED, wrong
    assert backend.Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=5).message == b"OK"

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_a_restarted_worker_presents_its_kept_node_token_when_it_registers_again(control_plane, spawn, tmp_path):
    env = child_env(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN, WORKER_STATE_DIR=str(tmp_path))
    first = spawn(worker_argv(control_plane.url, free_backend_port()), env=env, stderr=subprocess.DEVNULL)
    wait_for(lambda: control_plane.calls("heartbeat"), timeout=15)
    first.kill()  # no deregistration: the control plane still knows the name
    first.wait(10)
    (state_file,) = list(tmp_path.iterdir())
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600

    second = spawn(worker_argv(control_plane.url, free_backend_port()), env=env, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(control_plane.calls("register")) == 2, timeout=15)
    first_registration, second_registration = control_plane.calls("register")
    assert first_registration.x_node_token is None
    assert second_registration.x_node_token == "node-token-1"
    assert TOKEN not in state_file.read_text()
    second.send_signal(signal.SIGTERM)
    second.wait(30)


def test_a_refused_re_registration_exits_with_the_operator_hint(control_plane, spawn, tmp_path):
    control_plane.script[("POST", "register")] = [
        (409, {"status": 409, "code": "node_credential_required", "title": "Node credential required"})
    ]
    worker = spawn(
        worker_argv(control_plane.url, free_backend_port()),
        env=child_env(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN, WORKER_STATE_DIR=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 1
    assert "node_credential_required" in output and "operator must delete the node" in output
