"""Operator API of config revisions: the history, the rollback, the current revision on the
model, and the revision every replica row carries."""

import base64

import pytest

from registry.models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, NodeModel
from tests.clients import assert_problem
from tests.factories import make_node

pytestmark = pytest.mark.django_db

MODEL = "org/llama-3.1-8b.gguf"
BLOB_A = b"\x0a\x05llama"
BLOB_B = b"\x0a\x05llama\x10\x01"


def _history():
    ModelLoadInfo.objects.upsert(MODEL, "llama-cpp", BLOB_A)
    ModelSchedulingConfig.objects.upsert(MODEL, min_replicas=1)
    ModelLoadInfo.objects.upsert(MODEL, "llama-cpp", BLOB_B)


def test_model_status_carries_the_current_revision(frontend_client):
    _history()
    body = frontend_client.get(f"/api/v1/models/{MODEL}").json()
    assert body["revision"] == 3


def test_revisions_are_listed_newest_first_with_who_and_why(operator_client):
    ModelLoadInfo.objects.upsert(MODEL, "llama-cpp", BLOB_A)
    operator_client.put(f"/api/v1/models/{MODEL}/scheduling", {"min_replicas": 2}, format="json")

    response = operator_client.get(f"/api/v1/models/{MODEL}/revisions")

    assert response.status_code == 200, response.content
    rows = response.json()["results"]
    assert [(r["revision"], r["current"]) for r in rows] == [(2, True), (1, False)]
    assert rows[0]["reason"] == "scheduling config changed" and rows[0]["created_by"].startswith("api_key:")
    assert rows[0]["scheduling"]["min_replicas"] == 2
    assert base64.b64decode(rows[1]["model_options_b64"]) == BLOB_A


def test_rollback_restores_as_a_new_revision(operator_client):
    _history()

    response = operator_client.post(f"/api/v1/models/{MODEL}/rollback", {"revision": 1}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["revision"], body["current"], body["reason"]) == (4, True, "rollback to revision 1")
    assert ModelLoadInfo.objects.for_model(MODEL).model_opts_blob == BLOB_A
    assert ModelRevision.objects.head(MODEL).number == 4


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"revision": 9}, 404, "revision_not_found"),
        ({"revision": 3}, 409, "revision_current"),
        ({"revision": 0}, 400, "validation_error"),
        ({"revision": "1"}, 400, "validation_error"),
        ({}, 400, "validation_error"),
        ({"revision": 1, "extra": True}, 400, "validation_error"),
    ],
)
def test_bad_rollbacks_are_problems(operator_client, payload, status, code):
    _history()
    response = operator_client.post(f"/api/v1/models/{MODEL}/rollback", payload, format="json")
    assert_problem(response, status, code)
    assert ModelRevision.objects.head(MODEL).number == 3


def test_rollback_needs_the_operator(frontend_client):
    _history()
    response = frontend_client.post(f"/api/v1/models/{MODEL}/rollback", {"revision": 1}, format="json")
    assert response.status_code == 403
    assert ModelRevision.objects.head(MODEL).number == 3


def test_replicas_list_carries_revision_and_filters(operator_client, now):
    node, other = make_node(name="a"), make_node(name="b")
    ModelLoadInfo.objects.upsert(MODEL, "llama-cpp", BLOB_A)
    NodeModel.objects.record_loaded(node.pk, MODEL, 0, address="h:1", revision=1, now=now)
    NodeModel.objects.claim_loading(other.pk, MODEL, slots=2, revision=1, now=now)
    NodeModel.objects.record_loaded(other.pk, "phi", 0, address="h:2", now=now)

    rows = operator_client.get(f"/api/v1/replicas?model={MODEL}&state=loaded").json()["results"]

    assert len(rows) == 1
    row = rows[0]
    assert {"id", "node_id", "model_name", "replica_index", "address", "state", "in_flight", "revision"} <= set(row)
    assert (row["node_id"], row["state"], row["revision"], row["draining_since"]) == (str(node.pk), "loaded", 1, None)
    by_node = operator_client.get(f"/api/v1/replicas?node={other.pk}").json()["results"]
    assert {(r["model_name"], r["revision"]) for r in by_node} == {(MODEL, 1), ("phi", None)}
    assert_problem(operator_client.get("/api/v1/replicas?state=gone"), 400, "validation_error")
