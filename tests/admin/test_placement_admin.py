"""Issue 16 part 4 in the admin: the node page edits the VRAM budget through its verb, the
model page edits ``disk_bytes``/``spread_by`` through ``upsert`` and shows "why here / why not
there" for a hypothetical next replica, read-only."""

import pytest
from django.urls import reverse

from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeLabel, NodeModel
from tests.factories import GIB, make_node, make_scheduling

from ..router.conftest import options_blob

pytestmark = pytest.mark.django_db


def _node_form(admin_client, node, **fields):
    url = reverse("admin:registry_node_change", args=[node.pk])
    formset = admin_client.get(url).context["inline_admin_formsets"][0].formset
    data = {
        f"{formset.prefix}-TOTAL_FORMS": "1",
        f"{formset.prefix}-INITIAL_FORMS": "0",
        f"{formset.prefix}-MIN_NUM_FORMS": "0",
        f"{formset.prefix}-MAX_NUM_FORMS": "1000",
        f"{formset.prefix}-0-key": "zone",
        f"{formset.prefix}-0-value": "a",
        **fields,
    }
    return url, data


def test_the_node_page_sets_and_clears_the_vram_budget(admin_client):
    node = make_node(labels={"zone": "a"})
    url, data = _node_form(admin_client, node, vram_budget=str(8 * GIB))
    assert admin_client.post(url, data).status_code == 302
    node.refresh_from_db()
    assert node.vram_budget == 8 * GIB
    assert NodeLabel.objects.as_dict(node.pk)["zone"] == "a"

    url, data = _node_form(admin_client, node, vram_budget="")
    assert admin_client.post(url, data).status_code == 302
    node.refresh_from_db()
    assert node.vram_budget is None


def test_the_model_form_saves_disk_size_and_spread_label(admin_client):
    response = admin_client.post(
        reverse("admin:registry_modelschedulingconfig_add"),
        {
            "model_name": "llama",
            "min_replicas": "1",
            "max_replicas": "0",
            "node_selector": "{}",
            "placement": "spread",
            "disk_bytes": str(5 * GIB),
            "spread_by": "zone",
        },
    )
    assert response.status_code == 302
    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (config.disk_bytes, config.spread_by) == (5 * GIB, "zone")


def test_the_model_page_explains_why_here_and_why_not_there(admin_client):
    make_node(name="roomy", labels={"zone": "b"})
    capped = make_node(name="capped", labels={"zone": "b"})
    smalldisk = make_node(name="smalldisk", labels={"zone": "b"})
    make_node(name="nozone")
    Node.objects.set_vram_budget(capped.pk, GIB)
    Node.objects.heartbeat(smalldisk.pk, total_disk=100 * GIB, available_disk=GIB)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", options_blob("llama.gguf", vram=2 * GIB))
    config = make_scheduling("llama", min_replicas=1)
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=1, disk_bytes=10 * GIB, spread_by="zone")
    before = (NodeModel.objects.count(), list(Node.objects.values_list("reserved_vram", flat=True)))

    page = admin_client.get(reverse("admin:registry_modelschedulingconfig_change", args=[config.pk]))

    assert page.status_code == 200
    verdicts = {v.node.name: v.reason for v in page.context["diag_placement"]}
    assert verdicts == {"roomy": "chosen", "capped": "budget", "smalldisk": "disk", "nozone": "spread_label_missing"}
    html = page.content.decode()
    assert "why here / why not there" in html and "<strong>chosen</strong>" in html
    assert (NodeModel.objects.count(), list(Node.objects.values_list("reserved_vram", flat=True))) == before
