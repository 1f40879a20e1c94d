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

import grpc
import pytest

from proto import backend_pb2, client, worker_pb2, worker_pb2_grpc
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
            stub.ListBackends(
                worker_pb2.ListBackendsRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=1
            )
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


def loads(address: str) -> int:
    """Successful LoadModel calls the echo process at ``address`` has served."""
    return client.status(address, timeout=5).memory.breakdown["echo.loads"]


def predict_as(address: str, prompt: str, model_identity: str) -> backend_pb2.Reply:
    """Predict carrying ModelIdentity, as a frontend routing to a replica sends it."""
    options = backend_pb2.PredictOptions(ModelIdentity=model_identity)
    return client.predict(address, prompt, options=options, timeout=10)


def test_a_cold_model_is_routed_through_a_real_worker_and_echo_backend(real_worker):
    node = make_node(name="real-1", address=real_worker)
    blob = options_blob("echo-model", Options=["echo.memory_bytes=1000"])

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.node_name == "real-1"
    replica = NodeModel.objects.get()
    assert (replica.node_id, replica.state, replica.address) == (node.pk, "loaded", result.lease.address)
    assert LoadJob.objects.get().state == "succeeded"
    reply = predict_as(result.lease.address, "hello", "echo-model")
    assert b"hello" in reply.message

    Lease.objects.release(result.lease.pk)
    again = router.route("echo-model")
    assert again.lease.replica_id == replica.pk  # warm now: no second load
    assert LoadJob.objects.count() == 1
    listing = client.list_backends(real_worker, node_id=str(node.pk))
    assert [(b.model_name, b.replica_index) for b in listing.backends] == [("echo-model", 0)]


def test_a_backend_whose_loader_died_before_load_model_is_loaded_not_adopted(real_worker):
    """The loader's StartBackend went through, then the loader died: the process runs, idle and
    empty, and answers Status READY all the same. The next route must send LoadModel, or every
    request routed to the replica fails with FAILED_PRECONDITION."""
    node = make_node(name="real-1", address=real_worker)
    blob = options_blob("echo-model")
    started = client.start_backend(real_worker, "echo-model", "echo", 0, node_id=str(node.pk))
    assert client.status(started.address).state == backend_pb2.StatusResponse.READY
    assert loads(started.address) == 0

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.lease.address == started.address  # the same process, now loaded
    assert predict_as(result.lease.address, "hello", "echo-model").message == b"hello"
    assert loads(started.address) == 1


def test_a_reused_backend_holding_another_model_is_not_adopted(real_worker):
    """The process of this (model, replica) holds an older recipe (another ``Model``; its loader
    died before recording it): its identity does not match, so the new recipe is loaded into it
    and requests for the new model are served."""
    node = make_node(name="real-1", address=real_worker)
    started = client.start_backend(real_worker, "echo-model", "echo", 0, node_id=str(node.pk))
    assert client.load_model(started.address, options_blob("echo-model-v1"))[0]

    result = router.route("echo-model", backend_type="echo", opts_blob=options_blob("echo-model-v2"), wait=30)

    assert result.ready and result.lease.address == started.address
    assert predict_as(result.lease.address, "hello", "echo-model-v2").message == b"hello"
    with pytest.raises(client.GrpcCallError) as stale:
        predict_as(result.lease.address, "hello", "echo-model-v1")
    assert stale.value.code.name == "NOT_FOUND" and "model identity mismatch" in stale.value.detail
    assert loads(started.address) == 2


def test_a_reused_backend_that_holds_the_model_is_adopted_without_a_second_load(real_worker):
    """The loader's LoadModel succeeded, then the loader died before recording the replica: the
    process proves it holds the model, so it is adopted and loaded only once."""
    node = make_node(name="real-1", address=real_worker)
    blob = options_blob("echo-model")
    started = client.start_backend(real_worker, "echo-model", "echo", 0, node_id=str(node.pk))
    assert client.load_model(started.address, blob)[0]

    result = router.route("echo-model", backend_type="echo", opts_blob=blob, wait=30)

    assert result.ready and result.lease.address == started.address
    assert NodeModel.objects.get().state == "loaded"
    assert predict_as(result.lease.address, "hello", "echo-model").message == b"hello"
    assert loads(started.address) == 1
