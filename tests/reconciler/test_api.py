"""The reconciler's operator API: /api/v1/reconcile, /models, /models/{model}, /events."""

from datetime import timedelta

import pytest
from rest_framework.test import APIClient

from reconciler.models import Event, ModelCondition
from registry.locks import LockKey, advisory_lock
from registry.models import ModelLoadInfo
from tests.clients import assert_problem
from tests.concurrency import held_in_another_thread
from tests.factories import make_node, make_replica, make_scheduling

pytestmark = pytest.mark.django_db

@pytest.fixture(autouse=True)
def _registration(registration_settings):
    return registration_settings


# --- POST /reconcile ------------------------------------------------------------------------


def test_reconcile_now_runs_a_pass_and_answers_its_summary(operator_client):
    make_node(name="gpu-a", address="")  # no worker address: nothing to call over gRPC
    make_scheduling("llama", min_replicas=1)  # no load info: skipped, the scheduler is not needed

    response = operator_client.post("/api/v1/reconcile")

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["outcome"], body["reason"]) == ("ok", "")
    assert body["skipped"] == {"no_load_info": 1}
    assert body["models"] == 1
    assert ModelCondition.objects.filter(model_name="llama").exists()


def test_reconcile_now_needs_an_operator(frontend_client):
    assert_problem(frontend_client.post("/api/v1/reconcile"), 403, "permission_denied")
    assert_problem(APIClient().post("/api/v1/reconcile"), 401, "not_authenticated")


def test_reconcile_now_while_a_pass_runs_answers_skipped_held(operator_client, close_thread_connections):
    with held_in_another_thread(lambda: advisory_lock(LockKey.RECONCILE, timeout=5), close_thread_connections):
        response = operator_client.post("/api/v1/reconcile")

    assert response.status_code == 200
    assert (response.json()["outcome"], response.json()["reason"]) == ("skipped", "held")


def test_a_failing_pass_is_a_503_problem_with_the_summary(operator_client, monkeypatch):
    from reconciler import apply

    def broken(**kwargs):
        raise RuntimeError("snapshot exploded")

    monkeypatch.setattr(apply, "take_snapshot", broken)

    response = operator_client.post("/api/v1/reconcile")

    assert_problem(response, 503, "reconcile_failed")
    assert response.json()["summary"]["outcome"] == "error"
    assert "snapshot exploded" in response.json()["detail"]


# --- GET /models -----------------------------------------------------------------------------


def test_models_lists_every_known_model_with_counts_and_conditions(frontend_client, now):
    node = make_node(name="gpu-a", slots=3)
    make_scheduling("llama", min_replicas=2, max_replicas=3, node_selector={"zone": "a"})
    ModelLoadInfo.objects.upsert("only-info", "llama-cpp", b"x")
    make_replica(node, "org/qwen-2.5.gguf", 0)
    make_replica(node, "org/qwen-2.5.gguf", 1, state="loading")
    ModelCondition.objects.set_condition("llama", ModelCondition.Type.AVAILABLE, False, "below_minimum", "0 of 2", now=now)

    response = frontend_client.get("/api/v1/models")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["count"] == 3
    by_name = {m["model_name"]: m for m in body["results"]}
    assert list(by_name) == ["llama", "only-info", "org/qwen-2.5.gguf"]
    llama = by_name["llama"]
    assert (llama["min_replicas"], llama["max_replicas"], llama["autoscaled"]) == (2, 3, True)
    assert llama["node_selector"] == {"zone": "a"}
    assert [(c["type"], c["status"], c["reason"]) for c in llama["conditions"]] == [
        ("Available", False, "below_minimum")
    ]
    qwen = by_name["org/qwen-2.5.gguf"]
    assert (qwen["ready_replicas"], qwen["loading_replicas"], qwen["replicas"]) == (1, 1, 2)
    assert (qwen["configured"], qwen["load_info"]) == (False, None)
    assert by_name["only-info"]["load_info"] == "model"


def test_models_are_paginated(frontend_client):
    for i in range(5):
        make_scheduling(f"m-{i}", min_replicas=1)

    body = frontend_client.get("/api/v1/models", {"limit": 2, "offset": 2}).json()

    assert body["count"] == 5
    assert [m["model_name"] for m in body["results"]] == ["m-2", "m-3"]


def test_one_model_by_a_name_with_slashes(frontend_client):
    node = make_node(name="gpu-a")
    make_replica(node, "org/llama-3.1-8b.gguf", 0)

    response = frontend_client.get("/api/v1/models/org/llama-3.1-8b.gguf")

    assert response.status_code == 200, response.content
    assert response.json()["ready_replicas"] == 1


def test_an_unknown_model_is_a_404_problem(frontend_client):
    assert_problem(frontend_client.get("/api/v1/models/nope"), 404, "not_found")


def test_registry_sub_resources_are_not_taken_for_model_names(operator_client):
    make_scheduling("org/llama", min_replicas=1)

    scheduling = operator_client.get("/api/v1/models/org/llama/scheduling")
    load_info = operator_client.get("/api/v1/models/org/llama/load-info")

    assert scheduling.status_code == 200 and "ready_replicas" not in scheduling.json()
    assert scheduling.json()["min_replicas"] == 1
    assert_problem(load_info, 404, "no_load_info")


def test_models_after_a_pass_show_the_reconcilers_conditions(operator_client, frontend_client):
    make_scheduling("llama", min_replicas=1)
    operator_client.post("/api/v1/reconcile")

    body = frontend_client.get("/api/v1/models/llama").json()

    conditions = {c["type"]: (c["status"], c["reason"]) for c in body["conditions"]}
    assert conditions["NoLoadInfo"] == (True, "no_load_info")
    assert conditions["Available"] == (False, "below_minimum")


# --- GET /events -----------------------------------------------------------------------------


@pytest.fixture
def events(now):
    node = make_node(name="gpu-a")
    recorded = [
        Event.objects.record(Event.Kind.NODE_OFFLINE, node_id=node.pk, node_name="gpu-a", now=now),
        Event.objects.record(Event.Kind.REPLICA_ADDED, model_name="llama", now=now + timedelta(seconds=1)),
        Event.objects.record(Event.Kind.NO_LOAD_INFO, model_name="phi", now=now + timedelta(seconds=2)),
        Event.objects.record(
            Event.Kind.REPLICA_REMOVED, model_name="llama", node_id=node.pk, now=now + timedelta(seconds=3)
        ),
    ]
    return node, recorded


def test_events_newest_first_and_paginated(frontend_client, events):
    _, recorded = events

    body = frontend_client.get("/api/v1/events", {"limit": 3}).json()

    assert body["count"] == 4
    assert [e["id"] for e in body["results"]] == [e.pk for e in reversed(recorded)][:3]
    assert set(body["results"][0]) == {"id", "created_at", "kind", "model_name", "node_id", "node_name", "message", "details"}


def test_events_filter_by_model_node_and_kind(frontend_client, events):
    node, _ = events

    def kinds(**params):
        return [e["kind"] for e in frontend_client.get("/api/v1/events", params).json()["results"]]

    assert kinds(model="llama") == ["replica_removed", "replica_added"]
    assert kinds(node=str(node.pk)) == ["replica_removed", "node_offline"]
    assert kinds(kind="no_load_info") == ["no_load_info"]
    assert kinds(model="llama", kind="replica_added") == ["replica_added"]
    assert kinds(model="") == ["node_offline"]


def test_events_reject_bad_filters(frontend_client, events):
    assert_problem(frontend_client.get("/api/v1/events", {"kind": "nonsense"}), 400, "validation_error")
    assert_problem(frontend_client.get("/api/v1/events", {"node": "not-a-uuid"}), 400, "validation_error")
    assert_problem(frontend_client.get("/api/v1/events", {"kind": ""}), 400, "validation_error")


def test_the_schema_documents_the_reconciler_endpoints(operator_client):
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()

    for path in ("/api/v1/reconcile", "/api/v1/models", "/api/v1/models/{model}", "/api/v1/events"):
        assert path in schema["paths"], path
