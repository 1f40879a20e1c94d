"""No caller grows a node's labels without bound.

Before: labels sent at registration were merged and never pruned, so every re-registration
with new keys added rows (5 registrations with 10,000 keys each left 50,003 rows, and the node's
admin page could no longer be saved). Now a registration's labels replace those the worker sent
last time, operator labels are kept (and win on a shared key), and every write that would leave
a node with more than ``CONTROLPLANE_MAX_LABELS_PER_NODE`` labels is a 409 ``too_many_labels``
that writes nothing.
"""

import pytest

from registry.managers import max_labels_per_node
from registry.models import Node, NodeLabel
from tests.clients import REGISTRATION_TOKEN, assert_problem, bearer

pytestmark = pytest.mark.django_db

REGISTER = "/api/node/register"
BODY = {"name": "gpu-1", "address": "127.0.0.1:50051", "auth_mode": "node_token"}
AUTO = 3  # gpu.vendor, node.name, node.replica-slots (no VRAM reported: no gpu.vram)


def register(api_client, labels, **body):
    """Register as the reference worker does; a returning worker presents its kept node token."""
    body = {**BODY, **body, "labels": labels}
    headers = bearer(REGISTRATION_TOKEN)
    if body["name"] in _kept_tokens:
        headers["HTTP_X_NODE_TOKEN"] = _kept_tokens[body["name"]]
    response = api_client.post(REGISTER, body, format="json", **headers)
    if response.status_code == 201:
        _kept_tokens[body["name"]] = response.json()["node_token"]
    return response


@pytest.fixture(autouse=True)
def _kept_tokens_per_test():
    _kept_tokens.clear()


_kept_tokens: dict[str, str] = {}


def labels_of(node_id) -> dict:
    return NodeLabel.objects.as_dict(node_id)


def test_re_registering_with_new_label_keys_never_grows_the_nodes_labels(api_client):
    for round_ in range(20):
        response = register(api_client, {f"key-{round_}-{i}": "v" for i in range(64)})
        assert response.status_code == 201, response.content
    node_id = response.json()["id"]
    labels = labels_of(node_id)
    assert len(labels) == 64 + AUTO
    assert all(key.startswith("key-19-") for key in labels if key.startswith("key-"))


def test_a_registration_over_the_request_limit_is_a_400(api_client):
    response = register(api_client, {f"k{i}": "v" for i in range(10_000)})
    assert_problem(response, 400, "validation_error")
    assert not Node.objects.exists()


def test_re_registration_replaces_the_workers_labels_and_keeps_the_operators(api_client, operator_client):
    node_id = register(api_client, {"zone": "a", "rack": "1"}).json()["id"]
    operator_client.patch(f"/api/v1/nodes/{node_id}/labels", {"labels": {"team": "ml", "rack": "7"}}, format="json")

    register(api_client, {"zone": "b", "rack": "2"})

    labels = labels_of(node_id)
    assert labels["zone"] == "b"  # the worker's own label, updated
    assert labels["rack"] == "7"  # the operator's value wins on a shared key
    assert labels["team"] == "ml"  # operator labels survive
    register(api_client, {})
    assert "zone" not in labels_of(node_id) and labels_of(node_id)["team"] == "ml"


def test_an_operator_merge_past_the_bound_is_a_409_that_writes_nothing(api_client, operator_client, settings):
    settings.CONTROLPLANE_MAX_LABELS_PER_NODE = 10
    node_id = register(api_client, {"zone": "a"}).json()["id"]
    before = labels_of(node_id)

    response = operator_client.patch(
        f"/api/v1/nodes/{node_id}/labels", {"labels": {f"t{i}": "x" for i in range(7)}}, format="json"
    )

    body = assert_problem(response, 409, "too_many_labels")
    assert body["max_labels_per_node"] == 10 and body["labels_after_write"] == 11
    assert labels_of(node_id) == before
    # within the bound it works, and a replace is bounded the same way
    ok = operator_client.patch(
        f"/api/v1/nodes/{node_id}/labels", {"labels": {f"t{i}": "x" for i in range(6)}}, format="json"
    )
    assert ok.status_code == 200 and len(ok.json()["labels"]) == 10
    too_many = operator_client.put(
        f"/api/v1/nodes/{node_id}/labels", {"labels": {f"r{i}": "x" for i in range(11)}}, format="json"
    )
    assert_problem(too_many, 409, "too_many_labels")
    assert len(labels_of(node_id)) == 10


def test_a_registration_past_the_bound_is_a_409_that_changes_nothing(api_client, operator_client, settings):
    settings.CONTROLPLANE_MAX_LABELS_PER_NODE = 10
    first = register(api_client, {"zone": "a"}).json()
    operator_client.patch(
        f"/api/v1/nodes/{first['id']}/labels", {"labels": {f"t{i}": "x" for i in range(6)}}, format="json"
    )
    before = labels_of(first["id"])

    response = register(api_client, {"zone": "a", "extra": "1", "more": "2"}, address="127.0.0.1:60000")

    assert_problem(response, 409, "too_many_labels")
    node = Node.objects.get(pk=first["id"])
    assert node.address == "127.0.0.1:50051"  # the whole registration was rolled back
    assert labels_of(first["id"]) == before


def test_the_default_bound_leaves_room_for_a_full_registration_and_operator_labels():
    assert max_labels_per_node() >= 64 + 4 + 32
