"""The heartbeat checks the node token in its own UPDATE (``Node.objects.heartbeat_with_token``)
instead of reading the node first; the answers (and their problems) stay those of every node
call. Across processes: web processes (gunicorn, the shipped configuration) on one database; a
token rotated or a node deleted through one never writes through another, which refuses it
(401) from the first flush after its first use there on (``registry/heartbeat_flush.py``: until
then the other process may still acknowledge it from its token cache, writing nothing)."""

import time
import urllib.request

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.tokens import hash_token
from registry.models import Node
from tests.clients import REGISTRATION_TOKEN, assert_problem, bearer
from tests.e2e.harness import TOKEN, free_port, wait_for
from tests.factories import GIB, make_node
from tests.security.edge import start_edge_server
from worker.control_plane import ControlPlaneClient, ControlPlaneError

pytestmark = pytest.mark.django_db


def heartbeat_url(node) -> str:
    return f"/api/node/{node.pk}/heartbeat"


def test_a_heartbeat_is_one_statement_and_records_the_figures(node, node_client):
    before = last_heartbeat(node)
    with CaptureQueriesContext(connection) as queries:
        response = node_client.post(heartbeat_url(node), {"available_vram": 5 * GIB}, format="json")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "healthy", "address": node.address}
    assert [query["sql"].split()[0] for query in queries] == ["UPDATE"]
    stored = Node.objects.get(pk=node.pk)
    assert stored.available_vram == 5 * GIB
    assert stored.last_heartbeat != before


def last_heartbeat(node):
    return Node.objects.get(pk=node.pk).last_heartbeat


def test_heartbeat_with_token_needs_the_nodes_own_token_hash(node, other_node):
    before = last_heartbeat(node)
    assert Node.objects.heartbeat_with_token(node.pk, hash_token(other_node.token), available_vram=GIB) is None
    assert Node.objects.heartbeat_with_token(node.pk, "", available_vram=GIB) is None
    assert last_heartbeat(node) == before
    answer = Node.objects.heartbeat_with_token(node.pk, hash_token(node.token), available_vram=GIB)
    assert answer == ("healthy", node.address)
    stored = Node.objects.get(pk=node.pk)
    assert stored.available_vram == GIB and stored.last_heartbeat != before


def test_a_pending_node_gets_only_the_timestamp(api_client):
    pending = make_node(name="pending-1", status=Node.Status.PENDING)
    before = Node.objects.get(pk=pending.pk)
    response = api_client.post(heartbeat_url(pending), {"available_vram": 1}, format="json", **bearer(pending.token))
    assert response.json()["status"] == "pending"
    stored = Node.objects.get(pk=pending.pk)
    assert stored.available_vram == before.available_vram and stored.last_heartbeat != before.last_heartbeat


@pytest.mark.parametrize(
    "credential, status, code",
    [("another node's", 403, "node_token_mismatch"), ("an unknown", 401, "invalid_token")],
)
def test_a_refused_token_gets_the_problem_of_every_node_call_and_writes_nothing(
    api_client, node, other_node, credential, status, code
):
    token = other_node.token if credential == "another node's" else "cpn_not-a-token"
    before = last_heartbeat(node), last_heartbeat(other_node)
    response = api_client.post(heartbeat_url(node), {"available_vram": GIB}, format="json", **bearer(token))
    assert_problem(response, status, code)
    assert (last_heartbeat(node), last_heartbeat(other_node)) == before


def test_an_unknown_token_with_an_unreadable_body_is_401_first(api_client, node):
    response = api_client.post(
        heartbeat_url(node), b"{not json", content_type="application/json", **bearer("cpn_not-a-token")
    )
    assert_problem(response, 401, "invalid_token")


def test_the_right_token_with_an_unreadable_body_is_400(node_client, node):
    before = last_heartbeat(node)
    response = node_client.post(heartbeat_url(node), b"{not json", content_type="application/json")
    assert_problem(response, 400)
    assert last_heartbeat(node) == before


def test_the_right_token_with_an_invalid_body_is_400(node_client, node):
    before = last_heartbeat(node)
    response = node_client.post(heartbeat_url(node), {"available_vram": -1}, format="json")
    assert_problem(response, 400)
    assert last_heartbeat(node) == before


def test_the_fleet_token_still_drives_a_fleet_token_node(api_client, settings):
    settings.CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES = True
    localai = make_node(name="localai-1", auth_mode=Node.AuthMode.FLEET_TOKEN)
    response = api_client.post(
        heartbeat_url(localai), {"available_vram": GIB}, format="json", **bearer(REGISTRATION_TOKEN)
    )
    assert response.status_code == 200, response.content
    assert Node.objects.get(pk=localai.pk).available_vram == GIB


# ----- two web processes on one database -----------------------------------------------------


@pytest.fixture(scope="module")
def web_processes(tmp_path_factory):
    """The edge server's web process, a second one on the same database, and a third whose
    credential key differs (an operator rotating ``CONTROLPLANE_CREDENTIAL_KEY``: a node that
    re-registers through it gets a new token)."""
    fleet = start_edge_server(tmp_path_factory.mktemp("web-processes"), settings.DATABASES["default"])
    try:
        urls = [fleet.base_url]
        for name, env in (("web-2", {}), ("web-rotated", {"CONTROLPLANE_CREDENTIAL_KEY": "rotated-" + "k" * 40})):
            port = free_port()
            fleet.spawn(name, fleet.web_command(port, 1), **env)
            urls.append(f"http://127.0.0.1:{port}")
            wait_for(lambda url=urls[-1]: answers(url + "/livez"), timeout=60, what=f"{name} up")
        yield fleet, *urls
    finally:
        fleet.close()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def register(url: str, name: str, node_token: str | None = None) -> dict:
    body = {"name": name, "address": "127.0.0.1:50997", "auth_mode": "node_token"}
    return ControlPlaneClient(url, timeout=20).register(body, TOKEN, node_token)


def refused_after_a_flush(client, node_id: str, token: str, body: dict) -> ControlPlaneError:
    """Heartbeats with a token the database no longer accepts, sent to a process that confirmed
    it before: the first may be acknowledged from that process's cache (it writes nothing);
    the flush that carries it drops the entry, so one a flush window later is refused."""
    for _ in range(2):
        try:
            client.heartbeat(node_id, token, body)
        except ControlPlaneError as exc:
            return exc
        time.sleep(FLUSH_WINDOW)
    raise AssertionError("the refused token was still acknowledged after a flush")


# The shipped CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS (0.2 s), with room for a shared machine.
FLUSH_WINDOW = 2.0


def test_a_token_rotated_in_one_process_never_writes_through_another(web_processes):
    fleet, first, second, rotated = web_processes
    name = f"rotated-{time.monotonic_ns()}"
    old = register(first, name)
    other = ControlPlaneClient(second, timeout=20)
    assert other.heartbeat(old["id"], old["node_token"], {})["status"] == "healthy"
    new = register(rotated, name, node_token=old["node_token"])  # re-registration under the new key
    assert new["id"] == old["id"] and new["node_token"] != old["node_token"]
    refused = refused_after_a_flush(other, old["id"], old["node_token"], {"available_vram": GIB})
    assert (refused.status, refused.code) == (401, "invalid_token")
    status, node = fleet.api("GET", f"/api/v1/nodes/{old['id']}")
    assert status == 200 and node["available_vram"] != GIB
    assert other.heartbeat(new["id"], new["node_token"], {"available_vram": GIB})["status"] == "healthy"
    status, node = fleet.api("GET", f"/api/v1/nodes/{old['id']}")
    assert node["available_vram"] == GIB  # a token's first heartbeat in a process is written at once


def test_a_node_deleted_in_one_process_is_refused_by_the_other(web_processes):
    fleet, first, second, _ = web_processes
    answer = register(first, f"deleted-{time.monotonic_ns()}")
    other = ControlPlaneClient(second, timeout=20)
    assert other.heartbeat(answer["id"], answer["node_token"], {})["status"] == "healthy"
    status, _ = fleet.api("DELETE", f"/api/v1/nodes/{answer['id']}")
    assert status == 204
    refused = refused_after_a_flush(other, answer["id"], answer["node_token"], {})
    assert (refused.status, refused.code) == (401, "invalid_token")
    status, _ = fleet.api("GET", f"/api/v1/nodes/{answer['id']}")
    assert status == 404  # the refused heartbeat did not bring the row back
