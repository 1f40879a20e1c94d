"""Hostile input through the real web process (gunicorn with the production config): every
answer is an HTTP answer (never a reset), every error a problem document, nothing a 5xx, and
no request a client can send makes the server log a traceback (checked after every test)."""

import urllib.parse
from collections import Counter

import pytest
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.api import hostile

from .edge import REGISTRATION_TOKEN, build_request, send, start_edge_server

LONG_NAME = "a" * 10_000
REGISTER = "/api/node/register"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_edge_server(
        tmp_path_factory.mktemp("edge"), settings.DATABASES["default"], CONTROLPLANE_NODE_HEADER="true"
    )
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_traceback_logged(server):
    server.mark_log()
    yield
    logged = server.log_since_mark()
    assert "Traceback" not in logged, logged[-4000:]


def register_body(**fields) -> dict:
    return {"name": "edge-1", "address": "127.0.0.1:50999", "total_vram": 2**30, "auth_mode": "node_token", **fields}


# --- numbers and nesting, before authentication ----------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["1e999", "-1e999", "NaN", "Infinity", "1" + "0" * 400],
    ids=["1e999", "-1e999", "NaN", "Infinity", "1e400-int"],
)
@pytest.mark.parametrize("credential", [None, REGISTRATION_TOKEN], ids=["anonymous", "registration-token"])
def test_an_overflowing_number_on_register_is_a_400_problem(server, number, credential):
    body = ('{"name": "edge-1", "address": "127.0.0.1:1", "total_vram": ' + number + "}").encode()
    answer = server.request("POST", REGISTER, body=body, credential=credential)
    assert answer.status == 400 and answer.problem()["code"] == "parse_error"


@pytest.mark.parametrize("depth", [950, 100_000])
@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_deep_nesting_without_credentials_is_a_400_problem(server, depth, opener, closer):
    answer = server.request("POST", REGISTER, body=(opener * depth + "1" + closer * depth).encode())
    assert answer.status == 400 and answer.problem()["code"] == "parse_error"


def test_unclosed_deep_nesting_is_a_400_problem(server):
    answer = server.request("POST", REGISTER, body=b"[" * 500_000)
    assert answer.status == 400 and answer.problem()["code"] == "parse_error"


def test_an_integer_beyond_a_column_names_the_field(server):
    answer = server.request("POST", REGISTER, json_body=register_body(total_vram=10**40), credential=REGISTRATION_TOKEN)
    assert answer.status == 400 and set(answer.problem()["errors"]) == {"total_vram"}


@pytest.mark.parametrize(
    "method,path,field",
    [
        ("PUT", "/api/v1/models/m/scheduling", "min_replicas"),
        ("PUT", "/api/v1/models/m/load-info", "backend_type"),
        ("POST", "/api/v1/models/m/route", "wait_seconds"),
        ("POST", "/api/v1/replicas", "replica_index"),
    ],
)
def test_an_overflowing_number_after_authentication_is_a_400_problem(server, method, path, field):
    answer = server.request(method, path, body=b'{"%s": 1e999}' % field.encode(), credential=server.api_key)
    assert answer.status == 400 and answer.problem()["code"] == "parse_error"


def test_invalid_utf8_in_a_body_is_a_400_problem(server):
    answer = server.request("POST", REGISTER, body=b'{"name": "\xff\xfe"}')
    assert answer.status == 400 and answer.problem()["code"] == "parse_error"


def test_a_body_that_is_not_json_is_a_415_problem(server):
    answer = server.request("POST", REGISTER, body=b"name=x", headers={"Content-Type": "text/plain"})
    assert answer.status == 415 and answer.problem()["code"] == "unsupported_media_type"


# --- long names and the request line --------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", f"/api/v1/models/{LONG_NAME}/load-info"),
        ("PUT", f"/api/v1/models/{LONG_NAME}/load-info"),
        ("GET", f"/api/v1/models/{LONG_NAME}/scheduling"),
        ("POST", f"/api/v1/models/{LONG_NAME}/route"),
        ("GET", f"/api/v1/models/{LONG_NAME}"),
    ],
    ids=["load-info-get", "load-info-put", "scheduling", "route", "status"],
)
def test_a_10000_character_name_is_a_414_problem_not_a_reset(server, method, path):
    answer = server.request(method, path, json_body={}, credential=server.api_key)
    assert answer.status == 414 and answer.problem()["code"] == "uri_too_long"


def test_the_414_reaches_a_client_still_sending_a_large_body(server):
    body = b'{"x": "' + b"y" * (4 * 1024 * 1024) + b'"}'
    answer = server.request("POST", f"/api/v1/models/{LONG_NAME}/route", body=body, credential=server.api_key)
    assert answer.status == 414 and answer.problem()["code"] == "uri_too_long"


@pytest.mark.parametrize("length", [256, 3000])
def test_a_name_over_255_characters_that_fits_the_request_line_is_a_400(server, length):
    answer = server.request("GET", f"/api/v1/models/{'b' * length}/load-info", credential=server.api_key)
    assert answer.status == 400 and "model" in answer.problem()["errors"]


def test_too_many_header_fields_is_a_431_problem(server):
    headers = {f"X-Filler-{index}": "x" for index in range(150)}
    answer = server.request("GET", "/api/v1/nodes", headers=headers, credential=server.api_key)
    assert answer.status == 431 and answer.problem()["code"] == "request_header_fields_too_large"


def test_a_malformed_request_line_is_a_400_problem(server):
    answer = send(server.web_port, b"GET /api/v1/nodes HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.status == 400 and answer.problem()["code"] == "bad_request"


# --- names in paths: one canonical spelling ------------------------------------------------


def test_raw_utf8_in_the_path_names_the_same_model_as_its_percent_encoded_form(server):
    name = "modèle/日本語-7b"
    raw = f"/api/v1/models/{name}/scheduling".encode()
    encoded = f"/api/v1/models/{urllib.parse.quote(name)}/scheduling"

    created = server.request("PUT", raw, json_body={"min_replicas": 0}, credential=server.api_key)
    assert created.status == 200 and created.json()["model_name"] == name
    found = server.request("GET", encoded, credential=server.api_key)
    assert found.status == 200 and found.json()["model_name"] == name
    listed = server.request("GET", "/api/v1/scheduling", credential=server.api_key).json()["results"]
    assert [row["model_name"] for row in listed if row["model_name"].startswith("mod")] == [name]


@pytest.mark.parametrize("target", [b"/api/v1/models/%FF%FE/scheduling", b"/api/v1/models/\xff\xfe/scheduling"])
def test_a_path_that_is_not_utf8_is_a_400_problem(server, target):
    answer = server.request("PUT", target, json_body={"min_replicas": 0}, credential=server.api_key)
    assert answer.status == 400 and answer.problem()["code"] == "invalid_path"


@pytest.mark.parametrize("name", ["..%2Fx", "a/../b", "%2Fa", "a/", "a//b", "a/./b", "%20a", "a%0D%0Ab"])
def test_a_name_not_in_canonical_form_is_a_400(server, name):
    answer = server.request("PUT", f"/api/v1/models/{name}/scheduling", json_body={}, credential=server.api_key)
    assert answer.status == 400 and "model" in answer.problem()["errors"], answer.body


# --- headers, renderers, secrets -------------------------------------------------------------


@pytest.mark.parametrize("credential", [None, "operator"])
@pytest.mark.parametrize("host", ["evil.example", "bad host", "a:b:c"])
def test_an_invalid_host_is_a_400_problem_without_a_traceback(server, host, credential):
    key = server.api_key if credential else None
    for method, path in (("GET", "/api/v1/models"), ("POST", REGISTER)):
        answer = server.request(method, path, json_body={}, credential=key, headers={"Host": host})
        assert answer.status == 400 and answer.problem()["code"] == "bad_request"


def test_html_only_is_a_406_problem(server):
    answer = server.request("GET", "/api/v1/models", credential=server.api_key, headers={"Accept": "text/html"})
    assert answer.status == 406 and answer.problem()["code"] == "not_acceptable"


def test_the_registration_answer_is_not_cacheable(server):
    answer = server.request("POST", REGISTER, json_body=register_body(name="edge-cache"), credential=REGISTRATION_TOKEN)
    assert answer.status == 201 and answer.json()["node_token"]
    assert answer.headers["cache-control"] == "no-store"


def test_a_node_name_with_cr_lf_is_refused_at_registration(server):
    answer = server.request(
        "POST", REGISTER, json_body=register_body(name="edge\r\nX-Evil: 1"), credential=REGISTRATION_TOKEN
    )
    assert answer.status == 400 and "name" in answer.problem()["errors"]


# --- the property-based fuzz, through the real server -----------------------------------------


@pytest.fixture(scope="module")
def edge_node(server):
    answer = server.request("POST", REGISTER, json_body=register_body(name="edge-fuzz"), credential=REGISTRATION_TOKEN)
    assert answer.status == 201
    return answer.json()


@pytest.fixture(scope="module")
def operations(server):
    return hostile.operations_of(server.request("GET", "/api/schema/?format=json").json())


def test_hostile_requests_through_the_server_get_no_server_error(server, edge_node, operations, report):
    """A sample of ``tests/api/hostile.py`` over every operation, sent as raw bytes (raw UTF-8 and
    control characters in paths included); the autouse fixture checks the log for tracebacks."""
    statuses = Counter()

    @hypothesis_settings(
        max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=st.data())
    def run(data):
        operation = data.draw(st.sampled_from(operations))
        kind = data.draw(st.sampled_from(hostile.KINDS))
        request = data.draw(hostile.hostile_requests(operation, kind))
        headers = {}
        credential = hostile.credential_for(
            request,
            operation,
            api_key=server.api_key,
            node_token=edge_node["node_token"],
            registration_token=REGISTRATION_TOKEN,
        )
        if credential is not None:
            headers["Authorization"] = credential
        if request.accept is not None:
            headers["Accept"] = request.accept
        if request.content_type is not None and request.body is not None:
            headers["Content-Type"] = request.content_type
        target = request.path(operation, hostile.path_values(edge_node["id"]), raw=data.draw(st.booleans()))
        answer = send(server.web_port, build_request(operation.method, target, body=request.body, headers=headers))
        statuses[answer.status] += 1
        assert answer.status < 500 or hostile.is_retry_later(answer.status, answer.headers, answer.body), (
            operation.label,
            request,
            answer,
        )
        if answer.status >= 400:
            answer.problem()

    run()
    report(f"hostile fuzz through gunicorn: {sum(statuses.values())} requests ({dict(sorted(statuses.items()))})")
