"""LocalAI's own worker (``core/cli/workerregistry``) on the node wire, call by call.

Its client sends ``Authorization: Bearer <registration token>`` on every call (it never asks
for a per-node token), registers with fields this server does not use and vendors it need not
know (``apple``), heartbeats with its models directory's disk figures, and expects exactly 200
from drain, deregister and its ``GET /api/node/{id}/models`` poll (a JSON array it reads
``in_flight`` from). Such a node is bound to the fleet token (``auth_mode = fleet_token``); a
node that holds a per-node token is never driven with the fleet token.
"""

import pytest

from registry.models import Node, NodeLabel, NodeModel
from tests.clients import REGISTRATION_TOKEN, assert_problem, client_with
from tests.factories import GIB, make_replica

pytestmark = pytest.mark.django_db

REGISTER = "/api/node/register"
TIB = 1024 * GIB

# core/services/worker/registration.go registrationBody(), on an Apple-silicon worker.
LOCALAI_REGISTRATION = {
    "name": "mac-studio-1",
    "address": "10.0.0.9:50051",
    "http_address": "10.0.0.9:50050",
    "total_vram": 64 * GIB,
    "available_vram": 64 * GIB,
    "gpu_vendor": "apple",
    "gpu_compute_capability": "",
    "capability": "metal",
    "max_replicas_per_model": 1,
    "total_disk": 2 * TIB,
    "available_disk": TIB,
    "vram_budget": "80%",
    "total_ram": 64 * GIB,
    "available_ram": 40 * GIB,
    "token": REGISTRATION_TOKEN,
    "labels": {"node.replica-slots": "1"},
}
# registration.go heartbeatBody()
LOCALAI_HEARTBEAT = {
    "available_vram": 30 * GIB,
    "available_ram": 20 * GIB,
    "total_disk": 2 * TIB,
    "available_disk": 900 * GIB,
}


@pytest.fixture
def localai(db):
    """LocalAI's RegistrationClient: the fleet token as bearer on every call."""
    return client_with(REGISTRATION_TOKEN)


@pytest.fixture
def localai_node(localai):
    response = localai.post(REGISTER, LOCALAI_REGISTRATION, format="json")
    assert response.status_code == 201, response.content
    return Node.objects.get(pk=response.json()["id"])


def url(node, verb=""):
    return f"/api/node/{node.pk}/{verb}" if verb else f"/api/node/{node.pk}"


# --- registration -----------------------------------------------------------------------------


def test_localai_registration_makes_a_fleet_token_node_without_a_node_token(localai):
    response = localai.post(REGISTER, LOCALAI_REGISTRATION, format="json")

    assert response.status_code == 201, response.content
    answer = response.json()
    assert "node_token" not in answer
    assert (answer["auth_mode"], answer["worker_api"], answer["status"]) == ("fleet_token", "unknown", "healthy")
    node = Node.objects.get(pk=answer["id"])
    assert node.token_hash == ""
    assert (node.gpu_vendor, node.total_disk, node.available_disk) == ("apple", 2 * TIB, TIB)
    assert NodeLabel.objects.as_dict(node.pk)["gpu.vendor"] == "apple"


@pytest.mark.parametrize("vendor", ["apple", "qualcomm", "NVIDIA Corporation", ""])
def test_any_short_printable_gpu_vendor_registers(localai, vendor):
    response = localai.post(REGISTER, {**LOCALAI_REGISTRATION, "gpu_vendor": vendor}, format="json")
    assert response.status_code == 201, response.content
    assert Node.objects.get(name="mac-studio-1").gpu_vendor == (vendor or "unknown")


def test_a_localai_node_is_not_a_placement_candidate_until_it_answers_the_worker_service(localai_node):
    assert Node.objects.schedulable().filter(pk=localai_node.pk).exists()  # alive and routable
    assert not Node.objects.candidates().filter(pk=localai_node.pk).exists()  # never placed on


def test_refused_when_fleet_token_nodes_are_not_allowed(localai, settings):
    settings.CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES = False
    assert_problem(localai.post(REGISTER, LOCALAI_REGISTRATION, format="json"), 403, "fleet_token_nodes_refused")
    assert not Node.objects.filter(name="mac-studio-1").exists()
    # a node asking for its own token is still welcome
    body = {**LOCALAI_REGISTRATION, "auth_mode": "node_token"}
    assert localai.post(REGISTER, body, format="json").status_code == 201
    assert Node.objects.get(name="mac-studio-1").auth_mode == Node.AuthMode.NODE_TOKEN


def test_open_registration_refuses_fleet_token_nodes_there_is_no_fleet_token(api_client, settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = True
    body = {k: v for k, v in LOCALAI_REGISTRATION.items() if k != "token"}
    assert_problem(api_client.post(REGISTER, body, format="json"), 403, "fleet_token_nodes_refused")


def test_a_node_token_node_cannot_be_re_registered_with_the_fleet_token_alone(localai):
    first = localai.post(REGISTER, {**LOCALAI_REGISTRATION, "auth_mode": "node_token"}, format="json").json()

    response = localai.post(REGISTER, LOCALAI_REGISTRATION, format="json")

    assert_problem(response, 409, "node_token_required")
    node = Node.objects.get(pk=first["id"])
    assert node.auth_mode == Node.AuthMode.NODE_TOKEN
    assert client_with(first["node_token"]).post(url(node, "heartbeat"), {}, format="json").status_code == 200


def test_a_fleet_token_node_may_ask_for_a_node_token_and_is_then_bound_to_it(localai, localai_node):
    answer = localai.post(REGISTER, {**LOCALAI_REGISTRATION, "auth_mode": "node_token"}, format="json").json()

    assert (answer["id"], answer["auth_mode"]) == (str(localai_node.pk), "node_token")
    assert_problem(localai.post(url(localai_node, "heartbeat"), {}, format="json"), 403, "fleet_token_not_accepted")
    own = client_with(answer["node_token"]).post(url(localai_node, "heartbeat"), {}, format="json")
    assert own.status_code == 200


# --- the calls after registration, with the fleet token ------------------------------------


def test_heartbeat_with_the_fleet_token_and_disk_figures_is_200_and_stored(localai, localai_node, now):
    response = localai.post(url(localai_node, "heartbeat"), {**LOCALAI_HEARTBEAT, "gpu_temp": 71}, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {"status": "healthy", "address": localai_node.address}
    localai_node.refresh_from_db()
    assert (localai_node.available_vram, localai_node.available_ram) == (30 * GIB, 20 * GIB)
    assert (localai_node.total_disk, localai_node.available_disk) == (2 * TIB, 900 * GIB)


def test_heartbeat_with_an_empty_body_is_200(localai, localai_node):
    # Agent workers send {}; a Go map with nothing in it.
    assert localai.post(url(localai_node, "heartbeat"), {}, format="json").status_code == 200
    assert Node.objects.get(pk=localai_node.pk).last_heartbeat > localai_node.last_heartbeat


def test_graceful_shutdown_drain_poll_deregister_each_answer_200(localai, localai_node):
    make_replica(localai_node, "llama", 0, in_flight=0)

    drain = localai.post(url(localai_node, "drain"))  # no body, no content type
    models = localai.get(url(localai_node, "models"))
    deregister = localai.post(url(localai_node, "deregister"))

    assert (drain.status_code, drain.json()) == (200, {"status": "draining"})
    assert models.status_code == 200
    assert sum(row["in_flight"] for row in models.json()) == 0
    assert (deregister.status_code, deregister.json()) == (200, {"status": "offline"})
    localai_node.refresh_from_db()
    assert localai_node.status == Node.Status.OFFLINE
    assert not NodeModel.objects.filter(node=localai_node).exists()


def test_delete_on_the_node_path_deregisters_with_200(localai, localai_node):
    response = localai.delete(url(localai_node))

    assert (response.status_code, response.json()) == (200, {"status": "offline"})
    localai_node.refresh_from_db()
    assert localai_node.status == Node.Status.OFFLINE
    assert localai_node.last_heartbeat is None


def test_the_fleet_token_on_an_unknown_node_is_404(localai):
    response = localai.post("/api/node/00000000-0000-0000-0000-000000000000/heartbeat", {}, format="json")
    assert_problem(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "verb"),
    [("post", "heartbeat"), ("post", "drain"), ("get", "models"), ("post", "deregister"), ("delete", "")],
)
def test_existing_fleet_token_nodes_are_refused_once_the_setting_is_off(localai, localai_node, settings, method, verb):
    settings.CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES = False

    assert_problem(getattr(localai, method)(url(localai_node, verb)), 403, "fleet_token_nodes_refused")
    localai_node.refresh_from_db()
    assert localai_node.status == Node.Status.HEALTHY


@pytest.mark.parametrize(
    ("method", "verb"),
    [
        ("post", "heartbeat"),
        ("post", "drain"),
        ("post", "resume"),
        ("get", "models"),
        ("post", "deregister"),
        ("delete", ""),
    ],
)
def test_a_node_that_holds_a_node_token_is_never_driven_with_the_fleet_token(localai, node, method, verb):
    assert_problem(getattr(localai, method)(url(node, verb)), 403, "fleet_token_not_accepted")
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


def test_another_nodes_token_does_not_drive_a_fleet_token_node(localai_node, other_node):
    response = client_with(other_node.token).post(url(localai_node, "drain"))
    assert_problem(response, 403, "node_token_mismatch")
    localai_node.refresh_from_db()
    assert localai_node.status == Node.Status.HEALTHY


def test_a_wrong_token_on_a_fleet_token_node_is_401(localai_node):
    response = client_with("not-the-fleet-token").post(url(localai_node, "heartbeat"), {}, format="json")
    assert_problem(response, 401, "invalid_token")


# --- what operators see -----------------------------------------------------------------------


def test_the_nodes_api_shows_credential_mode_worker_service_and_disk(operator_client, localai, localai_node, node):
    localai.post(url(localai_node, "heartbeat"), LOCALAI_HEARTBEAT, format="json")

    shown = operator_client.get(f"/api/v1/nodes/{localai_node.pk}").json()
    reference = operator_client.get(f"/api/v1/nodes/{node.pk}").json()

    assert {
        key: shown[key] for key in ("auth_mode", "worker_api", "worker_api_detail", "total_disk", "available_disk")
    } == {
        "auth_mode": "fleet_token",
        "worker_api": "unknown",
        "worker_api_detail": "",
        "total_disk": 2 * TIB,
        "available_disk": 900 * GIB,
    }
    assert (shown["gpu_vendor"], shown["worker_api_checked_at"]) == ("apple", None)
    assert (reference["auth_mode"], reference["worker_api"]) == ("node_token", "available")


def test_delete_of_the_node_path_is_localais_deregister(localai, localai_node):
    make_replica(localai_node, "llama", 0)

    response = localai.delete(f"/api/node/{localai_node.pk}")

    assert (response.status_code, response.json()) == (200, {"status": "offline"})
    localai_node.refresh_from_db()  # the row is kept: re-registration restores the node
    assert (localai_node.status, localai_node.last_heartbeat) == (Node.Status.OFFLINE, None)
    assert not NodeModel.objects.filter(node=localai_node).exists()
