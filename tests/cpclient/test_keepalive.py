"""``cpclient`` keeps one HTTP connection per thread: against the real web process (gunicorn with
the shipped configuration, ``tests.security.edge``, either lane's database) reached through the
counting TCP proxy of the worker's keep-alive tests, a client's calls share one accepted
connection per thread; a connection the server let expire is replaced without a failed call;
a reset after a request went out resends a release once but never a route (it may have
granted a lease)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from cpclient import ControlPlaneClient
from cpclient.errors import ControlPlaneError, TransportError
from tests.worker.test_worker_keepalive import KEEPALIVE_SECONDS, CountingProxy, server  # noqa: F401 - a fixture

UNKNOWN_MODEL = "never-loaded-model"


@pytest.fixture
def proxy(server):  # noqa: F811 - the imported fixture
    proxy = CountingProxy(server.web_port)
    yield proxy
    proxy.close()


@pytest.fixture
def client(server, proxy):  # noqa: F811
    client = ControlPlaneClient(proxy.url, server.api_key, timeout=10, max_retries=0)
    yield client
    client.close()


def release_unknown(client: ControlPlaneClient) -> str:
    """A release of a lease that does not exist: a 404 problem, no state needed."""
    with pytest.raises(ControlPlaneError) as refused:
        client.release(str(uuid.uuid4()))
    assert refused.value.status == 404
    return refused.value.code


def route_unknown(client: ControlPlaneClient) -> str:
    """A route to a model never loaded, on a fleet without nodes: 503 ``no_matching_nodes``
    (the view answers it, after the lean path's warm pick found nothing; the client is made
    with no 503 retries), no lease."""
    with pytest.raises(ControlPlaneError) as refused:
        client.route(UNKNOWN_MODEL, deadline=20)
    assert refused.value.status == 503
    return refused.value.code


def test_a_clients_calls_share_one_connection(client, proxy):
    for _ in range(10):
        assert route_unknown(client) == "no_matching_nodes"
        assert release_unknown(client) == "not_found"
    assert proxy.accepted == 1


def test_each_thread_keeps_its_own_connection(client, proxy):
    errors = []

    def calls():
        try:
            for _ in range(5):
                release_unknown(client)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert proxy.accepted == 3


def test_a_connection_the_server_let_expire_is_replaced_before_sending(client, proxy):
    route_unknown(client)
    time.sleep(KEEPALIVE_SECONDS + 1.5)  # the server closes the idle connection
    assert route_unknown(client) == "no_matching_nodes"  # not a transport error: nothing was sent on it
    assert proxy.accepted == 2
    assert proxy.swallowed == 0


def test_a_reset_after_sending_resends_a_release_once(client, proxy):
    release_unknown(client)
    proxy.swallow_next.set()
    assert release_unknown(client) == "not_found"
    assert proxy.swallowed == 1
    assert proxy.accepted == 2  # the release went again, on a new connection


def test_a_reset_after_sending_never_resends_a_route(client, proxy):
    release_unknown(client)
    proxy.swallow_next.set()
    with pytest.raises(TransportError):
        client.route(UNKNOWN_MODEL, deadline=20)
    assert proxy.swallowed == 1
    assert proxy.accepted == 1  # not sent again
    release_unknown(client)  # the next call opens a new connection
    assert proxy.accepted == 2
