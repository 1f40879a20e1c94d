"""Filters, ordering and page links of the API's lists (``registry/api/filters.py``), the
replica list, and the routing rule for model names that look like sub-resources."""

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from reconciler.models import Event
from registry.models import Node
from tests.clients import assert_problem
from tests.factories import make_node, make_replica, make_scheduling

pytestmark = pytest.mark.django_db


def names(response) -> list[str]:
    assert response.status_code == 200, response.content[:500]
    return [row["name"] for row in response.json()["results"]]


# --- nodes -----------------------------------------------------------------------------------


@pytest.fixture
def fleet():
    make_node(name="a-gpu", labels={"zone": "eu", "gpu": "a100"})
    make_node(name="b-gpu", labels={"zone": "us"}, status=Node.Status.DRAINING)
    make_node(name="c-cpu", status=Node.Status.PENDING)
    make_node(name="d-agent", node_type=Node.NodeType.AGENT, address="")


def test_nodes_filter_by_status_type_name_and_label(operator_client, fleet):
    def listed(**params):
        return names(operator_client.get("/api/v1/nodes", params))

    assert listed() == ["a-gpu", "b-gpu", "c-cpu", "d-agent"]
    assert listed(status="draining") == ["b-gpu"]
    assert listed(status="pending") == ["c-cpu"]
    assert listed(node_type="agent") == ["d-agent"]
    assert listed(name="a-gpu") == ["a-gpu"]
    assert listed(label="zone") == ["a-gpu", "b-gpu"]
    assert listed(label="zone=us") == ["b-gpu"]
    assert listed(label="zone=us", status="healthy") == []
    assert listed(label="gpu=h100") == []


def test_nodes_ordering_over_the_allow_list(operator_client, fleet):
    assert names(operator_client.get("/api/v1/nodes", {"ordering": "-name"})) == ["d-agent", "c-cpu", "b-gpu", "a-gpu"]
    by_status = names(operator_client.get("/api/v1/nodes", {"ordering": "status,-name"}))
    assert by_status == ["b-gpu", "d-agent", "a-gpu", "c-cpu"]  # draining < healthy < pending


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"status": ""},
        {"node_type": "frontend"},
        {"name": "a\x00b"},
        {"label": ""},
        {"label": "=us"},
        {"label": "zone=a\x01"},
        {"ordering": "token_hash"},
        {"ordering": "name,"},
        {"ordering": "name,,status"},
        {"ordering": "-"},
    ],
)
def test_bad_node_filters_are_400_problems_naming_the_parameter(operator_client, fleet, params):
    body = assert_problem(operator_client.get("/api/v1/nodes", params), 400, "validation_error")
    assert set(body["errors"]) == set(params)


def test_page_links_keep_the_filter_and_the_ordering(operator_client, fleet):
    first = operator_client.get("/api/v1/nodes", {"label": "zone", "ordering": "-name", "limit": 1}).json()

    assert first["count"] == 2 and [n["name"] for n in first["results"]] == ["b-gpu"]
    assert first["previous"] is None
    query = parse_qs(urlsplit(first["next"]).query)
    assert query == {"label": ["zone"], "ordering": ["-name"], "limit": ["1"], "offset": ["1"]}

    second = operator_client.get(first["next"]).json()
    assert [n["name"] for n in second["results"]] == ["a-gpu"]
    assert second["next"] is None
    assert parse_qs(urlsplit(second["previous"]).query) == {"label": ["zone"], "ordering": ["-name"], "limit": ["1"]}


def test_equal_sort_keys_keep_one_order_across_pages(operator_client):
    for index in range(6):
        make_node(name=f"same-{index}", status=Node.Status.DRAINING)
    pages = [
        operator_client.get("/api/v1/nodes", {"ordering": "status", "limit": 2, "offset": offset}).json()["results"]
        for offset in (0, 2, 4)
    ]
    seen = [node["id"] for page in pages for node in page]
    assert len(seen) == len(set(seen)) == 6


# --- replicas --------------------------------------------------------------------------------


@pytest.fixture
def replicas():
    gpu_a, gpu_b = make_node(name="gpu-a", slots=2), make_node(name="gpu-b", slots=2)
    make_replica(gpu_b, "llama", 0)
    make_replica(gpu_a, "llama", 1)
    make_replica(gpu_a, "llama", 0, state="loading")
    make_replica(gpu_a, "org/phi.gguf", 0, in_flight=3)
    return gpu_a, gpu_b


def replica_keys(response) -> list[tuple[str, str, int]]:
    assert response.status_code == 200, response.content[:500]
    names_by_id = {str(node.pk): node.name for node in Node.objects.all()}
    return [(r["model_name"], names_by_id[str(r["node_id"])], r["replica_index"]) for r in response.json()["results"]]


def test_replicas_list_filters_and_orders(operator_client, replicas):
    gpu_a, _ = replicas

    everything = replica_keys(operator_client.get("/api/v1/replicas"))
    assert everything == [
        ("llama", "gpu-a", 0),
        ("llama", "gpu-a", 1),
        ("llama", "gpu-b", 0),
        ("org/phi.gguf", "gpu-a", 0),
    ]
    assert replica_keys(operator_client.get("/api/v1/replicas", {"node": str(gpu_a.pk), "model": "llama"})) == [
        ("llama", "gpu-a", 0),
        ("llama", "gpu-a", 1),
    ]
    assert replica_keys(operator_client.get("/api/v1/replicas", {"state": "loading"})) == [("llama", "gpu-a", 0)]
    busiest = operator_client.get("/api/v1/replicas", {"ordering": "-in_flight", "limit": 1}).json()
    assert busiest["count"] == 4 and busiest["results"][0]["in_flight"] == 3 and busiest["next"]
    assert set(busiest["results"][0]) == {
        "id",
        "node_id",
        "model_name",
        "replica_index",
        "address",
        "state",
        "in_flight",
        "backend_type",
        "revision",
        "draining_since",
    }


@pytest.mark.parametrize("params", [{"state": "ready"}, {"node": "gpu-a"}, {"model": ""}, {"ordering": "address"}])
def test_bad_replica_filters_are_400_problems(operator_client, replicas, params):
    body = assert_problem(operator_client.get("/api/v1/replicas", params), 400, "validation_error")
    assert set(body["errors"]) == set(params)


def test_listing_replicas_is_an_operators_and_reporting_one_a_frontends(frontend_client, replicas):
    assert_problem(frontend_client.get("/api/v1/replicas"), 403, "permission_denied")
    # The frontend key still reaches the report (refused here for its body, not its role).
    assert_problem(frontend_client.post("/api/v1/replicas", {}, format="json"), 400, "validation_error")


# --- events ----------------------------------------------------------------------------------


@pytest.fixture
def timeline(now):
    return [
        Event.objects.record(Event.Kind.REPLICA_ADDED, model_name="llama", now=now + timedelta(minutes=minute))
        for minute in range(4)
    ]


def test_events_since_until_and_ordering(frontend_client, timeline, now):
    def ids(**params):
        response = frontend_client.get("/api/v1/events", params)
        assert response.status_code == 200, response.content[:500]
        return [e["id"] for e in response.json()["results"]]

    newest_first = [e.pk for e in reversed(timeline)]
    assert ids() == newest_first
    assert ids(ordering="created_at") == list(reversed(newest_first))
    assert ids(since=(now + timedelta(minutes=1)).isoformat()) == newest_first[:3]
    assert ids(until=(now + timedelta(minutes=1)).isoformat()) == newest_first[3:]
    # An offset names the same instant: 13:01+01:00 is 12:01 UTC.
    assert ids(since="2026-11-26T13:01:00+01:00", until="2026-11-26T12:03:00Z") == newest_first[1:3]


@pytest.mark.parametrize(
    "params",
    [
        {"since": "yesterday"},
        {"until": ""},
        {"since": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
        {"until": "9999-12-31T23:59:59-01:00"},  # after year 9999 in UTC
        {"ordering": "kind"},
        {"ordering": "created_at,"},
    ],
)
def test_bad_event_filters_are_400_problems(frontend_client, timeline, params):
    body = assert_problem(frontend_client.get("/api/v1/events", params), 400, "validation_error")
    assert set(body["errors"]) == set(params)


# --- model names and sub-resources -----------------------------------------------------------


def test_sub_resources_win_over_a_model_name_with_their_suffix(operator_client):
    """The rule of ``registry/api/routers.py``: ``models/x/route`` is model ``x``'s route call,
    so a model named ``x/route`` has no status URL, while its own sub-resources still work."""
    make_scheduling("x/route", min_replicas=2)

    status_url = operator_client.get("/api/v1/models/x/route")
    config = operator_client.get("/api/v1/models/x/route/scheduling")

    assert_problem(status_url, 405, "method_not_allowed")
    assert config.status_code == 200 and config.json()["model_name"] == "x/route"
    assert config.json()["min_replicas"] == 2
    listed = [m["model_name"] for m in operator_client.get("/api/v1/models").json()["results"]]
    assert listed == ["x/route"]


# --- models ------------------------------------------------------------------------------------


@pytest.fixture
def catalogue(now):
    """Models known through each of the three tables: a managed config, an unmanaged (0/0)
    config with load info, load info alone, and a replica row alone."""
    from registry.models import ModelLoadInfo

    make_scheduling("org/Llama-8b", min_replicas=1)
    make_scheduling("qwen-0/0")
    ModelLoadInfo.objects.upsert("qwen-0/0", "llama-cpp", b"\x0a\x01q", now=now)
    ModelLoadInfo.objects.upsert("phi-info-only", "llama-cpp", b"\x0a\x01p", now=now)
    make_replica(make_node(name="gpu-r"), "reported-llama", 0, address="10.0.0.7:9000")


def model_names(response) -> list[str]:
    assert response.status_code == 200, response.content[:500]
    return [row["model_name"] for row in response.json()["results"]]


def test_models_filter_by_configured_autoscaled_and_name(frontend_client, catalogue):
    def listed(**params):
        return model_names(frontend_client.get("/api/v1/models", params))

    everything = ["org/Llama-8b", "phi-info-only", "qwen-0/0", "reported-llama"]
    assert listed() == everything
    assert listed(configured="true") == ["org/Llama-8b", "qwen-0/0"]
    assert listed(configured="false") == ["phi-info-only", "reported-llama"]
    assert listed(autoscaled="true") == ["org/Llama-8b"]
    assert listed(autoscaled="false") == ["phi-info-only", "qwen-0/0", "reported-llama"]
    assert listed(name="llama") == ["org/Llama-8b", "reported-llama"]
    assert listed(name="LLAMA", configured="false") == ["reported-llama"]
    assert listed(configured="false", autoscaled="true") == []
    page = frontend_client.get("/api/v1/models", {"configured": "true", "limit": 1}).json()
    assert page["count"] == 2 and parse_qs(urlsplit(page["next"]).query)["configured"] == ["true"]


@pytest.mark.parametrize(
    "params", [{"configured": "yes"}, {"autoscaled": ""}, {"name": ""}, {"name": "x" * 256}]
)
def test_bad_model_filters_are_400_problems(frontend_client, catalogue, params):
    body = assert_problem(frontend_client.get("/api/v1/models", params), 400, "validation_error")
    assert set(body["errors"]) == set(params)
