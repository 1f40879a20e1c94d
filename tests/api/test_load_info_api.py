"""Frontend API of per-model load info: /api/v1/models/{model}/load-info."""

import base64

import pytest
from google.protobuf import json_format

from proto import backend_pb2
from registry.models import ModelLoadInfo
from tests.clients import assert_problem
from tests.factories import make_node, make_replica
from tests.proto.every_field import model_options_with_every_field, recorded_model_options_fields

pytestmark = pytest.mark.django_db

MODEL = "org/llama-3.1-8b.gguf"
URL = f"/api/v1/models/{MODEL}/load-info"


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def options_blob(**fields) -> bytes:
    return backend_pb2.ModelOptions(**fields).SerializeToString()


def test_put_blob_then_get_both_forms(frontend_client):
    blob = options_blob(Model="llama.gguf", ContextSize=4096, NGPULayers=99)

    response = frontend_client.put(URL, {"backend_type": "llama-cpp", "model_options_b64": b64(blob)}, format="json")

    assert response.status_code == 200, response.content
    body = frontend_client.get(URL).json()
    assert body["model_name"] == MODEL and body["backend_type"] == "llama-cpp"
    assert base64.b64decode(body["model_options_b64"]) == blob
    assert body["model_options"] == {"Model": "llama.gguf", "ContextSize": 4096, "NGPULayers": 99}
    assert body["source"] == "model" and body["updated_at"]


def test_put_json_form_is_stored_as_the_serialized_message(frontend_client):
    response = frontend_client.put(
        URL, {"backend_type": "vllm", "model_options": {"Model": "m", "ContextSize": 2048}}, format="json"
    )
    assert response.status_code == 200, response.content
    stored = ModelLoadInfo.objects.for_model(MODEL).model_opts_blob
    assert backend_pb2.ModelOptions.FromString(stored) == backend_pb2.ModelOptions(Model="m", ContextSize=2048)
    assert response.json()["model_options"] == {"Model": "m", "ContextSize": 2048}


def test_unknown_protobuf_fields_survive_put_then_get_byte_for_byte(frontend_client):
    # Model = "llama" (field 1, length-delimited), then field 99 as a varint (tag 99<<3|0 =
    # 792 = 0x98 0x06) with value 150 (0x96 0x01): a field a newer LocalAI might set.
    blob = b"\x0a\x05llama" + b"\x98\x06" + b"\x96\x01"
    assert backend_pb2.ModelOptions.FromString(blob).Model == "llama"

    frontend_client.put(URL, {"backend_type": "llama-cpp", "model_options_b64": b64(blob)}, format="json")
    body = frontend_client.get(URL).json()

    assert base64.b64decode(body["model_options_b64"]) == blob
    assert ModelLoadInfo.objects.get(model_name=MODEL).model_opts_blob == blob
    assert body["model_options"] == {"Model": "llama"}


def test_every_model_options_field_round_trips_in_both_forms(frontend_client):
    """All of LocalAI's ModelOptions (EnableScore, GrammarTriggers, Proxy.cache_prompt ...)
    at non-default values: the JSON form is accepted and read back unchanged, the blob form is
    stored and read back byte for byte."""
    message = model_options_with_every_field()
    blob = message.SerializeToString()
    json_form = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert set(json_form) == set(recorded_model_options_fields())

    response = frontend_client.put(URL, {"backend_type": "llama-cpp", "model_options": json_form}, format="json")

    assert response.status_code == 200, response.content
    body = frontend_client.get(URL).json()
    assert body["model_options"] == json_form
    assert backend_pb2.ModelOptions.FromString(base64.b64decode(body["model_options_b64"])) == message

    response = frontend_client.put(URL, {"backend_type": "llama-cpp", "model_options_b64": b64(blob)}, format="json")

    assert response.status_code == 200, response.content
    body = frontend_client.get(URL).json()
    assert base64.b64decode(body["model_options_b64"]) == blob
    assert ModelLoadInfo.objects.get(model_name=MODEL).model_opts_blob == blob
    assert body["model_options"] == json_form


def test_last_write_wins(frontend_client):
    frontend_client.put(URL, {"backend_type": "a", "model_options": {"Model": "1"}}, format="json")
    frontend_client.put(URL, {"backend_type": "b", "model_options": {"Model": "2"}}, format="json")
    body = frontend_client.get(URL).json()
    assert (body["backend_type"], body["model_options"]) == ("b", {"Model": "2"})


def test_get_falls_back_to_a_loaded_replica_row(frontend_client):
    blob = options_blob(Model="legacy")
    make_replica(make_node(), MODEL, 0, backend_type="llama-cpp", model_opts_blob=blob)

    body = frontend_client.get(URL).json()

    assert body["source"] == "replica"
    assert base64.b64decode(body["model_options_b64"]) == blob


def test_get_without_load_info_is_404_no_load_info(frontend_client):
    body = assert_problem(frontend_client.get(URL), 404, "no_load_info")
    assert body["model"] == MODEL


def test_empty_blob_is_an_empty_model_options(frontend_client):
    response = frontend_client.put(URL, {"backend_type": "x", "model_options_b64": ""}, format="json")
    assert response.status_code == 200 and response.json()["model_options"] == {}


@pytest.mark.parametrize(
    "payload",
    [
        {"backend_type": "x"},
        {"backend_type": "x", "model_options_b64": b64(b"\x0a\x01a"), "model_options": {"Model": "a"}},
        {"model_options": {"Model": "a"}},
        {"backend_type": "x", "model_options_b64": "not base64!"},
        {"backend_type": "x", "model_options": "Model=a"},
        {"backend_type": 3, "model_options": {}},
        {"backend_type": "x", "model_options": {}, "model_options_json": {}},
    ],
)
def test_put_validation(frontend_client, payload):
    assert_problem(frontend_client.put(URL, payload, format="json"), 400, "validation_error")


@pytest.mark.parametrize(
    "payload",
    [
        {"backend_type": "x", "model_options_b64": b64(b"\xff\xff\xff")},
        {"backend_type": "x", "model_options": {"contextsize": 1}},
        {"backend_type": "x", "model_options": {"ContextSize": "big"}},
    ],
)
def test_options_that_are_not_a_model_options_are_400_invalid_model_options(frontend_client, payload):
    body = assert_problem(frontend_client.put(URL, payload, format="json"), 400, "invalid_model_options")
    assert body["detail"]
    assert not ModelLoadInfo.objects.exists()


def test_a_legacy_blob_that_does_not_parse_reads_as_null_options(frontend_client):
    make_replica(make_node(), MODEL, 0, backend_type="x", model_opts_blob=b"\xff\xff")
    body = frontend_client.get(URL).json()
    assert body["model_options"] is None and base64.b64decode(body["model_options_b64"]) == b"\xff\xff"


@pytest.mark.parametrize("method", ["get", "put"])
def test_load_info_needs_a_frontend_or_operator_key(api_client, operator_client, node, method):
    payload = {"backend_type": "x", "model_options": {}}
    assert_problem(getattr(api_client, method)(URL, payload, format="json"), 401, "not_authenticated")
    answer = getattr(operator_client, method)(URL, payload, format="json")
    if method == "put":
        assert answer.status_code == 200 and ModelLoadInfo.objects.for_model(MODEL).backend_type == "x"
    else:
        assert_problem(answer, 404, "no_load_info")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {node.token}")
    assert_problem(getattr(api_client, method)(URL, payload, format="json"), 401, "invalid_token")


def test_non_staff_session_cannot_use_frontend_endpoints(non_staff_client):
    assert_problem(non_staff_client.get(URL), 403, "permission_denied")


def test_staff_session_may_use_frontend_endpoints(staff_client):
    assert_problem(staff_client.get(URL), 404, "no_load_info")
    response = staff_client.put(URL, {"backend_type": "x", "model_options": {"Model": "m"}}, format="json")
    assert response.status_code == 200
    stored = ModelLoadInfo.objects.for_model(MODEL)
    assert (stored.backend_type, bytes(stored.model_opts_blob)) == (
        "x",
        backend_pb2.ModelOptions(Model="m").SerializeToString(),
    )
