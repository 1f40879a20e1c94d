"""Every admin page renders with a populated fleet, and the pages show what diagnosis needs."""

import pytest
from django.urls import reverse

from core.models import ApiKey
from reconciler.models import Event, ModelCondition, ReconcilePass
from registry.models import Lease, LoadFailure, LoadJob, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel
from tests.factories import make_node

pytestmark = pytest.mark.django_db

MODELS = [Node, NodeModel, ModelSchedulingConfig, ModelLoadInfo, LoadJob, Lease, LoadFailure,
          Event, ModelCondition, ReconcilePass, ApiKey]


def _url(model, view, *args):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def extra_rows(fleet_rows):
    """A failed load job, a live lease and a load failure, each written by its verb."""
    node = fleet_rows["nodes"][0]
    job, _ = LoadJob.objects.claim_or_attach("model-0")
    assert LoadJob.objects.fail(job.pk, code="load_failed", message="boom")
    assert Lease.objects.pick_and_grant("model-0", ttl=30) is not None
    LoadFailure.objects.record("model-1", node.pk, "boom")
    return fleet_rows


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_every_changelist_renders_with_a_populated_fleet(admin_client, extra_rows, api_key, model):
    response = admin_client.get(_url(model, "changelist"))
    assert response.status_code == 200


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_every_change_page_renders(admin_client, extra_rows, api_key, model):
    obj = model.objects.first()
    assert obj is not None
    response = admin_client.get(_url(model, "change", obj.pk))
    assert response.status_code == 200


def test_the_staff_operator_without_superuser_sees_the_node_list(staff_client, fleet_rows):
    response = staff_client.get(_url(Node, "changelist"))
    assert response.status_code == 200
    assert b"gpu-00" in response.content


def test_the_node_list_shows_badges_heartbeat_age_vram_and_load(admin_client, fleet_rows):
    response = admin_client.get(_url(Node, "changelist"))
    html = response.content.decode()
    assert "fleet-badge" in html and "healthy" in html
    assert "s ago" in html
    assert "24.0 GiB / 24.0 GiB" in html and "0 B reserved" in html
    assert "gpu=a100" in html
    # every node has 2 replicas; in-flight sums come from the annotation
    node = response.context["cl"].result_list[0]
    assert node.replica_count == 2 and node.in_flight_total is not None


@pytest.mark.parametrize("nodes", [2, 12])
def test_the_node_list_costs_the_same_queries_whatever_the_fleet_size(admin_client, django_assert_max_num_queries, nodes):
    from tests.admin.conftest import populate

    populate(nodes=nodes, models=3)
    # session + user + counts + the annotated page + prefetched labels + filter lookups
    with django_assert_max_num_queries(10):
        response = admin_client.get(_url(Node, "changelist"))
    assert len(response.context["cl"].result_list) == nodes


def test_node_list_filters_by_status_type_and_label_key_and_searches(admin_client, fleet_rows):
    node = fleet_rows["nodes"][0]
    for query in ("?status__exact=healthy", "?node_type__exact=backend", "?label_key=gpu", f"?q={node.pk}",
                  "?q=127.0.0.1", "?q=gpu-01"):
        response = admin_client.get(_url(Node, "changelist") + query)
        assert response.status_code == 200, query
    response = admin_client.get(_url(Node, "changelist") + "?label_key=gpu")
    assert [n.name for n in response.context["cl"].result_list] == ["gpu-00"]
    response = admin_client.get(_url(Node, "changelist") + f"?q={str(node.pk)[:8]}")
    assert [n.name for n in response.context["cl"].result_list] == ["gpu-00"]


def test_the_model_page_combines_config_load_info_conditions_and_events(admin_client, fleet_rows):
    config = ModelSchedulingConfig.objects.get(model_name="model-0")
    response = admin_client.get(_url(ModelSchedulingConfig, "change", config.pk))
    html = response.content.decode()
    assert "3 ready / 1 desired" in html
    assert "ContextSize" in html and "4096" in html and "llama-3-8b.gguf" in html
    assert "MinimumReplicasReady" in html
    assert "scaled up" in html
    assert "Reconcile now" in html
    assert reverse("admin:registry_modelschedulingconfig_reconcile") in html


def test_the_model_page_shows_the_conditions_a_real_reconcile_pass_wrote(admin_client):
    """No load info for a model that wants a replica: the pass records why, the page shows it."""
    from reconciler import reconcile

    make_node(name="gpu-a")
    config = ModelSchedulingConfig.objects.upsert("no-recipe", min_replicas=1)
    page = admin_client.get(_url(ModelSchedulingConfig, "change", config.pk)).content.decode()
    assert "No conditions recorded yet" in page and "No load info" in page

    reconcile.reconcile_once()

    conditions = list(ModelCondition.objects.filter(model_name="no-recipe"))
    assert conditions
    page = admin_client.get(_url(ModelSchedulingConfig, "change", config.pk)).content.decode()
    assert "No conditions recorded yet" not in page
    assert all(condition.reason in page for condition in conditions)


def test_the_admin_names_the_product_not_django(admin_client, client):
    for response in (admin_client.get(reverse("admin:index")), client.get(reverse("admin:login"))):
        html = response.content.decode()
        assert "Django administration" not in html and "Django site admin" not in html
        assert '<div id="site-name"><a href="/admin/">Control plane</a></div>' in html
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert "<title>Fleet administration | Control plane</title>" in index
    assert "<h1>Fleet administration</h1>" in index
    dashboard = admin_client.get(reverse("admin:fleet_dashboard")).content.decode()
    assert "<title>Fleet dashboard | Control plane</title>" in dashboard


def test_the_load_info_page_decodes_model_options(admin_client, fleet_rows):
    info = ModelLoadInfo.objects.get(model_name="model-1")
    response = admin_client.get(_url(ModelLoadInfo, "change", info.pk))
    html = response.content.decode()
    assert "NGPULayers" in html and "99" in html
    assert "\\x" not in html


def test_events_filter_by_kind_model_and_node(admin_client, fleet_rows):
    url = _url(Event, "changelist")
    for query in ("?kind__exact=replica_added", "?model_name=model-1", "?node_name=gpu-00"):
        assert admin_client.get(url + query).status_code == 200


@pytest.mark.parametrize("view", ["changelist", "add"])
def test_a_non_staff_user_is_sent_to_the_login_page(client, django_user_model, view):
    user = django_user_model.objects.create_user("viewer", password="pw-viewer", is_staff=False)
    client.force_login(user)
    response = client.get(_url(Node, "changelist") if view == "changelist" else _url(ModelSchedulingConfig, "add"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_an_anonymous_visitor_is_sent_to_the_login_page(client):
    response = client.get(reverse("admin:fleet_dashboard"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


def test_nodes_cannot_be_added_by_hand_and_node_fields_are_read_only(admin_client, fleet_rows):
    assert admin_client.get(_url(Node, "add")).status_code == 403
    assert admin_client.post(_url(Node, "add"), {"name": "by-hand", "address": "10.0.0.1:1"}).status_code == 403
    assert not Node.objects.filter(name="by-hand").exists()
    node = fleet_rows["nodes"][1]
    response = admin_client.get(_url(Node, "change", node.pk))
    form = response.context["adminform"].form
    assert not ({"status", "token_hash", "total_vram", "available_vram", "reserved_vram", "last_heartbeat"} & set(form.fields))


def test_the_node_page_never_shows_the_node_tokens_hash(admin_client, fleet_rows):
    node = Node.objects.get(pk=fleet_rows["nodes"][1].pk)
    assert node.token_hash
    response = admin_client.get(_url(Node, "change", node.pk))
    assert response.status_code == 200
    assert node.token_hash not in response.content.decode()
