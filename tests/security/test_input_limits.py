"""Input limits and validation (docs/security.md, "Input limits and validation"), through the
Django stack: every write endpoint refuses overflowing numbers, every name field the
non-canonical names, every GET endpoint an HTML-only ``Accept``; a route answer never leaves a
lease behind; the JSON parser's bounds hold in linear time. The same classes of input go
through the real web process in ``test_http_edge.py``."""

import json
import logging
import sys
import time
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from core import names
from core.logs import ClientErrorTracebackFilter
from core.parsers import MAX_JSON_DEPTH, loads_strict, nesting_depth
from registry.models import Lease, NodeModel
from tests.clients import REGISTRATION_TOKEN, assert_problem, client_with
from tests.factories import make_api_key, make_node, make_replica

pytestmark = pytest.mark.django_db

NUMBER = "__NUMBER__"
UNKNOWN_ID = str(uuid.UUID(int=7))


@pytest.fixture
def node():
    return make_node(name="limits-1")


# (name, method, path, credential kind, body with NUMBER where the number goes)
WRITES = [
    ("register-anonymous", "POST", "/api/node/register", None, {"name": "n", "address": "h:1", "total_vram": NUMBER}),
    ("register", "POST", "/api/node/register", "registration", {"name": "n", "address": "h:1", "total_vram": NUMBER}),
    ("register-labels", "POST", "/api/node/register", "registration", {"name": "n", "address": "h:1", "labels": {"z": NUMBER}}),
    ("heartbeat", "POST", "/api/node/{node}/heartbeat", "node", {"available_vram": NUMBER}),
    ("load-info", "PUT", "/api/v1/models/m/load-info", "operator", {"backend_type": "x", "model_options": {"ContextSize": NUMBER}}),
    ("load-info-b64", "PUT", "/api/v1/models/m/load-info", "operator", {"backend_type": "x", "model_options_b64": NUMBER}),
    ("route", "POST", "/api/v1/models/m/route", "operator", {"wait_seconds": NUMBER}),
    ("route-options", "POST", "/api/v1/models/m/route", "operator", {"model_options": {"NGPULayers": NUMBER}}),
    ("scheduling", "PUT", "/api/v1/models/m/scheduling", "operator", {"min_replicas": NUMBER}),
    ("scheduling-selector", "PUT", "/api/v1/models/m/scheduling", "operator", {"node_selector": {"k": NUMBER}}),
    ("labels-put", "PUT", "/api/v1/nodes/{node}/labels", "operator", {"labels": {"k": NUMBER}}),
    ("labels-patch", "PATCH", "/api/v1/nodes/{node}/labels", "operator", {"labels": {"k": NUMBER}}),
    ("max-replicas", "PUT", "/api/v1/nodes/{node}/max-replicas-per-model", "operator", {"max_replicas_per_model": NUMBER}),
    ("replicas", "POST", "/api/v1/replicas", "operator", {"node_id": "{node}", "model_name": "m", "replica_index": NUMBER, "address": "h:1", "backend_type": "x", "model_options": {}}),
    ("renew", "POST", f"/api/v1/leases/{UNKNOWN_ID}/renew", "operator", {"ttl_seconds": NUMBER}),
]  # fmt: skip


def send_write(write, number: str, node):
    _, method, path, credential, body = write
    token = {
        None: None,
        "registration": REGISTRATION_TOKEN,
        "node": node.token,
        "operator": make_api_key("operator")[1],
    }[credential]
    raw = json.dumps(body).replace(f'"{NUMBER}"', number).replace("{node}", str(node.pk))
    client = client_with(token, raise_request_exception=False)
    return client.generic(method, path.format(node=node.pk), raw, content_type="application/json")


@pytest.mark.parametrize("write", WRITES, ids=[write[0] for write in WRITES])
@pytest.mark.parametrize("number", ["1e999", "-1e999", "1e400", "1" + "0" * 400, "NaN", "-Infinity"])
def test_a_number_that_is_not_a_finite_double_is_a_400_parse_error_on_every_write(write, number, node):
    assert_problem(send_write(write, number, node), 400, "parse_error")


@pytest.mark.parametrize("write", WRITES, ids=[write[0] for write in WRITES])
@pytest.mark.parametrize("number", [str(10**40), str(-(10**40)), "1e300"])
def test_a_finite_number_too_large_for_its_field_is_a_400_on_every_write(write, number, node):
    response = send_write(write, number, node)
    # Anonymous: the body parses, so authentication decides first.
    assert_problem(response, 401 if write[3] is None else 400)


@pytest.mark.parametrize("shape", ["[", '{"a":'])
def test_nesting_beyond_the_limit_is_refused_before_parsing(shape):
    closer = "]" if shape == "[" else "}"
    at_limit = shape * MAX_JSON_DEPTH + "1" + closer * MAX_JSON_DEPTH
    assert loads_strict(at_limit) is not None
    with pytest.raises(ValueError, match="nest deeper"):
        loads_strict(shape * (MAX_JSON_DEPTH + 1) + "1" + closer * (MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_and_escapes_do_not_count_as_nesting():
    text = json.dumps({"a": "[[[[" * 40, "b": '\\"[{' * 40, "c": ["x\\", "]"]})
    assert nesting_depth(text) == 2
    assert loads_strict(text)["c"] == ["x\\", "]"]


@pytest.mark.parametrize(
    "body",
    [
        b"[]" * 500_000,
        b"[" * 1_000_000,
        b'"' + b'\\"' * 500_000,
        b'["' + b"[" * 999_990 + b'"]',
        b'{"a":' * 200_000,
    ],
    ids=["flat-pairs", "unclosed", "escaped-quotes", "brackets-in-a-string", "unclosed-objects"],
)
def test_the_depth_scan_of_a_1_mib_body_is_linear(body):
    started = time.monotonic()
    try:
        loads_strict(body.decode())
    except ValueError:
        pass
    assert time.monotonic() - started < 2.0


def test_deep_nesting_on_register_without_credentials_is_a_400(db):
    response = client_with(None, raise_request_exception=False).generic(
        "POST", "/api/node/register", "[" * 5000 + "]" * 5000, content_type="application/json"
    )
    assert_problem(response, 400, "parse_error")


def test_a_lone_surrogate_is_still_a_parse_error(operator_client):
    response = operator_client.generic(
        "PUT", "/api/v1/models/m/scheduling", '{"node_selector": {"k": "\\ud800"}}', content_type="application/json"
    )
    assert_problem(response, 400, "parse_error")


# --- names -----------------------------------------------------------------------------------

CANONICAL = ["llama", "org/llama-3.1-8b.gguf", "modèle/日本語", "a.b", "...", "a..b/c.", "with inner space", "x" * 255]
NOT_CANONICAL = [
    "", " ", " llama", "llama ", "/a", "a/", "a//b", ".", "..", "../x", "a/../b", "a/./b", "x/..",
    "a\x00b", "a\r\nb", "a\tb", "a\x7fb", "a\x85b", "x" * 256,
]  # fmt: skip


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_model_names_are_accepted(name):
    assert names.model_name_errors(name) == []


@pytest.mark.parametrize("name", NOT_CANONICAL)
def test_non_canonical_model_names_are_refused(name):
    assert names.model_name_errors(name)


@pytest.mark.parametrize("name", ["a/", "../x", "a//b", "a\x01b"])
def test_a_non_canonical_name_in_a_replica_report_body_is_a_400(operator_client, node, name):
    body = {
        "node_id": str(node.pk),
        "model_name": name,
        "replica_index": 0,
        "address": "h:1",
        "backend_type": "x",
        "model_options": {},
    }
    errors = assert_problem(operator_client.post("/api/v1/replicas", body, format="json"), 400, "validation_error")["errors"]
    assert list(errors) == ["model_name"]


@pytest.mark.parametrize("path", ["/api/v1/models/a/", "/api/v1/models/a/.%2E/b", "/api/v1/models/%20a/load-info"])
def test_a_non_canonical_name_in_a_path_is_a_400(operator_client, path):
    assert "model" in assert_problem(operator_client.get(path), 400, "validation_error")["errors"]


@pytest.mark.parametrize("name", ["gpu\r\nX-Evil: 1", "gpu\x00", "gpu\x1b[31m", "x" * 256])
def test_a_node_name_with_control_characters_is_refused_at_registration(name):
    body = {"name": name, "address": "h:1"}
    client = client_with(REGISTRATION_TOKEN, raise_request_exception=False)
    response = client.post("/api/node/register", body, format="json")
    assert "name" in assert_problem(response, 400, "validation_error")["errors"]


@pytest.mark.parametrize(
    "labels", [{"zo\nne": "a"}, {"zone": "a\r\nb"}, {" zone": "a"}, {f"k{i}": "v" for i in range(65)}]
)
def test_labels_with_control_characters_or_too_many_are_refused(operator_client, node, labels):
    response = operator_client.put(f"/api/v1/nodes/{node.pk}/labels", {"labels": labels}, format="json")
    assert_problem(response, 400, "validation_error")


# --- renderers, secrets, logs ----------------------------------------------------------------


def get_endpoints(node) -> list[str]:
    schema = json.loads(Client().get("/api/schema/", {"format": "json"}).content)
    values = {"node_id": node.pk, "model": "m", "lease_id": UNKNOWN_ID, "job_id": UNKNOWN_ID, "key": "zone"}
    return [path.format(**values) for path, operations in schema["paths"].items() if "get" in operations]


def test_every_get_endpoint_answers_html_only_with_a_406_problem(operator_client, node):
    staff = get_user_model().objects.create_user("staff", password="x", is_staff=True, is_superuser=True)
    session = APIClient(raise_request_exception=False)
    session.force_login(staff)
    endpoints = get_endpoints(node)
    assert len(endpoints) >= 10
    for path in endpoints:
        for client in (operator_client, session):
            assert_problem(client.get(path, HTTP_ACCEPT="text/html"), 406, "not_acceptable")


def test_the_registration_answer_carrying_the_node_token_is_no_store(db):
    response = client_with(REGISTRATION_TOKEN, raise_request_exception=False).post(
        "/api/node/register", {"name": "n", "address": "h:1", "auth_mode": "node_token"}, format="json"
    )
    assert response.status_code == 201 and response.json()["node_token"]
    assert response["Cache-Control"] == "no-store"


def console_output(record: logging.LogRecord) -> str:
    # The console handler of settings.LOGGING (pytest adds its own capture handlers to the root).
    handler = next(
        h for h in logging.getLogger().handlers if any(isinstance(f, ClientErrorTracebackFilter) for f in h.filters)
    )
    handler.filter(record)
    return handler.format(record)


def test_client_errors_are_logged_without_traceback_and_server_errors_with_it(caplog):
    staff = get_user_model().objects.create_user("no-perms", password="x", is_staff=True)
    client = Client(raise_request_exception=False)
    client.force_login(staff)
    with caplog.at_level(logging.WARNING):
        assert client.get("/admin/registry/node/").status_code == 403
        assert Client().get("/api/v1/nodes", HTTP_HOST="evil.example").status_code == 400
    client_errors = [r for r in caplog.records if r.name.startswith("django.")]
    assert {r.name for r in client_errors} >= {"django.request", "django.security.DisallowedHost"}
    for record in client_errors:
        assert "Traceback" not in console_output(record)
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        bug = logging.LogRecord("django.request", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    bug.status_code = 500
    assert "Traceback" in console_output(bug)


# --- the route answer never strands a lease ---------------------------------------------------


@pytest.fixture
def fleet(settings):
    from proto import client
    from tests.router.conftest import Fleet, Servers

    settings.CONTROLPLANE_LOAD_JOB_RUNNER = "inline"
    settings.GRPC_HEALTH_TIMEOUT = 0.5
    servers = Servers()
    yield Fleet(servers)
    servers.stop_all()
    client.close_all_channels()


def warm_replica(fleet, node_name: str):
    # A name registered before names were validated: the registry verb takes what it is given.
    gpu = fleet.add_node(node_name)
    _, address = fleet.backend_server()
    return make_replica(gpu.node, "llama", 0, address=address, last_probe_at=timezone.now())


def test_a_node_name_with_cr_lf_is_carried_percent_encoded_and_the_lease_reaches_the_caller(fleet, operator_client, settings):
    settings.CONTROLPLANE_NODE_HEADER = True
    replica = warm_replica(fleet, "gpu\r\nX-Evil: 1")

    response = operator_client.post("/api/v1/models/llama/route", {}, format="json")

    assert response.status_code == 200, response.content
    assert response["X-Control-Plane-Node"] == "gpu%0D%0AX-Evil: 1"
    assert "X-Evil" not in response.headers
    lease_id = response.json()["lease_id"]
    assert NodeModel.objects.get(pk=replica.pk).in_flight == 1
    assert operator_client.post(f"/api/v1/leases/{lease_id}/release").json()["released"] is True
    assert NodeModel.objects.get(pk=replica.pk).in_flight == 0


def test_a_failure_after_the_lease_was_granted_releases_it(fleet, operator_key, settings, monkeypatch):
    from registry.api import routing

    settings.CONTROLPLANE_NODE_HEADER = True
    replica = warm_replica(fleet, "gpu-1")

    def answer_cannot_be_built(result):
        raise RuntimeError("the answer cannot be built")

    monkeypatch.setattr(routing, "_lease_answer", answer_cannot_be_built)
    operator = client_with(operator_key, raise_request_exception=False)  # the 500 is the answer
    response = operator.post("/api/v1/models/llama/route", {}, format="json")

    assert response.status_code == 500
    assert NodeModel.objects.get(pk=replica.pk).in_flight == 0
    assert Lease.objects.get().released_at is not None
