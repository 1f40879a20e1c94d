"""``python -m worker`` as a real process against the fake control plane."""

import signal
import subprocess
import sys

import grpc

from proto import backend_pb2, worker_pb2, worker_pb2_grpc
from tests.processes import pid_alive, wait_for
from tests.worker.conftest import (
    AUTH,
    BACKEND_TOKEN,
    SERVICE_AUTH,
    SERVICE_TOKEN,
    TOKEN,
    backend_stub,
    child_env,
    free_backend_port,
    port_range,
    problem,
)

# --no-register: nothing hands the worker its tokens, so they are configured.
NO_REGISTER_ENV = child_env(WORKER_SERVICE_TOKEN=SERVICE_TOKEN, WORKER_BACKEND_TOKEN=BACKEND_TOKEN)


def worker_argv(control_plane_url: str | None, port: int, *extra: str) -> list[str]:
    low, high = port_range()
    argv = [sys.executable, "-m", "worker", "run", "--name", "cli-worker", "--advertise", "127.0.0.1"]
    argv += ["--port", str(port), "--backend-port-range", f"{low}-{high}", "--heartbeat-interval", "0.2"]
    argv += ["--control-plane", control_plane_url] if control_plane_url else ["--no-register"]
    return argv + list(extra)


def test_help_works():
    for argv in (["--help"], ["run", "--help"]):
        done = subprocess.run([sys.executable, "-m", "worker", *argv], env=child_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "usage: python -m worker" in done.stdout
    assert "--registration-token" in done.stdout and "--backend-port-range" in done.stdout


def test_a_missing_token_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--control-plane", "http://127.0.0.1:1"],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "CONTROLPLANE_REGISTRATION_TOKEN" in done.stderr


def test_sigterm_drains_waits_deregisters_and_stops_backends(control_plane, spawn, tmp_path):
    port = free_backend_port()
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        worker = spawn(
            worker_argv(control_plane.url, port, "--vram", "1000000", "--labels", "zone=eu,tier=gold"),
            env=child_env(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_for(lambda: control_plane.calls("heartbeat"), timeout=15)
    registration = control_plane.calls("register")[0].body
    assert registration["labels"] == {"zone": "eu", "tier": "gold"}
    assert registration["address"] == f"127.0.0.1:{port}"

    # The control plane drives the worker over gRPC, naming the node it registered.
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    metadata = [*SERVICE_AUTH, ("x-node-id", "node-1")]
    started = stub.StartBackend(
        worker_pb2.StartBackendRequest(model_name="tiny", backend_type="echo", replica_index=0),
        metadata=metadata,
        timeout=30,
    )
    options = backend_pb2.ModelOptions(Model="tiny", Options=["echo.memory_bytes=250000"])
    assert backend_stub(started.address).LoadModel(options, metadata=AUTH, timeout=10).success
    # Heartbeats now report what the backend holds.
    wait_for(lambda: any(c.body == {"available_vram": 750000} for c in control_plane.calls("heartbeat")), timeout=10)

    row = {"model_name": "tiny", "replica_index": 0, "state": "loaded", "address": started.address}
    control_plane.models_answers = [[{**row, "in_flight": 1}], [{**row, "in_flight": 0}]]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0

    verbs = [v for v in control_plane.verbs() if v != "heartbeat"]
    assert verbs == ["register", "drain", "models", "models", "deregister"]
    assert all(c.authorization == "Bearer node-token-1" for c in control_plane.calls()[1:])
    assert not pid_alive(started.pid)
    output = log_path.read_text()
    assert "node=node-1" in output and "model=tiny replica=0" in output
    assert TOKEN not in output and "node-token-1" not in output


def test_a_rejected_registration_exits_non_zero_with_the_problem(control_plane, spawn):
    control_plane.script[("POST", "register")] = [(403, problem(403, "registration_closed", "token revoked"))]
    worker = spawn(
        worker_argv(control_plane.url, free_backend_port(), "--registration-token", TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 1
    assert "registration_closed" in output and "token revoked" in output
    assert TOKEN not in output


def test_no_register_serves_the_worker_service_until_sigint(spawn):
    port = free_backend_port()
    worker = spawn(worker_argv(None, port), env=NO_REGISTER_ENV, stderr=subprocess.DEVNULL)
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def listening():
        try:
            return stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=SERVICE_AUTH, timeout=1) is not None
        except grpc.RpcError:
            return False

    wait_for(listening, timeout=15, interval=0.1)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(15) == 0


def test_a_sigkilled_worker_takes_its_backends_with_it(spawn):
    """A worker that dies without a chance to clean up (SIGKILL, OOM) leaves no orphan
    backend holding a port: backends are started with PR_SET_PDEATHSIG."""
    port = free_backend_port()
    worker = spawn(worker_argv(None, port), env=NO_REGISTER_ENV, stderr=subprocess.DEVNULL)
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def started():
        try:
            return stub.StartBackend(
                worker_pb2.StartBackendRequest(model_name="m", backend_type="echo", replica_index=0),
                metadata=SERVICE_AUTH,
                timeout=20,
            )
        except grpc.RpcError:
            return None

    response = wait_for(started, timeout=30, interval=0.2)
    assert pid_alive(response.pid)

    worker.send_signal(signal.SIGKILL)
    worker.wait(10)

    wait_for(lambda: not pid_alive(response.pid), timeout=10)
