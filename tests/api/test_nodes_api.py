"""Operator API of nodes: /api/v1/nodes..."""

import uuid

import pytest

from registry.models import Node, NodeLabel, NodeModel
from tests.clients import assert_problem
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

NODES = "/api/v1/nodes"
UNKNOWN = f"{NODES}/{uuid.UUID(int=0)}"


def url(node, suffix=""):
    return f"{NODES}/{node.pk}{suffix}"


# --- list and detail --------------------------------------------------------------------------


def test_list_is_paginated_by_name_with_labels_and_load(operator_client):
    b = make_node(name="b-node", labels={"zone": "b"})
    a = make_node(name="a-node", slots=2)
    make_replica(a, "llama", 0, in_flight=2)
    make_replica(a, "llama", 1, in_flight=1)
    make_replica(a, "bert", 0)

    response = operator_client.get(NODES)

    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 2 and page["next"] is None
    first, second = page["results"]
    assert [first["name"], second["name"]] == ["a-node", "b-node"]
    assert (first["model_count"], first["in_flight_total"]) == (3, 3)
    assert (second["model_count"], second["in_flight_total"]) == (0, 0)
    assert second["labels"]["zone"] == "b" and second["labels"]["node.name"] == "b-node"
    assert second["id"] == str(b.pk)
    assert "token_hash" not in first and "token" not in first


def test_list_pages_with_limit_and_offset(operator_client):
    for name in ("c", "a", "b"):
        make_node(name=name)
    page = operator_client.get(NODES, {"limit": 2, "offset": 1}).json()
    assert [n["name"] for n in page["results"]] == ["b", "c"]
    assert page["count"] == 3 and page["previous"] is not None


def test_list_runs_a_fixed_number_of_queries(operator_client, django_assert_max_num_queries):
    for index in range(2):
        make_replica(make_node(name=f"few-{index}"), "llama", 0)
    with django_assert_max_num_queries(5) as few:
        operator_client.get(NODES)
    for index in range(8):
        make_replica(make_node(name=f"many-{index}"), "llama", 0)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert len(operator_client.get(NODES).json()["results"]) == 10


def test_detail_and_404(operator_client, node):
    response = operator_client.get(url(node))
    assert response.status_code == 200 and response.json()["name"] == "gpu-1"
    assert_problem(operator_client.get(UNKNOWN), 404, "not_found")


def test_delete_is_a_hard_deregister(operator_client, node):
    make_replica(node, "llama", 0)
    assert operator_client.delete(url(node)).status_code == 204
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeModel.objects.exists()
    assert_problem(operator_client.delete(url(node)), 404, "not_found")


# --- status verbs -----------------------------------------------------------------------------


def test_approve_a_pending_node(operator_client):
    node = make_node(status=Node.Status.PENDING)
    response = operator_client.post(url(node, "/approve"))
    assert response.status_code == 200 and response.json()["status"] == "healthy"
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY
    # Repeating it is a no-op.
    assert operator_client.post(url(node, "/approve")).status_code == 200
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


def test_approve_a_draining_node_is_409(operator_client):
    node = make_node(status=Node.Status.DRAINING)
    body = assert_problem(operator_client.post(url(node, "/approve")), 409, "invalid_transition")
    assert body["node_status"] == "draining"


def test_drain_and_resume(operator_client, node):
    assert operator_client.post(url(node, "/drain")).json()["status"] == "draining"
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.OPERATOR)
    assert operator_client.post(url(node, "/resume")).json()["status"] == "healthy"
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.HEALTHY, Node.DrainedBy.NONE)


@pytest.mark.parametrize("verb", ["approve", "drain", "resume"])
def test_verbs_on_unknown_nodes_are_404(operator_client, verb):
    assert_problem(operator_client.post(f"{UNKNOWN}/{verb}"), 404, "not_found")


# --- labels -----------------------------------------------------------------------------------


def test_put_labels_replaces_them(operator_client, node):
    response = operator_client.put(url(node, "/labels"), {"labels": {"zone": "a", "tier": "gold"}}, format="json")
    assert response.status_code == 200
    assert response.json() == {"labels": {"tier": "gold", "zone": "a"}}
    assert NodeLabel.objects.as_dict(node.pk) == {"tier": "gold", "zone": "a"}


def test_patch_labels_merges_them(operator_client, node):
    response = operator_client.patch(url(node, "/labels"), {"labels": {"zone": "a"}}, format="json")
    labels = response.json()["labels"]
    assert labels["zone"] == "a" and labels["node.name"] == "gpu-1"
    assert NodeLabel.objects.as_dict(node.pk) == labels


def test_delete_one_label_including_keys_with_slashes(operator_client, node):
    NodeLabel.objects.merge(node.pk, {"topology.kubernetes.io/zone": "eu-1"})
    assert operator_client.delete(url(node, "/labels/topology.kubernetes.io/zone")).status_code == 204
    assert "topology.kubernetes.io/zone" not in NodeLabel.objects.as_dict(node.pk)
    assert_problem(operator_client.delete(url(node, "/labels/topology.kubernetes.io/zone")), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"labels": {"": "x"}},
        {"labels": {"k": "v" * 256}},
        {"labels": {"k": 1}},
        {"labels": "zone=a"},
        {"zone": "a"},
    ],
)
def test_label_validation(operator_client, node, body):
    assert_problem(operator_client.put(url(node, "/labels"), body, format="json"), 400, "validation_error")


def test_labels_of_unknown_nodes_are_404(operator_client):
    assert_problem(operator_client.put(f"{UNKNOWN}/labels", {"labels": {}}, format="json"), 404, "not_found")
    assert_problem(operator_client.patch(f"{UNKNOWN}/labels", {"labels": {}}, format="json"), 404, "not_found")
    assert_problem(operator_client.delete(f"{UNKNOWN}/labels/zone"), 404, "not_found")


# --- replica slots ----------------------------------------------------------------------------


def test_set_and_reset_max_replicas_per_model(operator_client):
    node = make_node(slots=2)

    response = operator_client.put(url(node, "/max-replicas-per-model"), {"max_replicas_per_model": 4}, format="json")
    assert response.status_code == 200
    assert (response.json()["max_replicas_per_model"], response.json()["max_replicas_per_model_manual"]) == (4, True)
    assert response.json()["labels"]["node.replica-slots"] == "4"
    node.refresh_from_db()
    assert (node.max_replicas_per_model, node.max_replicas_per_model_manual) == (4, True)
    assert NodeLabel.objects.as_dict(node.pk)["node.replica-slots"] == "4"

    response = operator_client.delete(url(node, "/max-replicas-per-model"))
    assert response.status_code == 200
    assert (response.json()["max_replicas_per_model"], response.json()["max_replicas_per_model_manual"]) == (2, False)
    node.refresh_from_db()
    assert (node.max_replicas_per_model, node.max_replicas_per_model_manual) == (2, False)


@pytest.mark.parametrize("value", [0, -1, "3", 1.5, None, 2**31])
def test_max_replicas_validation(operator_client, node, value):
    response = operator_client.put(
        url(node, "/max-replicas-per-model"), {"max_replicas_per_model": value}, format="json"
    )
    assert_problem(response, 400, "validation_error")


def test_max_replicas_of_unknown_nodes_are_404(operator_client):
    body = {"max_replicas_per_model": 2}
    assert_problem(operator_client.put(f"{UNKNOWN}/max-replicas-per-model", body, format="json"), 404, "not_found")
    assert_problem(operator_client.delete(f"{UNKNOWN}/max-replicas-per-model"), 404, "not_found")


# --- auth -------------------------------------------------------------------------------------


OPERATOR_CALLS = [
    ("get", ""),
    ("delete", ""),
    ("post", "/approve"),
    ("post", "/drain"),
    ("post", "/resume"),
    ("put", "/labels"),
    ("patch", "/labels"),
    ("delete", "/labels/zone"),
    ("put", "/max-replicas-per-model"),
    ("delete", "/max-replicas-per-model"),
]


@pytest.mark.parametrize(("method", "suffix"), OPERATOR_CALLS)
def test_operator_calls_refuse_missing_keys_frontend_keys_and_node_tokens(
    api_client, frontend_client, node, method, suffix
):
    assert_problem(getattr(api_client, method)(url(node, suffix), {}, format="json"), 401, "not_authenticated")
    assert_problem(getattr(frontend_client, method)(url(node, suffix), {}, format="json"), 403, "permission_denied")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {node.token}")
    assert_problem(getattr(api_client, method)(url(node, suffix), {}, format="json"), 401, "invalid_token")
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


def test_list_refuses_frontend_keys(frontend_client, api_client):
    assert_problem(frontend_client.get(NODES), 403, "permission_denied")
    assert_problem(api_client.get(NODES), 401, "not_authenticated")


def test_staff_session_may_administer_nodes(staff_client, node):
    assert staff_client.post(url(node, "/drain")).json()["status"] == "draining"
