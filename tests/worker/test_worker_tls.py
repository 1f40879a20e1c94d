"""``python -m worker run`` serving TLS: the worker service and its echo backends, with mutual
TLS, as a real process against the fake control plane; certificates from a throwaway CA."""

import subprocess
import sys

import grpc
import pytest

from proto import backend_pb2, backend_pb2_grpc, tls, worker_pb2, worker_pb2_grpc
from tests.processes import wait_for
from tests.tls_certs import make_ca
from tests.worker.conftest import AUTH, SERVICE_AUTH, TOKEN, child_env, free_backend_port
from tests.worker.test_worker_cli import worker_argv


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(tmp_path, "fleet-ca")
    return ca, ca.issue("worker"), ca.issue("control-plane")


def _stub(kind, address, client_tls):
    channel = tls.create_channel(address, tls=client_tls)
    return channel, kind(channel)


def test_a_tls_worker_advertises_grpcs_and_requires_client_certificates(control_plane, spawn, pki, tmp_path):
    ca, worker_leaf, control_plane_leaf = pki
    port = free_backend_port()
    log_path = tmp_path / "worker.log"
    argv = worker_argv(
        control_plane.url, port,
        "--tls-cert", worker_leaf.cert, "--tls-key", worker_leaf.key,
        "--tls-client-ca", ca.cert, "--tls-ca", ca.cert,
    )
    with open(log_path, "w") as log_file:
        spawn(argv, env=child_env(CONTROLPLANE_REGISTRATION_TOKEN=TOKEN), stdout=log_file, stderr=subprocess.STDOUT)
    wait_for(lambda: control_plane.calls("heartbeat"), timeout=15)
    address = control_plane.calls("register")[0].body["address"]
    assert address == f"grpcs://127.0.0.1:{port}"

    trusted = tls.ClientTls(ca_file=ca.cert, cert_file=control_plane_leaf.cert, key_file=control_plane_leaf.key)
    metadata = [*SERVICE_AUTH, ("x-node-id", "node-1")]
    channel, worker = _stub(worker_pb2_grpc.WorkerStub, address, trusted)
    with channel:
        started = worker.StartBackend(
            worker_pb2.StartBackendRequest(model_name="tiny", backend_type="echo", replica_index=0),
            metadata=metadata,
            timeout=30,
        )
        # the worker checked the backend's Health over TLS (with its own certificate) before answering
        assert started.address.startswith("grpcs://127.0.0.1:"), started.address
        listed = worker.ListBackends(worker_pb2.ListBackendsRequest(), metadata=metadata, timeout=10)
        assert [b.address for b in listed.backends] == [started.address]

    channel, backend = _stub(backend_pb2_grpc.BackendStub, started.address, trusted)
    with channel:
        assert backend.LoadModel(backend_pb2.ModelOptions(Model="tiny"), metadata=AUTH, timeout=10).success
        reply = backend.Predict(backend_pb2.PredictOptions(Prompt="tls all the way"), metadata=AUTH, timeout=10)
        assert reply.message == b"tls all the way"

    # Refused: no client certificate (worker and backend), and plaintext on the TLS port.
    no_certificate = tls.ClientTls(ca_file=ca.cert)
    for kind, target, call, request, meta in (
        (worker_pb2_grpc.WorkerStub, address, "ListBackends", worker_pb2.ListBackendsRequest(), metadata),
        (backend_pb2_grpc.BackendStub, started.address, "Health", backend_pb2.HealthMessage(), AUTH),
    ):
        channel, stub = _stub(kind, target, no_certificate)
        with channel, pytest.raises(grpc.RpcError) as refused:
            getattr(stub, call)(request, metadata=meta, timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        channel, stub = _stub(kind, tls.split_address(target)[0], tls.ClientTls())
        with channel, pytest.raises(grpc.RpcError) as plaintext:
            getattr(stub, call)(request, metadata=meta, timeout=5)
        assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_flags_are_checked_before_anything_starts(tmp_path, pki):
    ca, leaf, _ = pki
    cases = [
        (["--tls-cert", leaf.cert], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", ca.cert], "--tls-client-ca needs --tls-cert"),
        (["--tls-cert", leaf.cert, "--tls-key", str(tmp_path / "nope.key")], "--tls-key: cannot read"),
        (["--tls-cert", leaf.cert, "--tls-key", leaf.key, "--tls-backend", "llama"], "--tls-backend names no"),
    ]
    for extra, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "run", "--no-register", *extra],
            env=child_env(WORKER_SERVICE_TOKEN="a", WORKER_BACKEND_TOKEN="b"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
