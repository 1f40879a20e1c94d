"""Only an operator's approval takes a node out of ``pending``, and a drain is lifted by
whoever set it: driven through the real verbs, the node's own calls with its node token and the
operator's with an operator key.

Before: a pending node became healthy through its own ``/drain`` then ``/resume``, or by
deregistering and registering again; a node undid an operator's drain with its ``/resume``.
"""

import pytest

from registry.models import Node
from tests.clients import REGISTRATION_TOKEN, assert_problem, bearer

pytestmark = pytest.mark.django_db

REGISTER = "/api/node/register"
BODY = {"name": "gpu-1", "address": "127.0.0.1:50051", "auth_mode": "node_token", "serves_worker_api": True}


def register(api_client, **body):
    """Register (or come back) as the reference worker does: a returning worker presents the
    node token it kept (``X-Node-Token``), so only the node itself can re-register its name."""
    body = {**BODY, **body}
    headers = bearer(REGISTRATION_TOKEN)
    kept = _kept_tokens.get(body["name"])
    if kept:
        headers["HTTP_X_NODE_TOKEN"] = kept
    response = api_client.post(REGISTER, body, format="json", **headers)
    assert response.status_code == 201, response.content
    answer = response.json()
    _kept_tokens[body["name"]] = answer["node_token"]
    return answer


@pytest.fixture(autouse=True)
def _kept_tokens_per_test():
    _kept_tokens.clear()


_kept_tokens: dict[str, str] = {}


def node_call(api_client, registered, verb):
    return api_client.post(f"/api/node/{registered['id']}/{verb}", **bearer(registered["node_token"]))


def operator_call(operator_client, registered, verb):
    return operator_client.post(f"/api/v1/nodes/{registered['id']}/{verb}")


def status_of(registered) -> str:
    return Node.objects.get(pk=registered["id"]).status


@pytest.fixture
def manual_approval(settings):
    settings.CONTROLPLANE_AUTO_APPROVE = False


# --- pending: only approval ends it ------------------------------------------------------


def test_a_pending_node_cannot_drain_or_resume_itself_into_healthy(api_client, manual_approval):
    node = register(api_client)
    assert node["status"] == Node.Status.PENDING

    assert_problem(node_call(api_client, node, "drain"), 409, "invalid_transition")
    assert_problem(node_call(api_client, node, "resume"), 409, "invalid_transition")
    assert status_of(node) == Node.Status.PENDING


def test_an_operator_cannot_drain_a_pending_node_either(api_client, operator_client, manual_approval):
    node = register(api_client)
    assert_problem(operator_call(operator_client, node, "drain"), 409, "invalid_transition")
    assert status_of(node) == Node.Status.PENDING


def test_a_pending_node_that_signs_off_and_registers_again_is_still_pending(api_client, manual_approval, settings):
    node = register(api_client)
    response = node_call(api_client, node, "deregister")
    assert response.status_code == 200 and response.json()["status"] == Node.Status.PENDING

    again = register(api_client)
    assert again["id"] == node["id"] and again["status"] == Node.Status.PENDING
    # also when auto-approve was switched on meanwhile: the name's node was never approved
    settings.CONTROLPLANE_AUTO_APPROVE = True
    node_call(api_client, again, "deregister")
    assert register(api_client)["status"] == Node.Status.PENDING


def test_a_pending_node_leaves_pending_only_through_the_operators_approval(
    api_client, operator_client, manual_approval
):
    node = register(api_client)
    assert operator_call(operator_client, node, "approve").json()["status"] == Node.Status.HEALTHY
    # an approved node keeps its approval across sign-off and registration, auto-approve off
    node_call(api_client, node, "deregister")
    assert status_of(node) == Node.Status.OFFLINE
    assert register(api_client)["status"] == Node.Status.HEALTHY


# --- drains belong to whoever set them ---------------------------------------------------


def test_a_node_cannot_lift_an_operators_drain(api_client, operator_client):
    node = register(api_client)
    assert operator_call(operator_client, node, "drain").json()["status"] == Node.Status.DRAINING

    body = assert_problem(node_call(api_client, node, "resume"), 409, "drained_by_operator")
    assert body["node_status"] == Node.Status.DRAINING
    stored = Node.objects.get(pk=node["id"])
    assert (stored.status, stored.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.OPERATOR)

    # its own drain call changes nothing either (the drain stays the operator's)
    assert node_call(api_client, node, "drain").json()["status"] == Node.Status.DRAINING
    assert_problem(node_call(api_client, node, "resume"), 409, "drained_by_operator")

    # the operator lifts it
    resumed = operator_call(operator_client, node, "resume").json()
    assert resumed["status"] == Node.Status.HEALTHY and resumed["drained_by"] == ""


def test_a_node_lifts_its_own_drain(api_client):
    node = register(api_client)
    assert node_call(api_client, node, "drain").json()["status"] == Node.Status.DRAINING
    assert Node.objects.get(pk=node["id"]).drained_by == Node.DrainedBy.NODE
    assert node_call(api_client, node, "resume").json()["status"] == Node.Status.HEALTHY


def test_an_operators_drain_takes_over_the_nodes_own_drain(api_client, operator_client):
    node = register(api_client)
    node_call(api_client, node, "drain")
    assert operator_call(operator_client, node, "drain").json()["drained_by"] == Node.DrainedBy.OPERATOR
    assert_problem(node_call(api_client, node, "resume"), 409, "drained_by_operator")


def test_an_operators_drain_survives_the_workers_restart(api_client, operator_client):
    node = register(api_client)
    operator_call(operator_client, node, "drain")
    # graceful shutdown, then the worker starts again
    assert node_call(api_client, node, "deregister").json()["status"] == Node.Status.OFFLINE
    again = register(api_client)
    assert again["status"] == Node.Status.DRAINING
    assert_problem(node_call(api_client, again, "resume"), 409, "drained_by_operator")
    assert operator_call(operator_client, again, "resume").json()["status"] == Node.Status.HEALTHY


def test_a_nodes_own_drain_ends_with_its_restart(api_client):
    node = register(api_client)
    node_call(api_client, node, "drain")
    node_call(api_client, node, "deregister")
    again = register(api_client)
    assert again["status"] == Node.Status.HEALTHY
    assert Node.objects.get(pk=node["id"]).drained_by == ""


def test_an_operator_drained_node_that_comes_back_from_offline_is_draining_again(api_client, operator_client, now):
    """The reconciler's recovery (offline -> heartbeats again) keeps an operator's drain."""
    node = register(api_client)
    operator_call(operator_client, node, "drain")
    Node.objects.mark_offline(node["id"], now=now)  # the reconciler reaping a stale node
    assert Node.objects.mark_healthy(node["id"], now=now)
    assert status_of(node) == Node.Status.DRAINING


def test_the_admin_drain_is_an_operators_drain(api_client, admin_client):
    node = register(api_client)
    response = admin_client.post(
        "/admin/registry/node/", {"action": "drain", "_selected_action": [node["id"]]}, follow=True
    )
    assert response.status_code == 200
    assert_problem(node_call(api_client, node, "resume"), 409, "drained_by_operator")
    admin_client.post("/admin/registry/node/", {"action": "resume", "_selected_action": [node["id"]]})
    assert status_of(node) == Node.Status.HEALTHY
