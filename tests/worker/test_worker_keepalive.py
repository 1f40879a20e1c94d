"""The worker's control-plane client keeps one HTTP connection: against the real web process
(gunicorn with the shipped configuration, ``tests.security.edge``, either lane's database)
reached through a counting TCP proxy, heartbeats share one accepted connection; a connection
the server closed (keep-alive expiry, restart) is replaced without a failed call; a reset after
a request went out resends a heartbeat but never a registration."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from django.conf import settings

from tests.e2e.harness import TOKEN, wait_for
from tests.security.edge import start_edge_server
from worker.control_plane import ControlPlaneClient, ControlPlaneUnreachable

# The server closes an idle kept connection after 2 s: long enough for the back-to-back calls
# below to share one, short enough to test expiry.
KEEPALIVE_SECONDS = 2


class CountingProxy:
    """Forwards TCP connections to ``upstream_port``, counting the connections it accepted and
    the requests it swallowed: while ``swallow_next`` is set, the next bytes a client sends are
    dropped and that client's connection closed (a server that closed the connection just as
    the request went out)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.swallowed = 0
        self.swallow_next = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.swallow_next.is_set():
                    self.swallow_next.clear()
                    self.swallowed += 1
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_edge_server(
        tmp_path_factory.mktemp("keepalive"), settings.DATABASES["default"], WEB_KEEPALIVE=str(KEEPALIVE_SECONDS)
    )
    yield server
    server.close()


@pytest.fixture
def proxy(server):
    proxy = CountingProxy(server.web_port)
    yield proxy
    proxy.close()


def register(client: ControlPlaneClient) -> tuple[str, str]:
    answer = client.register(
        {"name": f"keepalive-{time.monotonic_ns()}", "address": "127.0.0.1:50999", "auth_mode": "node_token"},
        TOKEN,
    )
    return answer["id"], answer["node_token"]


def last_heartbeat(server, node_id: str) -> str | None:
    status, node = server.api("GET", f"/api/v1/nodes/{node_id}")
    assert status == 200, node
    return node["last_heartbeat"]


def test_heartbeats_share_one_connection(server, proxy):
    client = ControlPlaneClient(proxy.url, timeout=10)
    node_id, token = register(client)
    for _ in range(20):
        answer = client.heartbeat(node_id, token, {"available_vram": 2**29})
        assert answer["status"] == "healthy"
    assert client.models(node_id, token) == []
    assert proxy.accepted == 1
    assert last_heartbeat(server, node_id) is not None
    client.close()


def test_a_connection_the_server_let_expire_is_replaced_before_sending(server, proxy):
    client = ControlPlaneClient(proxy.url, timeout=10)
    node_id, token = register(client)
    time.sleep(KEEPALIVE_SECONDS + 1.5)  # the server closes the idle connection
    before = last_heartbeat(server, node_id)
    client.heartbeat(node_id, token, {"available_vram": 2**29})
    assert proxy.accepted == 2
    assert proxy.swallowed == 0
    assert last_heartbeat(server, node_id) != before


def test_heartbeats_continue_after_the_server_restarts(server, proxy):
    client = ControlPlaneClient(proxy.url, timeout=10)
    node_id, token = register(client)
    client.heartbeat(node_id, token, {})
    web = server.processes.pop()
    web.popen.terminate()
    web.popen.wait(timeout=20)
    server.spawn("web", server.web_command(server.web_port, 1))
    wait_for(lambda: server._answers("/livez"), timeout=60, what="web up again")
    before = last_heartbeat(server, node_id)
    answer = client.heartbeat(node_id, token, {"available_vram": 2**28})
    assert answer["status"] == "healthy"
    assert proxy.accepted >= 2
    assert last_heartbeat(server, node_id) != before


def test_a_reset_after_sending_resends_a_heartbeat_once(server, proxy):
    client = ControlPlaneClient(proxy.url, timeout=10)
    node_id, token = register(client)
    before = last_heartbeat(server, node_id)
    proxy.swallow_next.set()
    client.heartbeat(node_id, token, {"available_vram": 2**29})
    assert proxy.swallowed == 1
    assert proxy.accepted == 2  # the heartbeat went again, on a new connection
    assert last_heartbeat(server, node_id) != before


def test_a_reset_after_sending_never_resends_a_registration(server, proxy):
    client = ControlPlaneClient(proxy.url, timeout=10)
    node_id, token = register(client)
    proxy.swallow_next.set()
    with pytest.raises(ControlPlaneUnreachable):
        client.register({"name": "never-sent-twice", "address": "127.0.0.1:50998", "auth_mode": "node_token"}, TOKEN)
    assert proxy.swallowed == 1
    assert proxy.accepted == 1  # not sent again
    status, nodes = server.api("GET", "/api/v1/nodes?name=never-sent-twice")
    assert status == 200
    assert nodes["results"] == [] if isinstance(nodes, dict) else nodes == []
    client.heartbeat(node_id, token, {})  # the next call opens a new connection
    assert proxy.accepted == 2
