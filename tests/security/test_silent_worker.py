"""A worker address that accepts TCP and never answers (a hung worker, a black-holing middlebox)
through the real web process (gunicorn with the production config; cold loads run in it,
``CONTROLPLANE_LOAD_JOB_RUNNER=thread``): a cold route gives up within seconds, not after
StartBackend's 30 s deadline, and a heartbeat sent meanwhile is answered at once.

Before: each such cold route took 20-29 s, and a heartbeat sent meanwhile waited 28.8 s."""

import socket
import threading
import time

import pytest
from django.conf import settings

from .edge import REGISTRATION_TOKEN, start_edge_server

CONNECT_TIMEOUT_S = 3.0  # CONTROLPLANE_GRPC_CONNECT_TIMEOUT's default


@pytest.fixture
def silent_listener():
    """A TCP listener that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", accepted
    stop.set()
    thread.join(2)
    for sock in accepted:
        sock.close()
    listener.close()


@pytest.fixture
def server(tmp_path):
    server = start_edge_server(tmp_path, settings.DATABASES["default"], CONTROLPLANE_LOAD_JOB_RUNNER="thread")
    yield server
    server.close()


def test_a_cold_route_to_a_worker_that_never_answers_fails_fast_and_heartbeats_go_on(server, silent_listener, report):
    address, accepted = silent_listener
    answer = server.request(
        "POST",
        "/api/node/register",
        # A worker declaring its worker gRPC service, so placement uses it at once.
        json_body={"name": "silent-1", "address": address, "total_vram": 8 * 2**30, "serves_worker_api": True},
        credential=REGISTRATION_TOKEN,
    )
    assert answer.status in (200, 201), answer.body
    node_id = answer.json()["id"]
    node_token = answer.json().get("node_token") or REGISTRATION_TOKEN

    def heartbeat():
        return server.request(
            "POST", f"/api/node/{node_id}/heartbeat", json_body={"available_vram": 8 * 2**30}, credential=node_token
        )

    assert heartbeat().status == 200
    assert server.request(
        "PUT",
        "/api/v1/models/silent-model/load-info",
        json_body={"backend_type": "echo", "model_options": {"Model": "silent-model"}},
        credential=server.api_key,
    ).status in (200, 201)

    routed: dict = {}

    def cold_route():
        began = time.monotonic()
        routed["answer"] = server.request(
            "POST", "/api/v1/models/silent-model/route", json_body={"wait_seconds": 60}, credential=server.api_key
        )
        routed["took"] = time.monotonic() - began

    router = threading.Thread(target=cold_route)
    router.start()
    time.sleep(1.0)  # the load is now waiting on the silent worker
    assert router.is_alive(), routed
    began = time.monotonic()
    beat = heartbeat()
    heartbeat_took = time.monotonic() - began
    router.join(30)
    assert not router.is_alive(), "the cold route is still waiting after 30 s"

    assert beat.status == 200 and heartbeat_took < 1.0, f"heartbeat took {heartbeat_took:.2f}s"
    assert accepted, "the control plane never dialled the silent worker"
    answer = routed["answer"]
    assert answer.status >= 400 and answer.problem()["code"], (answer.status, answer.body)
    assert routed["took"] < CONNECT_TIMEOUT_S + 3, f"the cold route took {routed['took']:.1f}s"
    report(
        f"cold route to a worker that accepts TCP and never answers: {answer.status} "
        f"{answer.problem()['code']} after {routed['took']:.1f} s; heartbeat meanwhile {heartbeat_took * 1000:.0f} ms"
    )
