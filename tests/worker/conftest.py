"""Fixtures for the worker agent's tests: real backend processes on 127.0.0.1, the worker's
gRPC service in-process, and a fake control plane (``http.server`` in a thread) that records
what the worker sends to the node API.

No database: nothing here uses Django. Every process a test starts is stopped by a fixture
finalizer; ``no_orphans`` checks that no backend process outlives the test.

The worker's gRPC service is tested in-process (``BackendSupervisor`` + ``build_server`` on an
ephemeral port), not through ``--no-register``: the tests then see the supervisor directly and
need no extra process. The CLI tests (``test_worker_cli.py``) run ``python -m worker run`` as a
subprocess against the fake control plane.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from proto import backend_pb2, backend_pb2_grpc, worker_pb2_grpc
from tests.processes import pid_alive, wait_for
from worker.config import parse_backends
from worker.processes import BackendSupervisor
from worker.service import build_server

REPO_ROOT = Path(__file__).resolve().parents[2]
# Three credentials, three jobs: the fleet registration token only registers; the worker
# service accepts only the command token the control plane hands over at registration; the
# backends require only the node's backend (data-plane) token.
TOKEN = "fleet-registration-s3cret"
SERVICE_TOKEN = "cpw_worker-command-s3cret"
BACKEND_TOKEN = "cpb_backend-data-s3cret"
AUTH = [("authorization", f"Bearer {BACKEND_TOKEN}")]  # calls to a backend
SERVICE_AUTH = [("authorization", f"Bearer {SERVICE_TOKEN}")]  # calls to the worker service


def port_range(size: int = 20) -> tuple[int, int]:
    """A random range below Linux's ephemeral ports (32768+), so that outgoing connections never
    sit on a backend port; the supervisor skips taken ports, so parallel runs coexist."""
    low = random.randrange(20000, 32000 - size)
    return low, low + size - 1


def free_backend_port() -> int:
    """One free port from the same band as :func:`port_range`."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# Worker subprocesses keep their node tokens here, not in the user's home directory.
STATE_DIR = tempfile.mkdtemp(prefix="worker-state-")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CONTROLPLANE_REGISTRATION_TOKEN", None)
    env["WORKER_STATE_DIR"] = STATE_DIR
    env.update(extra)
    return env


def backend_stub(address: str) -> backend_pb2_grpc.BackendStub:
    return backend_pb2_grpc.BackendStub(grpc.insecure_channel(address))


def wait_healthy(address: str, timeout: float = 15.0) -> None:
    stub = backend_stub(address)

    def healthy():
        try:
            return stub.Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=1).message == b"OK"
        except grpc.RpcError:
            return False

    wait_for(healthy, timeout, 0.1)


# ----- processes ------------------------------------------------------------------------------


@pytest.fixture
def spawn():
    """Start a subprocess (stdout/stderr to a file) and terminate/kill it after the test."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env or child_env(), **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def echo_backend(spawn):
    """Start ``python -m worker.backends.echo`` on a free port; returns its address."""

    def start(token: str | None = BACKEND_TOKEN, **env: str) -> tuple[str, subprocess.Popen]:
        address = f"127.0.0.1:{free_backend_port()}"
        extra = dict(env)
        if token:
            extra["LOCALAI_GRPC_AUTH_TOKEN"] = token
        proc = spawn(
            [sys.executable, "-m", "worker.backends.echo", "--addr", address],
            env=child_env(**extra),
            stderr=subprocess.DEVNULL,
        )
        wait_healthy(address)
        return address, proc

    return start


# ----- the worker's gRPC service in-process ----------------------------------------------------


@dataclass
class InProcessWorker:
    supervisor: BackendSupervisor
    server: grpc.Server | None = None
    address: str = ""
    #: What the worker believes its node id is (None: not registered); the interceptor reads it.
    node_id: str | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self) -> worker_pb2_grpc.WorkerStub:
        channel = grpc.insecure_channel(self.address)
        self.channels.append(channel)
        return worker_pb2_grpc.WorkerStub(channel)


@pytest.fixture
def make_worker():
    """Build a worker service (supervisor + gRPC server) with the given supervisor options."""
    workers: list[InProcessWorker] = []

    def build(backends: list[str] = (), **options) -> InProcessWorker:
        options.setdefault("port_range", port_range())
        options.setdefault("health_timeout", 15.0)
        options.setdefault("stop_grace", 2.0)
        options.setdefault("poll_interval", 0.2)
        worker = InProcessWorker(BackendSupervisor(parse_backends(list(backends)), auth_token=BACKEND_TOKEN, **options))
        worker.server, port = build_server(
            worker.supervisor, token=SERVICE_TOKEN, bind="127.0.0.1:0", node_id=lambda: worker.node_id
        )
        worker.address = f"127.0.0.1:{port}"
        workers.append(worker)
        return worker

    yield build
    for worker in workers:
        pids = [snap.pid for snap in worker.supervisor.snapshots()]
        worker.supervisor.stop_all()
        worker.server.stop(grace=0).wait()
        for channel in worker.channels:
            channel.close()
        assert not [pid for pid in pids if pid_alive(pid)], "backend processes outlived their worker"


# ----- the fake control plane ---------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: object
    x_node_token: str | None = None


class FakeControlPlane:
    """The node API as the worker sees it, answering from a script and recording requests.

    By default: register -> 201 with a new id and node token per call; heartbeat, drain and
    deregister -> 200 for the current id/token (404 for an unknown id, 401 for a wrong token);
    models -> the next entry of ``models_answers`` (the last one repeats).
    ``script[(method, path_suffix)]`` holds ``(status, body)`` answers consumed before the
    defaults apply (path_suffix: ``register``, ``heartbeat``, ``drain``, ``models``,
    ``deregister``).
    """

    def __init__(self):
        self.requests: list[Recorded] = []
        self.script: dict[tuple[str, str], list[tuple[int, object]]] = {}
        self.models_answers: list[list[dict]] = [[]]
        self.registrations = 0
        self.node_id: str | None = None
        self.node_token: str | None = None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer()

            def do_POST(self):
                self._answer()

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, answer = fake.handle(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    body,
                    x_node_token=self.headers.get("X-Node-Token"),
                )
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                ctype = "application/problem+json" if status >= 400 else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(
        self, method: str, path: str, authorization: str | None, body, x_node_token: str | None = None
    ) -> tuple[int, object]:
        with self.lock:
            self.requests.append(Recorded(method, path, authorization, body, x_node_token))
            verb = path.rstrip("/").rsplit("/", 1)[-1]
            scripted = self.script.get((method, verb))
            if scripted:
                return scripted.pop(0)
            if verb == "register":
                self.registrations += 1
                self.node_id = f"node-{self.registrations}"
                self.node_token = f"node-token-{self.registrations}"
                return 201, {
                    "id": self.node_id,
                    "name": body["name"],
                    "node_type": "backend",
                    "status": "healthy",
                    "created_at": "2026-11-26T12:00:00Z",
                    "node_token": self.node_token,
                    "worker_token": SERVICE_TOKEN,
                    "backend_token": BACKEND_TOKEN,
                }
            node_id = path.split("/")[3]
            if node_id != self.node_id:
                return 404, problem(404, "node_not_found", "unknown node")
            if authorization != f"Bearer {self.node_token}":
                return 401, problem(401, "invalid_node_token", "bad node token")
            if verb == "models":
                answer = self.models_answers[0]
                if len(self.models_answers) > 1:
                    self.models_answers.pop(0)
                return 200, answer
            return 200, {"id": node_id, "status": "ok"}

    def calls(self, verb: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if verb is None or r.path.rstrip("/").endswith("/" + verb)]

    def verbs(self) -> list[str]:
        with self.lock:
            return [r.path.rstrip("/").rsplit("/", 1)[-1] for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def problem(status: int, code: str, detail: str) -> dict:
    return {"type": "about:blank", "title": "error", "status": status, "detail": detail, "code": code}


@pytest.fixture
def control_plane():
    fake = FakeControlPlane()
    yield fake
    fake.close()
