"""A cold model routed through the reference worker (``python -m worker run --no-register``, a
real subprocess) and its built-in echo backend: StartBackend spawns a real backend process,
LoadModel gets the stored bytes, and the leased address answers Predict."""

import signal
import subprocess
import sys

import grpc
import pytest

from proto import client, worker_pb2, worker_pb2_grpc
from registry import router
from registry.models import Lease, LoadJob, NodeModel
from tests.factories import make_node
from tests.worker.conftest import child_env, free_port, port_range, wait_for

from .conftest import options_blob

pytestmark = [pytest.mark.django_db, pytest.mark.e2e]

TOKEN = "router-real-worker-token"


@pytest.fixture
def real_worker(settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = TOKEN
    settings.GRPC_HEALTH_TIMEOUT = 2.0
    port = free_port()
    low, high = port_range()
    argv = [sys.executable, "-m", "worker", "run", "--no-register", "--name", "router-real-worker"]
    argv += ["--advertise", "127.0.0.1", "--port", str(port), "--backend-port-range", f"{low}-{high}"]
    argv += ["--registration-token", TOKEN, "--backend-stop-grace", "2"]
    process = subprocess.Popen(argv, env=child_env(), stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))

    def listening():
        try:
            stub.ListBackends(worker_pb2.ListBackendsRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=1)
        except grpc.RpcError:
            return False
        return True

    try:
        wait_for(listening, timeout=20, interval=0.1)
        yield address
    finally:
        process.send_signal(signal.SIGINT)  # stops every backend it started
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        client.close_all_channels()


def test_a_cold_model_is_routed_through_a_real_worker_and_echo_backend(real_worker):
    node = make_node(name="real-1", address=real_worker)
    blob = options_blob("echo-model", Options=["echo.memory_bytes=1000"])

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.node_name == "real-1"
    replica = NodeModel.objects.get()
    assert (replica.node_id, replica.state, replica.address) == (node.pk, "loaded", result.lease.address)
    assert LoadJob.objects.get().state == "succeeded"
    reply = client.predict(result.lease.address, "hello", timeout=10)
    assert b"hello" in reply.message

    Lease.objects.release(result.lease.pk)
    again = router.route("echo-model")
    assert again.lease.replica_id == replica.pk  # warm now: no second load
    assert LoadJob.objects.count() == 1
    listing = client.list_backends(real_worker, node_id=str(node.pk))
    assert [(b.model_name, b.replica_index) for b in listing.backends] == [("echo-model", 0)]
