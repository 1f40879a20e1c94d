"""Every error is an RFC 9457 problem document with a stable code, never HTML or a traceback."""

from unittest import mock

import pytest
from django.db import IntegrityError, InterfaceError, OperationalError
from django.test import Client
from rest_framework import serializers

from core.problems import ProblemError, flatten_errors, problem_for_exception
from core.serializers import RejectUnknownFieldsMixin
from tests.clients import assert_problem

pytestmark = pytest.mark.django_db

SCHEDULING = "/api/v1/models/llama/scheduling"


def test_validation_error_lists_field_messages(operator_client):
    response = operator_client.put(SCHEDULING, {"min_replicas": -1, "max_replicas": "many"}, format="json")

    body = assert_problem(response, 400, "validation_error")
    assert set(body["errors"]) == {"min_replicas", "max_replicas"}
    assert all(isinstance(m, str) for messages in body["errors"].values() for m in messages)
    assert "min_replicas" in body["detail"]


def test_unknown_fields_are_rejected_by_name(operator_client):
    response = operator_client.put(SCHEDULING, {"min_replica": 1, "colour": "red"}, format="json")

    body = assert_problem(response, 400, "validation_error")
    assert body["errors"] == {"min_replica": ["Unknown field."], "colour": ["Unknown field."]}


def test_reject_unknown_fields_mixin_flags_read_only_fields_too():
    class Body(RejectUnknownFieldsMixin, serializers.Serializer):
        name = serializers.CharField()
        id = serializers.IntegerField(read_only=True)

    body = Body(data={"name": "x", "id": 3})
    assert not body.is_valid()
    assert body.errors == {"id": ["This field is read-only."]}
    assert Body(data={"name": "x"}).is_valid()


def test_malformed_json_is_a_400_parse_error(operator_client):
    response = operator_client.generic("PUT", SCHEDULING, "{not json", content_type="application/json")
    assert_problem(response, 400, "parse_error")


def test_lone_surrogates_are_a_400_parse_error(operator_client):
    response = operator_client.generic(
        "PUT", SCHEDULING, '{"node_selector": {"zone": "\\ud800"}}', content_type="application/json"
    )
    assert_problem(response, 400, "parse_error")


def test_a_non_json_body_is_415(operator_client):
    response = operator_client.generic(
        "PUT", SCHEDULING, "min_replicas=1", content_type="application/x-www-form-urlencoded"
    )
    assert_problem(response, 415, "unsupported_media_type")


def test_an_oversized_body_is_413(operator_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = '{"node_selector": {"k": "' + "x" * 2000 + '"}}'
    response = operator_client.generic("PUT", SCHEDULING, body, content_type="application/json")
    assert_problem(response, 413, "payload_too_large")


def test_an_oversized_registration_body_is_413_even_though_auth_reads_the_body(api_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = '{"name": "' + "x" * 2000 + '"}'
    response = api_client.generic("POST", "/api/node/register", body, content_type="application/json")
    assert_problem(response, 413, "payload_too_large")


def test_wrong_method_is_405_with_allow(operator_client):
    response = operator_client.post("/api/v1/nodes", {}, format="json")
    body = assert_problem(response, 405, "method_not_allowed")
    assert "GET" in response["Allow"] and "POST" in body["detail"]


def test_not_acceptable_is_406_problem(operator_client):
    response = operator_client.get("/api/v1/nodes", HTTP_ACCEPT="image/png")
    assert_problem(response, 406, "not_acceptable")


def test_unknown_api_path_is_a_404_problem_not_html(operator_client, settings):
    settings.DEBUG = False
    assert_problem(operator_client.get("/api/v1/no-such-thing"), 404, "not_found")


def test_unknown_api_path_is_a_404_problem_even_in_debug(operator_client, settings):
    settings.DEBUG = True
    assert_problem(operator_client.get("/api/v1/no-such-thing"), 404, "not_found")


def test_non_api_paths_keep_django_html_errors(settings):
    settings.DEBUG = False
    response = Client().get("/no-such-page")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_exception_is_a_500_problem_without_traceback(operator_key, settings, debug):
    """A bug (here: a verb patched to raise RuntimeError) must not leak a traceback page."""
    settings.DEBUG = debug
    client = Client(raise_request_exception=False)
    with mock.patch("registry.models.ModelSchedulingConfig.objects.upsert", side_effect=RuntimeError("boom secret")):
        response = client.put(
            SCHEDULING, "{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {operator_key}"
        )
    body = assert_problem(response, 500, "internal_error")
    assert "boom" not in response.content.decode() and "Traceback" not in response.content.decode()
    assert body["title"] == "Internal Server Error"


def test_integrity_error_from_a_uniqueness_race_is_409(operator_client):
    """Provoked deterministically: the upsert verb is patched to raise IntegrityError, as a
    concurrent insert of the same unique key would."""
    with mock.patch(
        "registry.models.ModelSchedulingConfig.objects.upsert",
        side_effect=IntegrityError('duplicate key value violates unique constraint "model_name"'),
    ):
        response = operator_client.put(SCHEDULING, {"min_replicas": 1}, format="json")
    body = assert_problem(response, 409, "conflict")
    assert "duplicate key" not in body["detail"]


def test_registration_race_lost_three_times_is_409_not_500(registration_client):
    """The register verb retries IntegrityError itself and raises it after its last attempt;
    patched here to raise it directly (as three lost races in a row would)."""
    with mock.patch("registry.models.Node.objects.register", side_effect=IntegrityError("could not register")):
        response = registration_client.post("/api/node/register", {"name": "gpu-1", "address": "a:1"}, format="json")
    assert_problem(response, 409, "conflict")


@pytest.mark.parametrize("error", [OperationalError("connection refused"), InterfaceError("connection already closed")])
def test_unreachable_database_is_a_503_with_retry_after(operator_client, error):
    """An unreachable database cannot be provoked inside a test that holds a database
    connection, so the verb is patched to raise what psycopg/sqlite raise when it is down."""
    with mock.patch("registry.models.ModelSchedulingConfig.objects.upsert", side_effect=error):
        response = operator_client.put(SCHEDULING, {"min_replicas": 1}, format="json")
    assert_problem(response, 503, "database_unavailable")
    assert int(response["Retry-After"]) > 0


def test_database_down_during_authentication_is_503(api_client, operator_key):
    """The API key lookup itself fails (patched), as when the database is down."""
    with mock.patch("core.models.ApiKey.objects.authenticate", side_effect=OperationalError("down")):
        response = api_client.get("/api/v1/nodes", HTTP_AUTHORIZATION=f"Bearer {operator_key}")
    assert_problem(response, 503, "database_unavailable")


@pytest.mark.parametrize("error", ["ConnectionError", "TimeoutError"])
def test_an_unanswered_redis_broker_is_a_503_with_retry_after(error):
    """What redis-py raises when django-q2's Redis broker does not answer (REDIS_URL); the whole
    path, a route call against a Redis that is down, is tests/e2e/test_redis_broker.py."""
    import redis.exceptions

    problem = problem_for_exception(getattr(redis.exceptions, error)("Error 111 connecting"))
    assert (problem.status, problem.code) == (503, "broker_unavailable")
    assert int(problem.headers["Retry-After"]) > 0


def test_problem_error_subclasses_carry_status_code_title_and_extras():
    class Teapot(ProblemError):
        status_code = 418
        default_code = "teapot"
        default_detail = "short and stout"
        title = "I'm a teapot"

    problem = problem_for_exception(Teapot(extra={"spout": True}, headers={"Retry-After": 5}))
    assert problem.headers == {"Retry-After": "5"}
    assert problem.as_dict() == {
        "type": "urn:controlplane:problem:teapot",
        "title": "I'm a teapot",
        "status": 418,
        "detail": "short and stout",
        "code": "teapot",
        "spout": True,
    }


def test_flatten_errors_dots_nested_fields():
    assert flatten_errors({"labels": {"zone": ["bad"]}, "items": [{"a": ["x"]}, {}], "name": ["y"]}) == {
        "labels.zone": ["bad"],
        "items.0.a": ["x"],
        "name": ["y"],
    }
    assert flatten_errors(["top"]) == {"non_field_errors": ["top"]}


@pytest.mark.parametrize("debug", [False, True])
def test_a_disallowed_host_on_an_api_path_is_a_400_problem(settings, debug):
    settings.DEBUG = debug
    response = Client().get("/api/v1/nodes", HTTP_HOST="evil.example")
    assert_problem(response, 400, "bad_request")


def test_problem_error_headers_reach_the_response(operator_client):
    class Busy(ProblemError):
        status_code = 503
        default_code = "busy"
        title = "Busy"

    with mock.patch(
        "registry.models.ModelSchedulingConfig.objects.upsert", side_effect=Busy(headers={"Retry-After": 7})
    ):
        response = operator_client.put(SCHEDULING, {}, format="json")
    assert_problem(response, 503, "busy")
    assert response["Retry-After"] == "7"
