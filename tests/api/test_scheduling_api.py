"""Operator API of scheduling configs: /api/v1/models/{model}/scheduling and /api/v1/scheduling."""

from datetime import timedelta

import pytest

from registry.models import ModelSchedulingConfig
from tests.clients import assert_problem
from tests.factories import make_scheduling, trip_breaker

pytestmark = pytest.mark.django_db

MODEL = "org/llama-3.1-8b.gguf"
URL = f"/api/v1/models/{MODEL}/scheduling"


def test_put_creates_then_replaces_and_get_reads_it(operator_client):
    response = operator_client.put(
        URL, {"min_replicas": 2, "max_replicas": 4, "node_selector": {"gpu.vendor": "nvidia"}}, format="json"
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["model_name"], body["min_replicas"], body["max_replicas"]) == (MODEL, 2, 4)
    assert body["node_selector"] == {"gpu.vendor": "nvidia"} and body["autoscaled"] is True

    operator_client.put(URL, {"min_replicas": 1}, format="json")
    body = operator_client.get(URL).json()
    assert (body["min_replicas"], body["max_replicas"], body["node_selector"]) == (1, 0, {})
    assert ModelSchedulingConfig.objects.get().model_name == MODEL


def test_placement_fields_are_written_when_given_and_kept_when_omitted(operator_client):
    body = operator_client.put(
        URL, {"min_replicas": 2, "placement": "binpack", "disk_bytes": 4 * 1024**3, "spread_by": "zone"}, format="json"
    ).json()
    assert (body["placement"], body["disk_bytes"], body["spread_by"]) == ("binpack", 4 * 1024**3, "zone")
    # Omitted: kept as stored (an operator changing the floor does not reset the placement).
    body = operator_client.put(URL, {"min_replicas": 3}, format="json").json()
    assert (body["min_replicas"], body["placement"], body["disk_bytes"], body["spread_by"]) == (
        3, "binpack", 4 * 1024**3, "zone")
    body = operator_client.put(URL, {"min_replicas": 3, "spread_by": "", "placement": "spread"}, format="json").json()
    assert (body["placement"], body["spread_by"]) == ("spread", "")


def test_put_keeps_the_circuit_breaker(operator_client, now):
    make_scheduling(MODEL, min_replicas=1)
    trip_breaker(MODEL, until=now + timedelta(minutes=5), now=now)
    operator_client.put(URL, {"min_replicas": 3}, format="json")
    assert ModelSchedulingConfig.objects.get().unsatisfiable_until == now + timedelta(minutes=5)


def test_min_above_max_is_a_400_from_the_verb(operator_client):
    body = assert_problem(
        operator_client.put(URL, {"min_replicas": 3, "max_replicas": 2}, format="json"), 400, "validation_error"
    )
    assert "min_replicas" in body["errors"]


@pytest.mark.parametrize(
    "payload",
    [
        {"min_replicas": -1},
        {"max_replicas": "2"},
        {"min_replicas": True},
        {"min_replicas": 2**31},
        {"node_selector": {"zone": 1}},
        {"node_selector": ["zone"]},
        {"minimum": 1},
        {"placement": "random"},
        {"disk_bytes": -1},
        {"disk_bytes": "10"},
        {"spread_by": 3},
        {"spread_by": "z" * 64},
    ],
)
def test_put_validation(operator_client, payload):
    assert_problem(operator_client.put(URL, payload, format="json"), 400, "validation_error")


def test_get_and_delete_unknown_is_404(operator_client):
    assert_problem(operator_client.get(URL), 404, "not_found")
    assert_problem(operator_client.delete(URL), 404, "not_found")


def test_delete(operator_client):
    make_scheduling(MODEL, min_replicas=1)
    assert operator_client.delete(URL).status_code == 204
    assert not ModelSchedulingConfig.objects.exists()


def test_blank_or_too_long_model_names_are_400(operator_client):
    assert_problem(operator_client.put("/api/v1/models/%20/scheduling", {}, format="json"), 400, "validation_error")
    assert_problem(operator_client.get(f"/api/v1/models/{'m' * 256}/scheduling"), 400, "validation_error")


def test_list_is_paginated_by_model_name(operator_client):
    for name in ("b", "a/x", "c"):
        make_scheduling(name, min_replicas=1)
    page = operator_client.get("/api/v1/scheduling", {"limit": 2}).json()
    assert page["count"] == 3
    assert [c["model_name"] for c in page["results"]] == ["a/x", "b"]


@pytest.mark.parametrize(
    ("method", "path"), [("get", URL), ("put", URL), ("delete", URL), ("get", "/api/v1/scheduling")]
)
def test_scheduling_is_operator_only(api_client, frontend_client, node, method, path):
    assert_problem(getattr(api_client, method)(path, {}, format="json"), 401, "not_authenticated")
    assert_problem(getattr(frontend_client, method)(path, {}, format="json"), 403, "permission_denied")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {node.token}")
    assert_problem(getattr(api_client, method)(path, {}, format="json"), 401, "invalid_token")


WORKING_HOURS = {"days": "mon-fri", "start": "08:00", "end": "18:00", "min_replicas": 3, "timezone": "Europe/Paris"}


def test_put_autoscaling_and_a_floor_schedule_round_trip(operator_client):
    payload = {
        "min_replicas": 0,
        "max_replicas": 8,
        "target_in_flight_per_replica": 4,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
        "floor_schedule": [WORKING_HOURS, {"days": "sat", "start": "22:00", "end": "02:00", "min_replicas": 1}],
    }
    body = operator_client.put(URL, payload, format="json").json()
    assert (body["target_in_flight_per_replica"], body["upscale_delay_s"], body["downscale_delay_s"]) == (4, 10, 120)
    # The time zone defaults to UTC and is stored with the window.
    assert body["floor_schedule"] == [WORKING_HOURS, {**payload["floor_schedule"][1], "timezone": "UTC"}]
    assert operator_client.get(URL).json()["floor_schedule"] == body["floor_schedule"]
    # A PUT replaces the config: without a schedule, none is left.
    assert operator_client.put(URL, {"min_replicas": 1}, format="json").json()["floor_schedule"] == []


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ({**WORKING_HOURS, "days": "weekdays"}, "unknown day"),
        ({**WORKING_HOURS, "start": "8am"}, '"start" must be "HH:MM"'),
        ({**WORKING_HOURS, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({**WORKING_HOURS, "min_replicas": 9}, "min_replicas 9 > max_replicas 8"),
        ({**WORKING_HOURS, "zone": "UTC"}, None),
        ({**WORKING_HOURS, "min_replicas": "3"}, None),
        ("mon-fri", None),
    ],
)
def test_a_bad_floor_schedule_is_a_400(operator_client, window, message):
    response = operator_client.put(URL, {"max_replicas": 8, "floor_schedule": [window]}, format="json")
    body = assert_problem(response, 400, "validation_error")
    assert all(key.startswith("floor_schedule") for key in body["errors"]), body
    if message:
        assert message in str(body["errors"]), body
    assert not ModelSchedulingConfig.objects.exists()


def test_model_status_shows_the_floor_in_force(operator_client):
    every_day = {"days": "*", "start": "00:00", "end": "24:00", "min_replicas": 2}
    operator_client.put(URL, {"min_replicas": 1, "floor_schedule": [every_day]}, format="json")
    body = operator_client.get(f"/api/v1/models/{MODEL}").json()
    assert (body["min_replicas"], body["effective_min_replicas"], body["desired_replicas"]) == (1, 2, 2)
