"""Coalesced heartbeats (``registry/heartbeat_flush.py``): a steady heartbeat of a node whose token
the process saw accepted is acknowledged into the buffer and written by the next flush, one
``UPDATE ... FROM (VALUES ...)`` for every node, with the token check kept in the statement.

Requests go through the WSGI application gunicorn serves (``controlplane.wsgi``), in this
process; flushes are called by the test (the flusher thread does the same on its timer). The
process across a real SIGTERM: ``tests/e2e/test_heartbeat_ingestion.py``. Transactional tests:
the flusher writes on its own connection, as in a web process.
"""

import io
import json
import random
import sys
import threading
import time

import pytest
from django.core.wsgi import get_wsgi_application
from django.db import connection
from django.test.utils import CaptureQueriesContext

from controlplane.httpserver import served_application
from core.tokens import hash_token
from registry.heartbeat_cache import node_tokens, pending
from registry.heartbeat_flush import flush
from registry.models import Node
from tests.concurrency import run_in_threads
from tests.factories import GIB, make_node

pytestmark = [pytest.mark.django_db(transaction=True)]

application = served_application(get_wsgi_application())


@pytest.fixture(autouse=True)
def _coalescing(transactional_db, registration_settings):
    node_tokens.clear()
    yield
    flush()
    node_tokens.clear()


def heartbeat(node, body: dict, token: str | None = None) -> tuple[int, dict]:
    """POST the heartbeat through the served WSGI application, as gunicorn calls it."""
    content = json.dumps(body).encode()
    path = f"/api/node/{node.pk}/heartbeat"
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "RAW_URI": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "HTTP_AUTHORIZATION": f"Bearer {token or node.token}",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(content)),
        "wsgi.input": io.BytesIO(content),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])

    chunks = application(environ, start_response)
    body = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return answer["status"], json.loads(body)


def row(node) -> Node:
    return Node.objects.get(pk=node.pk)


def statements(action) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        action()
    return [query["sql"].split()[0] for query in queries]


def test_the_second_heartbeat_is_acknowledged_from_memory_and_written_by_the_flush():
    node = make_node(name="steady")
    assert statements(lambda: heartbeat(node, {"available_vram": GIB})) == ["UPDATE"]  # first: written
    first = row(node)
    answers = []
    assert statements(lambda: answers.append(heartbeat(node, {"available_vram": 2 * GIB}))) == []
    assert statements(lambda: answers.append(heartbeat(node, {"available_ram": 3 * GIB}))) == []
    assert answers == [(200, {"status": "healthy", "address": node.address})] * 2
    flush()  # (the flusher thread may have written the first of the two already: the same end)
    stored = row(node)
    assert (stored.available_vram, stored.available_ram) == (2 * GIB, 3 * GIB)  # each figure as last reported
    assert stored.last_heartbeat > first.last_heartbeat


def test_the_batch_writes_what_the_single_heartbeat_writes_and_nothing_else():
    healthy, draining = make_node(name="b-healthy"), make_node(name="b-draining", status=Node.Status.DRAINING)
    unhealthy = make_node(name="b-unhealthy", status=Node.Status.UNHEALTHY)
    offline, pending_node = (
        make_node(name="b-offline", status=Node.Status.OFFLINE),
        make_node(name="b-pending", status=Node.Status.PENDING),
    )
    for node in (healthy, draining):
        assert Node.objects.reserve_vram(node.pk, GIB)
    before = {node.pk: row(node) for node in (healthy, draining, unhealthy, offline, pending_node)}
    received = before[healthy.pk].last_heartbeat.replace(microsecond=123456)
    rows = [
        (healthy.pk, hash_token(healthy.token), received, {"available_vram": 5 * GIB, "available_ram": 3 * GIB}),
        (draining.pk, hash_token(draining.token), received, {"total_disk": 9 * GIB}),
        (unhealthy.pk, hash_token(unhealthy.token), received, {}),
        (offline.pk, hash_token(offline.token), received, {"available_vram": GIB}),
        (pending_node.pk, hash_token(pending_node.token), received, {"available_vram": GIB}),
    ]
    written = Node.objects.heartbeat_batch(rows)
    assert written == {
        (str(node.pk), hash_token(node.token)): (status, node.address)
        for node, status in ((healthy, "healthy"), (draining, "draining"), (unhealthy, "unhealthy"))
    }
    stored = row(healthy)
    assert (stored.available_vram, stored.reserved_vram, stored.available_ram) == (5 * GIB, 0, 3 * GIB)
    assert stored.last_heartbeat == received and stored.total_disk == before[healthy.pk].total_disk
    stored = row(draining)  # no VRAM reported: the reservation stays
    assert (stored.total_disk, stored.reserved_vram, stored.available_vram) == (
        9 * GIB,
        GIB,
        before[draining.pk].available_vram,
    )
    assert row(unhealthy).last_heartbeat == received
    # Pending and offline nodes are not written by a batch (a signed-off worker is not revived
    # by its own last heartbeat): their heartbeats go through heartbeat_with_token.
    for node in (offline, pending_node):
        assert row(node).last_heartbeat == before[node.pk].last_heartbeat
        assert row(node).available_vram == before[node.pk].available_vram


def test_a_token_that_is_not_the_nodes_writes_nothing_in_a_batch():
    node, other = make_node(name="t-own"), make_node(name="t-other")
    before = row(node)
    received = before.last_heartbeat.replace(microsecond=1)
    rows = [(node.pk, hash_token(other.token), received, {"available_vram": 1}), (node.pk, "", received, {})]
    assert Node.objects.heartbeat_batch(rows) == {}
    assert row(node).last_heartbeat == before.last_heartbeat and row(node).available_vram == before.available_vram


def test_a_sign_off_in_this_process_drops_the_pending_heartbeat_and_ends_coalescing():
    node = make_node(name="signing-off")
    heartbeat(node, {})
    heartbeat(node, {"available_vram": GIB})  # pending (unless the flusher thread wrote it already)
    assert Node.objects.mark_offline(node.pk, forget_heartbeat=True)  # what POST .../deregister does
    assert len(pending) == 0
    flush()
    assert row(node).last_heartbeat is None  # not revived by a heartbeat sent before the sign-off
    # Its next heartbeat is news (it comes back): written before the answer, which says offline.
    answers = []
    assert statements(lambda: answers.append(heartbeat(node, {}))) == ["UPDATE"]
    assert answers == [(200, {"status": "offline", "address": node.address})]
    assert row(node).last_heartbeat is not None


@pytest.mark.parametrize("status", [Node.Status.UNHEALTHY, Node.Status.PENDING, Node.Status.OFFLINE])
def test_a_heartbeat_of_a_node_that_is_not_steady_is_written_before_its_answer(status):
    node = make_node(name=f"not-steady-{status}", status=status)
    answers = []
    for _ in range(3):
        assert statements(lambda: answers.append(heartbeat(node, {"available_ram": GIB}))) == ["UPDATE"]
    assert [body["status"] for _, body in answers] == [status] * 3


def test_an_operator_drain_in_this_process_is_answered_by_the_next_heartbeat():
    node = make_node(name="drained-here")
    heartbeat(node, {})
    assert heartbeat(node, {})[1]["status"] == "healthy"  # coalesced
    assert Node.objects.mark_draining(node.pk, by=Node.DrainedBy.OPERATOR)
    assert statements(lambda: heartbeat(node, {})) == ["UPDATE"]  # the cache entry was dropped
    assert heartbeat(node, {})[1]["status"] == "draining"


@pytest.mark.postgres
def test_threads_heartbeating_through_a_token_rotation_and_a_sign_off_lose_nothing(settings, close_thread_connections):
    """Eight threads heartbeat 24 nodes back to back, each heartbeat with a higher
    ``available_vram`` than the last, while a flusher flushes and the main thread rotates one
    node's token (re-registration under a new credential key) and signs another off. Every
    other node's row ends with its last acknowledged figure; nothing sent with the rotated
    token after the rotation is written; the signed-off node is not revived."""
    nodes = [make_node(name=f"load-{i:02d}") for i in range(24)]
    rotated, signed_off = nodes[0], nodes[1]
    old_token = rotated.token
    acknowledged: dict = {}
    stop, rotated_at = threading.Event(), threading.Event()
    signing_off = threading.Event()
    new_token_value = 7 * GIB

    def heartbeats(index):
        mine = nodes[index::8]
        value = index * 10**9
        while not stop.is_set():
            for node in mine:
                if node is signed_off and signing_off.is_set():
                    continue
                value += 1
                status, _ = heartbeat(node, {"available_vram": value}, token=old_token if node is rotated else None)
                if status == 200:
                    acknowledged[node.pk] = value
                    if node is rotated and rotated_at.is_set():
                        acknowledged["after rotation"] = acknowledged.get("after rotation", 0) + 1

    def flusher():
        while not stop.is_set():
            flush()
            time.sleep(0.02)

    def act(index):
        if index < 8:
            return heartbeats(index)
        if index == 8:
            return flusher()
        time.sleep(0.5)
        settings.CONTROLPLANE_CREDENTIAL_KEY = "rotated-" + "k" * 40
        new = Node.objects.register(name=rotated.name, address=rotated.address, presented_node_token=old_token)
        assert new.node_token != old_token
        rotated_at.set()
        assert heartbeat(rotated, {"available_vram": new_token_value}, token=new.node_token)[0] == 200
        signing_off.set()
        time.sleep(0.2)  # its thread's heartbeat in progress is answered
        assert Node.objects.mark_offline(signed_off.pk, forget_heartbeat=True)
        time.sleep(0.5)
        stop.set()

    run_in_threads(act, close_thread_connections, count=10)
    flush()
    # Acknowledged after the rotation: only a heartbeat that found the cache entry just before the
    # rotation dropped it (its flush refuses it); the next ones are refused (401).
    assert acknowledged.get("after rotation", 0) <= 8
    assert row(rotated).available_vram == new_token_value  # nothing the old token sent was written after
    assert row(signed_off).last_heartbeat is None
    for node in nodes[2:]:
        assert row(node).available_vram == acknowledged[node.pk], node.name  # nothing lost
    assert sum(1 for key in acknowledged if key != "after rotation") == 24


@pytest.mark.postgres
def test_concurrent_batches_over_the_same_nodes_never_deadlock(close_thread_connections):
    """Several flushers (web processes) writing overlapping sets of nodes, each listing them in
    its own order: the statement locks the rows in id order, so none waits on another in a cycle."""
    nodes = [make_node(name=f"overlap-{i:03d}") for i in range(60)]
    received = row(nodes[0]).last_heartbeat

    def batches(index):
        shuffled = random.Random(index).sample(nodes, len(nodes))
        for round_ in range(15):
            rows = [(node.pk, hash_token(node.token), received, {"available_ram": round_}) for node in shuffled]
            assert len(Node.objects.heartbeat_batch(rows)) == len(nodes)

    run_in_threads(batches, close_thread_connections, count=6)
