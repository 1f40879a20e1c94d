"""Worker-facing API: /api/node/register and /api/node/{id}/... with per-node tokens (the
fleet-token mode of LocalAI's workers: test_localai_worker_api.py)."""

import pytest

from core.tokens import token_matches
from registry.models import Node, NodeLabel, NodeModel
from tests.clients import REGISTRATION_TOKEN, assert_problem, bearer
from tests.factories import GIB, make_node, make_replica

pytestmark = pytest.mark.django_db

REGISTER = "/api/node/register"

LOCALAI_BODY = {
    "name": "gpu-1",
    "node_type": "backend",
    "address": "10.0.0.5:50051",
    "http_address": "10.0.0.5:8080",
    "token": REGISTRATION_TOKEN,
    "total_vram": 24 * GIB,
    "available_vram": 24 * GIB,
    "gpu_vendor": "nvidia",
    "labels": {"zone": "a"},
    "max_replicas_per_model": 2,
}
# The reference worker's body: LocalAI's plus a per-node token and the worker service.
WORKER_BODY = {**LOCALAI_BODY, "auth_mode": "node_token", "serves_worker_api": True}


def node_url(node, verb):
    return f"/api/node/{node.pk}/{verb}"


# --- register ---------------------------------------------------------------------------------


def test_register_with_bearer_token_returns_201_and_a_node_token(registration_client):
    response = registration_client.post(REGISTER, WORKER_BODY, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {
        "id",
        "name",
        "node_type",
        "status",
        "auth_mode",
        "worker_api",
        "created_at",
        "node_token",
        "worker_token",
        "backend_token",
    }
    assert (body["name"], body["node_type"], body["status"]) == ("gpu-1", "backend", "healthy")
    assert (body["auth_mode"], body["worker_api"]) == ("node_token", "available")
    node = Node.objects.get(pk=body["id"])
    assert token_matches(body["node_token"], node.token_hash)
    assert (node.total_vram, node.gpu_vendor, node.max_replicas_per_model) == (24 * GIB, "nvidia", 2)
    assert NodeLabel.objects.as_dict(node.pk)["zone"] == "a"


def test_register_accepts_the_localai_body_token_without_a_header(api_client):
    response = api_client.post(REGISTER, LOCALAI_BODY, format="json")
    assert response.status_code == 201, response.content


def test_register_without_any_token_is_401(api_client):
    body = {k: v for k, v in LOCALAI_BODY.items() if k != "token"}
    assert_problem(api_client.post(REGISTER, body, format="json"), 401, "not_authenticated")


@pytest.mark.parametrize("where", ["header", "body"])
def test_register_with_a_wrong_token_is_401(api_client, where):
    if where == "header":
        response = api_client.post(REGISTER, {**LOCALAI_BODY, "token": ""}, format="json", **bearer("wrong"))
    else:
        response = api_client.post(REGISTER, {**LOCALAI_BODY, "token": "wrong"}, format="json")
    assert_problem(response, 401, "invalid_token")


def test_register_does_not_accept_an_api_key_or_node_token(api_client, operator_key, node):
    body = {k: v for k, v in LOCALAI_BODY.items() if k != "token"}
    assert_problem(api_client.post(REGISTER, body, format="json", **bearer(operator_key)), 401, "invalid_token")
    assert_problem(api_client.post(REGISTER, body, format="json", **bearer(node.token)), 401, "invalid_token")


def test_open_registration_needs_no_token_when_none_is_configured(api_client, settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = True
    body = {k: v for k, v in WORKER_BODY.items() if k != "token"}
    assert api_client.post(REGISTER, body, format="json").status_code == 201


def test_registration_is_closed_without_a_token_unless_open_is_allowed(api_client, settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    assert_problem(api_client.post(REGISTER, LOCALAI_BODY, format="json"), 401, "invalid_token")


def test_register_pending_without_auto_approve(registration_client, settings):
    settings.CONTROLPLANE_AUTO_APPROVE = False
    response = registration_client.post(REGISTER, LOCALAI_BODY, format="json")
    assert response.json()["status"] == "pending"


def test_re_registration_keeps_the_id_and_the_derived_token(registration_client):
    # The node token is derived from the node id, so the hash a restored database holds still
    # matches what a worker kept across registrations made after the backup.
    first = registration_client.post(REGISTER, WORKER_BODY, format="json").json()
    second = registration_client.post(
        REGISTER, WORKER_BODY, format="json", HTTP_X_NODE_TOKEN=first["node_token"]
    ).json()

    assert first["id"] == second["id"]
    assert first["node_token"] == second["node_token"]
    client = registration_client
    client.credentials(**bearer(second["node_token"]))
    assert client.post(f"/api/node/{first['id']}/heartbeat", {}, format="json").status_code == 200


def test_a_new_credential_key_rotates_the_node_token_at_the_next_registration(registration_client, settings):
    first = registration_client.post(REGISTER, WORKER_BODY, format="json").json()
    settings.CONTROLPLANE_CREDENTIAL_KEY = "a-rotated-credential-key"
    # the kept token still matches the stored hash, so the worker may come back and get the new one
    second = registration_client.post(
        REGISTER, WORKER_BODY, format="json", HTTP_X_NODE_TOKEN=first["node_token"]
    ).json()

    assert first["id"] == second["id"] and first["node_token"] != second["node_token"]
    client = registration_client
    client.credentials(**bearer(first["node_token"]))
    assert_problem(client.post(f"/api/node/{first['id']}/heartbeat", {}, format="json"), 401, "invalid_token")


def test_register_ignores_fields_a_newer_localai_worker_may_send(registration_client):
    response = registration_client.post(REGISTER, {**LOCALAI_BODY, "gpu_count": 2, "driver": "x"}, format="json")
    assert response.status_code == 201, response.content
    assert Node.objects.filter(name="gpu-1").exists()


def test_minimal_body_defaults_and_zero_slots_mean_one(registration_client):
    response = registration_client.post(
        REGISTER, {"name": "cpu-1", "address": "h:1", "max_replicas_per_model": 0, "gpu_vendor": ""}, format="json"
    )
    assert response.status_code == 201, response.content
    node = Node.objects.get(name="cpu-1")
    assert (node.node_type, node.gpu_vendor, node.max_replicas_per_model) == ("backend", "unknown", 1)


def test_agent_nodes_need_no_address(registration_client):
    response = registration_client.post(REGISTER, {"name": "agent-1", "node_type": "agent"}, format="json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"name": ""}, {"name"}),
        ({"name": "x" * 256}, {"name"}),
        ({"address": ""}, {"address"}),
        ({"address": "a" * 513}, {"address"}),
        ({"http_address": "a" * 513}, {"http_address"}),
        ({"node_type": "robot"}, {"node_type"}),
        ({"gpu_vendor": "x" * 33}, {"gpu_vendor"}),
        ({"gpu_vendor": "nv\x07idia"}, {"gpu_vendor"}),
        ({"gpu_vendor": 3}, {"gpu_vendor"}),
        ({"auth_mode": "anything"}, {"auth_mode"}),
        ({"total_disk": -1, "available_disk": -2}, {"total_disk", "available_disk"}),
        ({"total_vram": -1, "available_ram": "lots"}, {"total_vram", "available_ram"}),
        ({"total_vram": 2**64}, {"total_vram"}),
        ({"labels": {"zone": 3}}, {"labels"}),
        ({"labels": ["zone"]}, {"labels"}),
        ({"max_replicas_per_model": -1}, {"max_replicas_per_model"}),
    ],
)
def test_register_validation_errors(registration_client, change, fields):
    response = registration_client.post(REGISTER, {**LOCALAI_BODY, **change}, format="json")
    body = assert_problem(response, 400, "validation_error")
    assert {name.split(".")[0] for name in body["errors"]} == fields


def test_register_never_echoes_the_registration_token(registration_client):
    response = registration_client.post(REGISTER, LOCALAI_BODY, format="json")
    assert REGISTRATION_TOKEN not in response.content.decode()


# --- node calls -------------------------------------------------------------------------------


def test_heartbeat_updates_free_memory_and_answers_status(node, node_client, now):
    response = node_client.post(node_url(node, "heartbeat"), {"available_vram": 3 * GIB}, format="json")

    assert response.status_code == 200
    # the address lets a worker notice a database restored from before its last registration
    assert response.json() == {"status": "healthy", "address": node.address}
    node.refresh_from_db()
    assert node.available_vram == 3 * GIB


def test_heartbeat_with_empty_body_or_nulls_only_stamps(node, node_client):
    before = Node.objects.get(pk=node.pk)
    assert node_client.post(node_url(node, "heartbeat"), {}, format="json").status_code == 200
    assert node_client.post(node_url(node, "heartbeat"), format="json").status_code == 200
    response = node_client.post(node_url(node, "heartbeat"), {"available_vram": None}, format="json")
    assert response.status_code == 200
    after = Node.objects.get(pk=node.pk)
    assert after.last_heartbeat is not None and after.last_heartbeat >= (before.last_heartbeat or after.last_heartbeat)
    assert (after.available_vram, after.available_ram) == (before.available_vram, before.available_ram)


def test_heartbeat_validation_ignores_unknown_fields_but_not_bad_numbers(node, node_client):
    body = assert_problem(
        node_client.post(node_url(node, "heartbeat"), {"available_vram": -5, "cpu": 1}, format="json"),
        400,
        "validation_error",
    )
    assert set(body["errors"]) == {"available_vram"}
    body = assert_problem(
        node_client.post(node_url(node, "heartbeat"), {"available_disk": -1, "total_disk": "big"}, format="json"),
        400,
        "validation_error",
    )
    assert set(body["errors"]) == {"available_disk", "total_disk"}


@pytest.mark.parametrize("verb", ["heartbeat", "drain", "resume", "deregister", "models"])
def test_node_calls_need_the_node_token(api_client, node, verb):
    method = api_client.get if verb == "models" else api_client.post
    assert_problem(method(node_url(node, verb)), 401, "not_authenticated")
    assert_problem(method(node_url(node, verb), **bearer("cpn_forged")), 401, "invalid_token")


@pytest.mark.parametrize("verb", ["heartbeat", "drain", "resume", "deregister", "models"])
def test_another_nodes_token_is_403(api_client, node, other_node, verb):
    method = api_client.get if verb == "models" else api_client.post
    response = method(node_url(node, verb), **bearer(other_node.token))
    assert_problem(response, 403, "node_token_mismatch")
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


@pytest.mark.parametrize("verb", ["heartbeat", "models"])
def test_api_keys_and_registration_token_do_not_work_on_node_calls(api_client, node, operator_key, verb):
    method = api_client.get if verb == "models" else api_client.post
    assert_problem(method(node_url(node, verb), **bearer(operator_key)), 401, "invalid_token")
    # The node holds a per-node token: the fleet token never drives it.
    assert_problem(method(node_url(node, verb), **bearer(REGISTRATION_TOKEN)), 403, "fleet_token_not_accepted")


def test_a_node_token_on_an_unknown_node_id_is_403(api_client, node):
    response = api_client.post("/api/node/00000000-0000-0000-0000-000000000000/heartbeat", {}, **bearer(node.token))
    assert_problem(response, 403, "node_token_mismatch")


def test_a_token_of_a_deleted_node_is_401(api_client, node):
    Node.objects.deregister(node.pk)
    assert_problem(api_client.post(node_url(node, "heartbeat"), {}, **bearer(node.token)), 401, "invalid_token")


def test_drain_keeps_replica_rows_and_is_repeatable(node, node_client):
    make_replica(node, "llama", 0, in_flight=2)

    for _ in range(2):
        response = node_client.post(node_url(node, "drain"))
        assert response.status_code == 200
        assert response.json() == {"status": "draining"}
    assert NodeModel.objects.filter(node=node).count() == 1
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.NODE)


def test_drain_of_an_offline_node_is_409(node, node_client):
    Node.objects.mark_offline(node.pk)
    body = assert_problem(node_client.post(node_url(node, "drain")), 409, "invalid_transition")
    assert body["node_status"] == "offline"


def test_resume_after_drain(node, node_client):
    node_client.post(node_url(node, "drain"))
    assert node_client.post(node_url(node, "resume")).json() == {"status": "healthy"}
    assert node_client.post(node_url(node, "resume")).json() == {"status": "healthy"}
    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.HEALTHY, Node.DrainedBy.NONE)


def test_resume_of_a_pending_node_is_409(api_client):
    pending = make_node(name="waiting", status=Node.Status.PENDING)
    assert_problem(api_client.post(node_url(pending, "resume"), **bearer(pending.token)), 409, "invalid_transition")
    pending.refresh_from_db()
    assert pending.status == Node.Status.PENDING


def test_deregister_marks_offline_keeps_the_row_and_deletes_replicas(node, node_client):
    make_replica(node, "llama", 0)

    response = node_client.post(node_url(node, "deregister"))

    assert response.status_code == 200 and response.json() == {"status": "offline"}
    node.refresh_from_db()
    assert node.status == Node.Status.OFFLINE
    assert not NodeModel.objects.filter(node=node).exists()
    # the exiting worker's last heartbeat is forgotten, so the reconciler does not "recover" it
    assert node.last_heartbeat is None


def test_models_lists_the_nodes_replica_rows(node, node_client, other_node):
    make_replica(node, "llama", 1, in_flight=1, address="10.0.0.5:40001")
    make_replica(node, "llama", 0, address="10.0.0.5:40000")
    make_replica(node, "bert", 0, state=NodeModel.State.LOADING)
    make_replica(other_node, "llama", 0)

    response = node_client.get(node_url(node, "models"))

    assert response.status_code == 200
    assert response.json() == [
        {"model_name": "bert", "replica_index": 0, "state": "loading", "in_flight": 0, "address": ""},
        {"model_name": "llama", "replica_index": 0, "state": "loaded", "in_flight": 0, "address": "10.0.0.5:40000"},
        {"model_name": "llama", "replica_index": 1, "state": "loaded", "in_flight": 1, "address": "10.0.0.5:40001"},
    ]


def test_the_worker_flow_register_heartbeat_drain_wait_deregister(api_client):
    """The reference worker's life: register, heartbeat, then graceful shutdown."""
    answer = api_client.post(REGISTER, WORKER_BODY, format="json").json()
    api_client.credentials(**bearer(answer["node_token"]))
    base = f"/api/node/{answer['id']}"

    assert api_client.post(f"{base}/heartbeat", {"available_vram": GIB}, format="json").status_code == 200
    assert Node.objects.get(pk=answer["id"]).available_vram == GIB
    assert api_client.post(f"{base}/drain").status_code == 200
    assert Node.objects.get(pk=answer["id"]).status == "draining"
    assert sum(row["in_flight"] for row in api_client.get(f"{base}/models").json()) == 0
    assert api_client.post(f"{base}/deregister").json() == {"status": "offline"}
    assert Node.objects.get(pk=answer["id"]).status == "offline"


def test_heartbeat_of_a_node_deleted_after_authentication_is_404(node, node_client, monkeypatch):
    # The token-checked UPDATE found no row, the authenticating read still found the node, and
    # the ordinary heartbeat then found it gone.
    monkeypatch.setattr(Node.objects, "heartbeat_with_token", lambda *a, **k: None)
    monkeypatch.setattr(Node.objects, "heartbeat", lambda *a, **k: False)
    assert_problem(node_client.post(node_url(node, "heartbeat"), {}, format="json"), 404, "not_found")


def test_make_node_helper_tokens_work(api_client):
    node = make_node(name="helper")
    assert api_client.get(f"/api/node/{node.pk}/models", **bearer(node.token)).status_code == 200
