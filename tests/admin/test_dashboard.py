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
    # session + user + six snapshot queries + events + last pass
    with django_assert_max_num_queries(10):
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
