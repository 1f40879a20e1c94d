"""The reference worker against the real control plane: real processes on loopback.

gunicorn (PostgreSQL) + two reference workers with the ``echo`` backend; the control plane's
gRPC client (``proto.client``) drives them exactly as the router and reconciler do.
"""

import os
import signal

import pytest

from proto import backend_pb2, client, worker_pb2
from tests.e2e.harness import TOKEN, backend_token, command_token, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_workers_register_heartbeat_serve_backends_and_drain_on_sigterm(fleet):
    fleet.start_web()
    first = fleet.start_worker("e2e-a")
    second = fleet.start_worker("e2e-b")
    nodes = fleet.wait_nodes({"e2e-a", "e2e-b"})
    node_a = nodes["e2e-a"]
    assert node_a["address"] == f"127.0.0.1:{first.port}"
    assert node_a["labels"]["node.replica-slots"] == "2"

    # heartbeats keep arriving
    seen = fleet.nodes()["e2e-a"]["last_heartbeat"]
    wait_for(lambda: fleet.nodes()["e2e-a"]["last_heartbeat"] != seen, timeout=10, what="a later heartbeat")

    # The registration token opens neither the worker service nor (below) a backend.
    with pytest.raises(client.GrpcCallError) as refused:
        client.list_backends(node_a["address"], node_id=node_a["id"], token=TOKEN)
    assert refused.value.code.name == "UNAUTHENTICATED"

    # two replicas of one model on one worker, on distinct ports; LoadModel and Predict through them
    command, data = command_token(node_a["id"]), backend_token(node_a["id"])
    replicas = [
        client.start_backend(node_a["address"], "tiny", "echo", index, node_id=node_a["id"], token=command)
        for index in (0, 1)
    ]
    assert len({replica.address for replica in replicas}) == 2
    options = backend_pb2.ModelOptions(Model="tiny", Options=["echo.memory_bytes=1000"])
    for replica in replicas:
        loaded, message = client.load_model(replica.address, options, token=data)
        assert loaded, message
        reply = client.predict(replica.address, "hello fleet", token=data)
        assert reply.message == b"hello fleet"
        with pytest.raises(client.GrpcCallError) as refused:
            client.predict(replica.address, "hello fleet", token=TOKEN)
        assert refused.value.code.name == "UNAUTHENTICATED"

    # the same key again is the same process
    again = client.start_backend(node_a["address"], "tiny", "echo", 0, node_id=node_a["id"], token=command)
    assert (again.address, again.reused) == (replicas[0].address, True)

    # a call addressed to another node id is refused by the worker
    with pytest.raises(client.GrpcCallError) as refused:
        client.list_backends(node_a["address"], node_id=nodes["e2e-b"]["id"], token=command)
    assert refused.value.code.name == "FAILED_PRECONDITION"

    # a killed backend is reported as exited
    os.kill(replicas[1].pid, signal.SIGKILL)

    def exited():
        listing = client.list_backends(node_a["address"], node_id=node_a["id"], token=command)
        states = {backend.replica_index: backend.state for backend in listing.backends}
        return states.get(1) == worker_pb2.BackendProcess.EXITED

    wait_for(exited, timeout=10, what="killed backend reported EXITED")

    # SIGTERM: drain, deregister (offline, row kept), backends stopped, exit 0
    assert fleet.stop(first, signal.SIGTERM) == 0
    nodes = fleet.nodes()
    assert nodes["e2e-a"]["status"] == "offline"
    assert nodes["e2e-b"]["status"] == "healthy"
    log = first.log()
    assert TOKEN not in log
    with pytest.raises(client.GrpcCallError):
        client.predict(replicas[0].address, "anyone there?", token=data, timeout=1)
    assert second.alive()
