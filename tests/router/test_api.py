"""The router's frontend API: route (200 lease / 202 load job / problems), lease release and
renew, load jobs, replica reports; API-key auth; model names with slashes."""

import base64
import uuid

import pytest
from django.utils import timezone
from google.protobuf import json_format
from rest_framework.test import APIClient

from core.credentials import backend_token
from proto import backend_pb2
from registry.models import Lease, LoadJob, ModelLoadInfo, NodeModel
from tests.clients import client_for_role, client_with
from tests.factories import make_api_key, make_node, make_replica, make_scheduling
from tests.proto.every_field import model_options_with_every_field

from .conftest import options_blob

pytestmark = pytest.mark.django_db

BLOB = options_blob("llama.gguf", ContextSize=2048)
B64 = base64.b64encode(BLOB).decode()


@pytest.fixture
def api():
    return client_for_role("frontend")


def route(api, model="llama", body=None):
    return api.post(f"/api/v1/models/{model}/route", body or {}, format="json")


def warm(fleet, name="gpu-1", model="llama"):
    gpu = fleet.add_node(name)
    backend, address = fleet.backend_server()
    return make_replica(gpu.node, model, 0, address=address, last_probe_at=timezone.now())


def test_a_warm_route_answers_the_lease(api, fleet):
    replica = warm(fleet)

    response = route(api)

    assert response.status_code == 200, response.json()
    body = response.json()
    lease = Lease.objects.get()
    assert body == {
        "lease_id": str(lease.pk),
        "model_name": "llama",
        "node_id": str(replica.node_id),
        "node_name": "gpu-1",
        "address": replica.address,
        "replica_index": 0,
        "expires_at": body["expires_at"],
        "model_identity": "",  # a row without any recipe: nothing to send, the backend skips the check
        "backend_token": backend_token(replica.node_id),  # the node's data-plane credential
    }
    assert "X-Control-Plane-Node" not in response


def test_the_hand_rendered_answers_are_what_their_serializers_render(api, fleet):
    # The route and release views render their answers without instantiating a serializer per
    # request; the serializers stay the schema, and both renderings must agree.
    from registry.api.routing import EMPTY_ROUTE_BODY, LeaseReleaseSerializer, LeaseSerializer, RouteBodySerializer

    warm(fleet)
    answer = route(api).json()
    lease = Lease.objects.get()
    lease.node_name, lease.model_identity = answer["node_name"], answer["model_identity"]
    lease.backend_token = answer["backend_token"]
    assert answer == LeaseSerializer(lease).data

    released = api.post(f"/api/v1/leases/{lease.pk}/release").json()
    lease.refresh_from_db()
    assert released == LeaseReleaseSerializer({"pk": lease.pk, "released": True, "released_at": lease.released_at}).data

    body = RouteBodySerializer(data={})
    assert body.is_valid() and dict(body.validated_data) == EMPTY_ROUTE_BODY


def test_the_node_header_is_opt_in(api, fleet, settings):
    settings.CONTROLPLANE_NODE_HEADER = True
    warm(fleet, name="gpu-7")

    assert route(api)["X-Control-Plane-Node"] == "gpu-7"


def test_a_cold_route_with_json_options_loads_and_stores_the_load_info(api, fleet):
    gpu = fleet.add_node("gpu-1")

    response = route(api, "org/llama-3.1-8b.gguf", {"backend_type": "llama-cpp", "model_options": {"ContextSize": 2048}})

    assert response.status_code == 200, response.json()
    assert response.json()["model_name"] == "org/llama-3.1-8b.gguf"
    info = ModelLoadInfo.objects.for_model("org/llama-3.1-8b.gguf")
    assert info.backend_type == "llama-cpp"
    assert gpu.worker.load_requests == [info.model_opts_blob]


def test_a_route_with_every_model_options_field_loads_and_names_the_model_identity(api, fleet):
    """The JSON form on route accepts all of LocalAI's ModelOptions (EnableScore,
    GrammarTriggers, Proxy ...); the backend gets them all, and the answer's model_identity is
    the Model it was loaded with."""
    gpu = fleet.add_node("gpu-1")
    message = model_options_with_every_field()
    json_form = json_format.MessageToDict(message, preserving_proto_field_name=True)

    response = route(api, body={"backend_type": "llama-cpp", "model_options": json_form})

    assert response.status_code == 200, response.json()
    (loaded,) = gpu.worker.load_requests
    assert backend_pb2.ModelOptions.FromString(loaded) == message
    assert response.json()["model_identity"] == message.Model != ""


def test_a_cold_route_with_a_b64_blob_sends_those_bytes(api, fleet):
    gpu = fleet.add_node("gpu-1")

    assert route(api, body={"backend_type": "x", "model_options_b64": B64}).status_code == 200
    assert gpu.worker.load_requests == [BLOB]
    info = ModelLoadInfo.objects.for_model("llama")  # the options sent are the model's recipe now
    assert (info.backend_type, bytes(info.model_opts_blob)) == ("x", BLOB)
    lease = Lease.objects.get()
    assert lease.released_at is None and lease.replica.in_flight == 1


def test_a_load_that_outlasts_the_wait_answers_202_with_the_job(api, fleet, settings):
    settings.CONTROLPLANE_LOAD_JOB_RUNNER = "qcluster"  # nobody runs it in this test
    fleet.add_node("gpu-1")

    response = route(api, body={"backend_type": "x", "model_options_b64": B64, "wait_seconds": 0})

    assert response.status_code == 202
    job = LoadJob.objects.get()
    assert response.json()["load_job"]["id"] == str(job.pk)
    assert response.json()["load_job"]["state"] == "pending"
    assert int(response["Retry-After"]) >= 1
    assert response["Location"] == f"/api/v1/load-jobs/{job.pk}"
    followed = api.get(response["Location"])
    assert followed.status_code == 200 and followed.json()["state"] == "pending"


def test_router_errors_are_problems_with_their_stable_code(api, fleet):
    fleet.add_node("gpu-1", labels={"zone": "a"})

    no_info = route(api)
    assert (no_info.status_code, no_info.json()["code"]) == (409, "no_load_info")
    assert no_info["Content-Type"] == "application/problem+json"
    assert no_info.json()["model"] == "llama"

    make_scheduling("phi", node_selector={"zone": "b"})
    no_nodes = route(api, "phi", {"backend_type": "x", "model_options_b64": B64})
    assert (no_nodes.status_code, no_nodes.json()["code"]) == (503, "no_matching_nodes")
    assert int(no_nodes["Retry-After"]) >= 1


def test_a_failed_load_is_a_503_load_failed(api, fleet):
    fleet.add_node("gpu-1", load_success=False, load_message="weights missing")

    response = route(api, body={"backend_type": "x", "model_options_b64": B64})

    assert (response.status_code, response.json()["code"]) == (503, "load_failed")
    assert "weights missing" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model_options_b64": "not base64!"}, "validation_error"),
        ({"model_options_b64": base64.b64encode(b"\xff\xff").decode()}, "invalid_model_options"),
        ({"model_options": {"NoSuchField": 1}}, "invalid_model_options"),
        ({"model_options_b64": B64, "model_options": {}}, "validation_error"),
        ({"wait_seconds": -1}, "validation_error"),
        ({"surprise": 1}, "validation_error"),
    ],
)
def test_bad_route_bodies_are_400_problems(api, fleet, body, code):
    response = route(api, body=body)
    assert (response.status_code, response.json()["code"]) == (400, code)
    assert not ModelLoadInfo.objects.exists()


def test_route_needs_a_frontend_or_operator_key(fleet):
    warm(fleet)
    anonymous = APIClient()
    assert route(anonymous).status_code == 401
    operator = client_with(make_api_key('operator')[1])
    assert route(operator).status_code == 200


def test_release_is_idempotent_and_unknown_leases_are_404(api, fleet):
    replica = warm(fleet)
    lease_id = route(api).json()["lease_id"]

    first = api.post(f"/api/v1/leases/{lease_id}/release")
    second = api.post(f"/api/v1/leases/{lease_id}/release")

    assert (first.status_code, first.json()["released"]) == (200, True)
    assert (second.status_code, second.json()["released"]) == (200, False)
    assert first.json()["released_at"] == second.json()["released_at"]
    replica.refresh_from_db()
    assert replica.in_flight == 0
    assert Lease.objects.get(pk=lease_id).released_at is not None
    assert api.post(f"/api/v1/leases/{uuid.uuid4()}/release").status_code == 404


def test_renew_extends_a_live_lease_and_refuses_a_released_one(api, fleet):
    warm(fleet)
    lease_id = route(api).json()["lease_id"]

    renewed = api.post(f"/api/v1/leases/{lease_id}/renew", {"ttl_seconds": 3600}, format="json")
    assert renewed.status_code == 200
    assert Lease.objects.get().expires_at > timezone.now() + timezone.timedelta(minutes=59)

    api.post(f"/api/v1/leases/{lease_id}/release")
    refused = api.post(f"/api/v1/leases/{lease_id}/renew")
    assert (refused.status_code, refused.json()["code"]) == (409, "lease_released")
    assert api.post(f"/api/v1/leases/{uuid.uuid4()}/renew").status_code == 404


def test_an_unknown_load_job_is_404(api):
    assert api.get(f"/api/v1/load-jobs/{uuid.uuid4()}").status_code == 404


def test_a_reported_replica_is_recorded_with_both_load_info_copies_and_routable(api, fleet):
    gpu = fleet.add_node("gpu-1")
    address, _ = gpu.worker.launch("org/llama", 0)  # the frontend had the node's worker start it
    body = {
        "node_id": str(gpu.node.pk),
        "model_name": "org/llama",
        "replica_index": 0,
        "address": address,
        "backend_type": "llama-cpp",
        "model_options_b64": B64,
    }

    response = api.post("/api/v1/replicas", body, format="json")

    assert response.status_code == 201, response.json()
    replica = NodeModel.objects.get()
    assert (replica.state, replica.address, bytes(replica.model_opts_blob)) == ("loaded", address, BLOB)
    info = ModelLoadInfo.objects.for_model("org/llama")
    assert (info.source, info.backend_type, info.model_opts_blob) == ("model", "llama-cpp", BLOB)
    answer = route(api, "org/llama").json()
    assert answer["address"] == address
    assert answer["model_identity"] == "llama.gguf"  # the Model of the reported recipe
    # The control plane only asked the worker whether it runs that backend; it loaded nothing.
    assert [name for name, _ in gpu.worker.calls] == ["ListBackends"]
    assert gpu.worker.load_requests == []
    assert response.json()["revision"] == replica.revision == 1  # the revision its recipe became


def test_a_reported_replica_carries_the_revision_it_names_and_an_unknown_one_is_a_400(api, fleet):
    gpu = fleet.add_node("gpu-1")
    address, _ = gpu.worker.launch("org/llama", 0)
    ModelLoadInfo.objects.upsert("org/llama", "llama-cpp", b"\n\x05older")  # revision 1
    body = {
        "node_id": str(gpu.node.pk),
        "model_name": "org/llama",
        "replica_index": 0,
        "address": address,
        "backend_type": "llama-cpp",
        "model_options_b64": B64,
    }

    unknown = api.post("/api/v1/replicas", {**body, "revision": 7}, format="json")
    assert (unknown.status_code, unknown.json()["errors"]) == (400, {"revision": ["The model has no such revision."]})
    assert not NodeModel.objects.exists()

    response = api.post("/api/v1/replicas", {**body, "revision": 1}, format="json")
    assert response.status_code == 201, response.json()
    assert NodeModel.objects.get().revision == 1  # as the frontend says, although its recipe is revision 2


def test_a_replica_report_needs_a_known_node_and_options(api):
    make_node()
    unknown = api.post(
        "/api/v1/replicas",
        {
            "node_id": str(uuid.uuid4()),
            "model_name": "llama",
            "replica_index": 0,
            "address": "a:1",
            "backend_type": "x",
            "model_options_b64": B64,
        },
        format="json",
    )
    assert (unknown.status_code, unknown.json()["errors"]) == (400, {"node_id": ["Unknown node."]})
    missing = api.post(
        "/api/v1/replicas",
        {"node_id": str(uuid.uuid4()), "model_name": "llama", "replica_index": 0, "address": "a:1", "backend_type": "x"},
        format="json",
    )
    assert missing.status_code == 400
    assert not NodeModel.objects.exists()
    assert not ModelLoadInfo.objects.exists()
