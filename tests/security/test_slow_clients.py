"""Idle, slow-sending and slow-reading clients against the real web process (gunicorn with the
production config, one worker process as in ``tests.security.edge``): the web tier keeps
answering ``/livez`` and heartbeats within a second while they hold their connections.

With the former sync workers, one idle connection per worker process was enough to leave every
other request unanswered for as long as it stayed open."""

import socket
import threading
import time

import pytest
from django.conf import settings

from .edge import REGISTRATION_TOKEN, build_request, send, start_edge_server

REGISTER = "/api/node/register"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_edge_server(tmp_path_factory.mktemp("slow"), settings.DATABASES["default"])
    yield server
    server.close()


@pytest.fixture
def node(server):
    answer = server.request(
        "POST",
        REGISTER,
        json_body={"name": f"slow-{time.monotonic_ns()}", "address": "127.0.0.1:50999", "total_vram": 2**30},
        credential=REGISTRATION_TOKEN,
    )
    assert answer.status in (200, 201), (answer.status, answer.body)
    document = answer.json()
    return document["id"], document.get("node_token") or REGISTRATION_TOKEN


def timed(call) -> tuple[float, object]:
    began = time.monotonic()
    result = call()
    return time.monotonic() - began, result


def assert_still_answering(server, node, *, within: float = 1.0) -> None:
    node_id, node_token = node
    took, answer = timed(lambda: send(server.web_port, build_request("GET", "/livez"), timeout=10))
    assert answer.status == 200 and took < within, f"/livez took {took:.2f}s"
    took, answer = timed(
        lambda: server.request(
            "POST", f"/api/node/{node_id}/heartbeat", json_body={"available_vram": 2**29}, credential=node_token
        )
    )
    assert answer.status == 200 and took < within, f"heartbeat took {took:.2f}s ({answer.status})"


def open_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def test_idle_connections_do_not_stop_the_web_tier(server, node, report):
    idle = open_connections(server.web_port, 40)  # each sends nothing, ever
    try:
        time.sleep(0.3)  # every one accepted and waiting in the worker
        assert_still_answering(server, node)
        took, _ = timed(lambda: assert_still_answering(server, node))
        report(f"web tier with 40 idle connections open: /livez + heartbeat answered in {took * 1000:.0f} ms")
    finally:
        for sock in idle:
            sock.close()


def test_slow_sending_clients_do_not_stop_the_web_tier(server, node):
    """Three clients send their request one byte every 100 ms (as long as they need, about 9 s);
    meanwhile the web tier answers others at once, and the slow ones get their answers too."""
    request = build_request("GET", "/livez", headers={"User-Agent": "slow-sender/1.0 " + "x" * 40})
    answers: list[bytes] = []
    stop = threading.Event()

    def trickle():
        with socket.create_connection(("127.0.0.1", server.web_port), timeout=30) as sock:
            for byte in request:
                if stop.is_set():
                    return
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
            answers.append(sock.recv(65536))

    senders = [threading.Thread(target=trickle, daemon=True) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        for _ in range(3):  # while they are mid-request
            time.sleep(1.0)
            assert_still_answering(server, node)
    finally:
        for sender in senders:
            sender.join(timeout=30)
        stop.set()
    assert len(answers) == 3 and all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers


def test_slow_reading_clients_do_not_stop_the_web_tier(server, node):
    """Clients that ask for a large document (the OpenAPI schema) and never read the answer."""
    readers = open_connections(server.web_port, 4)
    try:
        for sock in readers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(
                b"GET /api/schema/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 20  # pipelined: far more than buffers hold
            )
        time.sleep(1.0)
        assert_still_answering(server, node)
    finally:
        for sock in readers:
            sock.close()
