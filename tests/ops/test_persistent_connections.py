"""Persistent database connections are the default (``DATABASE_CONN_MAX_AGE`` 60 s, health
checks on): against the real web process (gunicorn, the shipped configuration) a web thread
keeps its PostgreSQL connection across requests, and when PostgreSQL drops every connection
(what a server restart does to them) the next requests still succeed: the health check finds
the dead connection before it is used and opens a new one."""

import time

import pytest
from django.conf import settings

from tests.e2e.harness import TOKEN, wait_for
from tests.security.edge import start_edge_server
from worker.control_plane import ControlPlaneClient

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_edge_server(tmp_path_factory.mktemp("persistent"), settings.DATABASES["default"])
    yield server
    server.close()


def backends(server) -> list[int]:
    """The PostgreSQL sessions connected to the web process's database."""
    with server._admin_connection() as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (server.database,)
        ).fetchall()
    return [pid for (pid,) in rows]


def test_connections_are_kept_and_a_dropped_one_costs_no_failed_request(server):
    client = ControlPlaneClient(server.base_url, timeout=20)
    node = client.register({"name": f"kept-{time.monotonic_ns()}", "address": "127.0.0.1:50996"}, TOKEN)
    token = node.get("node_token") or TOKEN
    for _ in range(30):
        client.heartbeat(node["id"], token, {})
    kept = backends(server)
    # at most one per thread of the one web process and its heartbeat flusher, not one per request
    assert 1 <= len(kept) <= 8 + 1
    for _ in range(30):
        client.heartbeat(node["id"], token, {})
    assert len(backends(server)) <= 8 + 1  # no growth with the number of requests

    with server._admin_connection() as connection:
        for pid in kept:
            # With a timeout, pg_terminate_backend waits until the backend is gone: without one
            # it only signals it, and a request could pass the health check on a connection
            # that dies a moment later (a drop mid-request, which no health check can hide).
            connection.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    for _ in range(30):  # every thread's connection is dead: each is replaced, no call fails
        assert client.heartbeat(node["id"], token, {"available_vram": 2**30})["status"] == "healthy"
    assert not set(backends(server)) & set(kept)
    # Coalesced heartbeats reach the row within the flush window (registry/heartbeat_flush.py).
    wait_for(
        lambda: server.api("GET", f"/api/v1/nodes/{node['id']}")[1]["available_vram"] == 2**30,
        timeout=10,
        what="the last heartbeat's figure in the row",
    )
