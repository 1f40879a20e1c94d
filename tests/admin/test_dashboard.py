"""The fleet dashboard: staff only, the grid and the counts, and a constant number of queries."""

import pytest
from django.urls import reverse

from reconciler.admin.dashboard import replica_cell
from registry.admin.display import age, human_bytes
from registry.models import Node
from tests.admin.conftest import populate
from tests.factories import make_node

pytestmark = pytest.mark.django_db

DASHBOARD = reverse("admin:fleet_dashboard")


def test_the_admin_index_links_the_dashboard(admin_client):
    response = admin_client.get(reverse("admin:index"))
    assert DASHBOARD.encode() in response.content


def test_the_dashboard_shows_the_grid_counts_last_pass_and_events(admin_client, fleet_rows):
    make_node(name="waiting", status=Node.Status.PENDING)
    response = admin_client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "loaded x1 (1 in flight)" in html and "loaded x1</td>" in html
    rows = {row["name"]: row for row in response.context["model_rows"]}
    assert rows["model-0"]["ready"] == 3 and rows["model-0"]["desired"] == 1
    counts = {status: count for status, _, count, _ in response.context["status_counts"]}
    assert counts["healthy"] == 3 and counts["pending"] == 1
    assert "4 replicas_probed" in html
    assert "scaled up" in html


def test_a_non_staff_user_cannot_see_the_dashboard(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("viewer", password="pw", is_staff=False))
    response = client.get(DASHBOARD)
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize(("nodes", "models"), [(2, 1), (15, 8)])
def test_the_dashboard_costs_the_same_queries_whatever_the_fleet_size(
    admin_client, django_assert_max_num_queries, nodes, models
):
    populate(nodes=nodes, models=models)
    # session + user + seven snapshot queries + events + last pass + three charts
    with django_assert_max_num_queries(14):
        response = admin_client.get(DASHBOARD)
    assert len(response.context["grid"]) == nodes and len(response.context["models"]) == models


def test_the_dashboard_renders_an_empty_fleet(admin_client):
    response = admin_client.get(DASHBOARD)
    assert response.status_code == 200 and b"No nodes registered" in response.content


def test_formatting_helpers(now):
    from datetime import timedelta

    assert human_bytes(24 * 1024**3) == "24.0 GiB" and human_bytes(512) == "512 B" and human_bytes(None) == "-"
    assert age(now - timedelta(seconds=12), now=now) == "12 s ago"
    assert age(now - timedelta(minutes=5), now=now) == "5 min ago"
    assert age(None, now=now) == "never"

    class Row:
        def __init__(self, state, in_flight):
            self.state, self.in_flight = state, in_flight

    assert replica_cell([Row("loaded", 1), Row("loaded", 0), Row("loading", 0)]) == "loaded x2 (1 in flight), loading x1"
    assert replica_cell([]) == ""


def test_the_dashboard_searches_and_pages_models_and_nodes(admin_client):
    from reconciler.admin import dashboard

    populate(nodes=3, models=3)
    html = admin_client.get(DASHBOARD, {"model": "MODEL-1"}).content.decode()
    context = admin_client.get(DASHBOARD, {"model": "MODEL-1"}).context
    assert [row["name"] for row in context["model_rows"]] == ["model-1"] and context["models"] == ["model-1"]
    assert 'value="MODEL-1"' in html  # the form keeps the search
    assert [row["node"].name for row in admin_client.get(DASHBOARD, {"node": "gpu-02"}).context["grid"]] == ["gpu-02"]
    by_label = admin_client.get(DASHBOARD, {"label": "gpu=a100"}).context["grid"]
    assert [row["node"].name for row in by_label] == ["gpu-00"]
    assert [row["node"].name for row in admin_client.get(DASHBOARD, {"label": "gpu"}).context["grid"]] == ["gpu-00"]
    assert admin_client.get(DASHBOARD, {"label": "gpu=h100"}).context["grid"] == []
    assert b"No node matches." in admin_client.get(DASHBOARD, {"node": "nothing"}).content

    # paging: a page of models, the next link keeps the search
    original = dashboard.MODELS_PER_PAGE
    dashboard.MODELS_PER_PAGE = 2
    try:
        first = admin_client.get(DASHBOARD, {"model": "model"}).context
        assert [row["name"] for row in first["model_rows"]] == ["model-0", "model-1"]
        assert first["links"]["models_next"] == "?model=model&page=2" and first["links"]["models_previous"] is None
        second = admin_client.get(DASHBOARD + first["links"]["models_next"]).context
        assert [row["name"] for row in second["model_rows"]] == ["model-2"] and second["models"] == ["model-2"]
        assert second["links"]["models_previous"] == "?model=model"
        # past the end: the last page, never an error
        assert [row["name"] for row in admin_client.get(DASHBOARD, {"page": "99"}).context["model_rows"]] == ["model-2"]
    finally:
        dashboard.MODELS_PER_PAGE = original


@pytest.mark.parametrize("page", ["0", "-1", "x", "1e9", "9" * 40, ""])
def test_a_bad_page_or_search_shows_the_first_page(admin_client, page):
    populate(nodes=2, models=2)
    response = admin_client.get(DASHBOARD, {"page": page, "node_page": page, "model": "m" * 5000})
    assert response.status_code == 200
    assert response.context["model_page"].number == 1 and len(response.context["query"].model) == 255


def test_the_dashboard_lists_problems_first_and_filters_on_them(admin_client):
    from reconciler.models import ModelCondition

    populate(nodes=2, models=3)
    ModelCondition.objects.set_condition("model-2", ModelCondition.Type.AVAILABLE, False, "MinimumReplicasUnavailable")
    make_node(name="gone", status=Node.Status.OFFLINE)
    context = admin_client.get(DASHBOARD).context
    assert [row["name"] for row in context["problem_models"]] == ["model-2"]
    assert [node.name for node in context["problem_nodes"]] == ["gone"]
    assert ("Available", 2, 1) in context["condition_counts"]
    only = admin_client.get(DASHBOARD + context["links"]["problems"]).context
    assert [row["name"] for row in only["model_rows"]] == ["model-2"]


def test_a_fleet_of_1000_nodes_x_1000_models_gives_a_small_page_in_constant_queries(
    admin_client, django_assert_max_num_queries
):
    from tests.admin.big_fleet import build_big_fleet

    fleet = build_big_fleet(nodes=1000, models=1000)
    # session + user + seven snapshot queries + events + last pass + three charts
    with django_assert_max_num_queries(14):
        response = admin_client.get(DASHBOARD)
    assert response.status_code == 200
    assert len(response.content) < 1024 * 1024, len(response.content)
    context = response.context
    assert context["model_total"] == 1000 and context["node_total"] == 1000
    assert context["problem_model_total"] == len(fleet["short"]) == 40
    assert context["problem_node_total"] == 40 and len(context["problem_nodes"]) == 20
    assert len(context["grid"]) == 50 and len(context["models"]) == 20
    filtered = admin_client.get(DASHBOARD, {"model": "model-00999", "label": "zone=zone-1"}).context
    assert [row["name"] for row in filtered["model_rows"]] == ["model-00999"]
    assert filtered["node_page"].total == 250
