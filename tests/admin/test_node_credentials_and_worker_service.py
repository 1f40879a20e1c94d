"""The node pages say how each node authenticates, whether new replicas go to it (and why
not), and its disk figures: a LocalAI worker next to a reference worker."""

import pytest
from django.urls import reverse

from registry.models import Node
from tests.clients import client_with
from tests.factories import GIB, make_node

pytestmark = pytest.mark.django_db

FLEET_TOKEN = "admin-test-fleet-token"
TIB = 1024 * GIB
NO_WORKER_SERVICE = "does not answer the worker gRPC service (LocalAI workers take backend commands over NATS)"
NOT_PLACED = f"not placed on: {NO_WORKER_SERVICE}"


@pytest.fixture
def localai_node(settings, now):
    """Registered and heartbeating as LocalAI's worker does, then found without the worker
    service by the reconciler's ListBackends (the verb its pass calls)."""
    settings.CONTROLPLANE_REGISTRATION_TOKEN = FLEET_TOKEN
    api = client_with(FLEET_TOKEN)
    body = {"name": "mac-1", "address": "10.0.0.9:50051", "gpu_vendor": "apple", "token": FLEET_TOKEN}
    node_id = api.post("/api/node/register", body, format="json").json()["id"]
    beat = {"available_ram": GIB, "total_disk": 2 * TIB, "available_disk": 900 * GIB}
    assert api.post(f"/api/node/{node_id}/heartbeat", beat, format="json").status_code == 200
    detail = "10.0.0.9:50051: answers gRPC but not the worker service (ListBackends: UNIMPLEMENTED)"
    assert Node.objects.record_worker_api(node_id, available=False, detail=detail, address="10.0.0.9:50051", now=now)
    return Node.objects.get(pk=node_id)


def test_the_node_list_shows_credential_worker_service_and_disk(admin_client, localai_node):
    make_node(name="reference-1")

    html = admin_client.get(reverse("admin:registry_node_changelist")).content.decode()

    assert "fleet registration token (LocalAI worker)" in html and "per-node token" in html
    assert "<strong>not placed on</strong>" in html and NO_WORKER_SERVICE in html
    assert "ListBackends: UNIMPLEMENTED" in html  # the cell's tooltip
    assert ">answers<" in html  # the reference worker
    assert "disk 900.0 GiB / 2.0 TiB" in html and "disk not reported" in html


def test_the_node_page_shows_why_the_node_is_not_placed_on(admin_client, localai_node):
    html = admin_client.get(reverse("admin:registry_node_change", args=[localai_node.pk])).content.decode()

    assert "Worker service and credentials" in html
    assert NOT_PLACED in html and "ListBackends: UNIMPLEMENTED" in html
    assert "fleet registration token (LocalAI worker)" in html
    assert "900.0 GiB / 2.0 TiB" in html and "apple" in html


def test_the_node_list_filters_by_worker_service_and_credential(admin_client, localai_node):
    make_node(name="reference-1")
    url = reverse("admin:registry_node_changelist")

    missing = admin_client.get(url + "?worker_api__exact=missing").context["cl"].result_list
    by_token = admin_client.get(url + "?auth_mode__exact=node_token").context["cl"].result_list

    assert [node.name for node in missing] == ["mac-1"]
    assert [node.name for node in by_token] == ["reference-1"]


def test_an_unhealthy_or_draining_node_is_not_shown_as_placed_on(admin_client, now):
    """The reconciler marks a heartbeating node unhealthy when its worker stops answering
    ListBackends; ``worker_api`` still records the worker's last answer, so the column must
    not say "answers" for it (nor for a draining node)."""
    silent, drained, serving = (make_node(name=name) for name in ("silent-1", "drained-1", "serving-1"))
    for node in (silent, drained, serving):  # each worker once answered ListBackends
        assert Node.objects.record_worker_api(node.pk, available=True, detail="", address=node.address, now=now)
    assert Node.objects.mark_unhealthy(silent.pk, now=now)
    assert Node.objects.mark_draining(drained.pk, by=Node.DrainedBy.OPERATOR, now=now)

    html = admin_client.get(reverse("admin:registry_node_changelist")).content.decode()
    assert "its worker stopped answering the worker gRPC service (node unhealthy)" in html
    assert "node draining" in html
    assert html.count(">answers<") == 1  # serving-1 only
    page = admin_client.get(reverse("admin:registry_node_change", args=[silent.pk])).content.decode()
    assert "not placed on: its worker stopped answering" in page
