"""A cold model routed through the reference worker (``python -m worker run --no-register``, a
real subprocess) and its built-in echo backend: StartBackend spawns a real backend process,
LoadModel gets the stored bytes, and the leased address answers Predict.

The echo backend behaves as LocalAI's backends do: ``Status`` says READY before any load,
inference before a load fails with FAILED_PRECONDITION, and ``ModelIdentity`` naming another
model is refused with NOT_FOUND. So a backend process the worker hands back (``reused``) is
adopted only when it proves it holds the model."""

import signal
import subprocess
import sys
from dataclasses import dataclass

import grpc
import pytest

from core.credentials import backend_token, worker_command_token
from proto import backend_pb2, client, worker_pb2, worker_pb2_grpc
from registry import router
from registry.models import Lease, LoadJob, NodeModel
from tests.factories import make_node
from tests.processes import free_port, wait_for
from tests.worker.conftest import child_env, port_range

from .conftest import options_blob

pytestmark = [pytest.mark.django_db, pytest.mark.e2e]

TOKEN = "router-real-worker-token"


@dataclass
class RealWorker:
    node: object
    address: str
    command_token: str  # what its worker service accepts
    backend_token: str  # what its backends require


@pytest.fixture
def real_worker(settings):
    """The node ``real-1`` served by a real worker process. ``--no-register``: the worker is
    configured with the credentials a registration would have handed it for that node."""
    settings.CONTROLPLANE_REGISTRATION_TOKEN = TOKEN
    settings.GRPC_HEALTH_TIMEOUT = 2.0
    port = free_port()
    low, high = port_range()
    address = f"127.0.0.1:{port}"
    node = make_node(name="real-1", address=address)
    worker = RealWorker(node, address, worker_command_token(node.pk), backend_token(node.pk))
    argv = [sys.executable, "-m", "worker", "run", "--no-register", "--name", "router-real-worker"]
    argv += ["--advertise", "127.0.0.1", "--port", str(port), "--backend-port-range", f"{low}-{high}"]
    argv += ["--registration-token", TOKEN, "--backend-stop-grace", "2"]
    env = child_env(WORKER_SERVICE_TOKEN=worker.command_token, WORKER_BACKEND_TOKEN=worker.backend_token)
    process = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))

    def listening():
        try:
            stub.ListBackends(
                worker_pb2.ListBackendsRequest(),
                metadata=[("authorization", f"Bearer {worker.command_token}")],
                timeout=1,
            )
        except grpc.RpcError:
            return False
        return True

    try:
        wait_for(listening, timeout=20, interval=0.1)
        yield worker
    finally:
        process.send_signal(signal.SIGINT)  # stops every backend it started
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        client.close_all_channels()


def loads(worker: RealWorker, address: str) -> int:
    """Successful LoadModel calls the echo process at ``address`` has served."""
    return client.status(address, token=worker.backend_token, timeout=5).memory.breakdown["echo.loads"]


def predict_as(worker: RealWorker, address: str, prompt: str, model_identity: str) -> backend_pb2.Reply:
    """Predict carrying ModelIdentity and the lease's backend token, as a frontend sends it."""
    options = backend_pb2.PredictOptions(ModelIdentity=model_identity)
    return client.predict(address, prompt, options=options, token=worker.backend_token, timeout=10)


def start_backend(worker: RealWorker, model_name: str):
    """StartBackend as a loader does (the worker command token)."""
    return client.start_backend(
        worker.address, model_name, "echo", 0, node_id=str(worker.node.pk), token=worker.command_token
    )


def test_a_cold_model_is_routed_through_a_real_worker_and_echo_backend(real_worker):
    node = real_worker.node
    blob = options_blob("echo-model", Options=["echo.memory_bytes=1000"])

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.node_name == "real-1"
    replica = NodeModel.objects.get()
    assert (replica.node_id, replica.state, replica.address) == (node.pk, "loaded", result.lease.address)
    assert LoadJob.objects.get().state == "succeeded"
    reply = predict_as(real_worker, result.lease.address, "hello", "echo-model")
    assert b"hello" in reply.message

    Lease.objects.release(result.lease.pk)
    again = router.route("echo-model")
    assert again.lease.replica_id == replica.pk  # warm now: no second load
    assert LoadJob.objects.count() == 1
    listing = client.list_backends(real_worker.address, node_id=str(node.pk), token=real_worker.command_token)
    assert [(b.model_name, b.replica_index) for b in listing.backends] == [("echo-model", 0)]


def test_a_backend_whose_loader_died_before_load_model_is_loaded_not_adopted(real_worker):
    """The loader's StartBackend went through, then the loader died: the process runs, idle and
    empty, and answers Status READY all the same. The next route must send LoadModel, or every
    request routed to the replica fails with FAILED_PRECONDITION."""
    blob = options_blob("echo-model")
    started = start_backend(real_worker, "echo-model")
    assert client.status(started.address, token=real_worker.backend_token).state == backend_pb2.StatusResponse.READY
    assert loads(real_worker, started.address) == 0

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.lease.address == started.address  # the same process, now loaded
    assert predict_as(real_worker, result.lease.address, "hello", "echo-model").message == b"hello"
    assert loads(real_worker, started.address) == 1


def test_a_reused_backend_holding_another_model_is_not_adopted(real_worker):
    """The process of this (model, replica) holds an older recipe (another ``Model``; its loader
    died before recording it): its identity does not match, so the new recipe is loaded into it
    and requests for the new model are served."""
    started = start_backend(real_worker, "echo-model")
    assert client.load_model(started.address, options_blob("echo-model-v1"), token=real_worker.backend_token)[0]

    result = router.route("echo-model", backend_type="echo", opts_blob=options_blob("echo-model-v2"), wait=30)

    assert result.ready and result.lease.address == started.address
    assert predict_as(real_worker, result.lease.address, "hello", "echo-model-v2").message == b"hello"
    with pytest.raises(client.GrpcCallError) as stale:
        predict_as(real_worker, result.lease.address, "hello", "echo-model-v1")
    assert stale.value.code.name == "NOT_FOUND" and "model identity mismatch" in stale.value.detail
    assert loads(real_worker, started.address) == 2


def test_a_reused_backend_that_holds_the_model_is_adopted_without_a_second_load(real_worker):
    """The loader's LoadModel succeeded, then the loader died before recording the replica: the
    process proves it holds the model, so it is adopted and loaded only once."""
    blob = options_blob("echo-model")
    started = start_backend(real_worker, "echo-model")
    assert client.load_model(started.address, blob, token=real_worker.backend_token)[0]

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.lease.address == started.address
    assert NodeModel.objects.get().state == "loaded"
    assert predict_as(real_worker, result.lease.address, "hello", "echo-model").message == b"hello"
    assert loads(real_worker, started.address) == 1
