"""The node change page: a fixed number of queries and no network call whatever the node's
replicas and labels, small enough to render and save with the most labels a node may carry,
and saving it writes labels only (never the node row as the page read it)."""

import grpc
import pytest
from django.urls import reverse

from registry.managers import max_labels_per_node
from registry.models import Node, NodeLabel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

UNREACHABLE = "127.0.0.1:9"


@pytest.fixture
def no_network(monkeypatch):
    """Any gRPC channel opened while the page renders fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call from an admin page: channel to {args[:1]}")

    monkeypatch.setattr(grpc, "insecure_channel", refuse)
    monkeypatch.setattr(grpc, "secure_channel", refuse)


def node_with(replicas: int, labels: int) -> Node:
    node = make_node(name=f"node-{replicas}-{labels}", address=UNREACHABLE, slots=max(1, replicas))
    if labels:
        NodeLabel.objects.merge(node.pk, {f"team.{i}": f"v{i}" for i in range(labels)})
    for i in range(replicas):
        make_replica(node, f"model-{i}", 0, address=UNREACHABLE)
    return node


def change_url(node) -> str:
    return reverse("admin:registry_node_change", args=[node.pk])


def form_data(response) -> dict:
    """The POST a browser sends back for the page as rendered (every inline row unchanged)."""
    data = {}
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        management = formset.management_form
        data.update({management.add_prefix(name): value for name, value in management.initial.items()})
        for form in formset.forms:
            for name, field in form.fields.items():
                value = form.initial.get(name, field.initial)
                value = getattr(value, "pk", value)
                if value is not None:
                    data[form.add_prefix(name)] = value
    return data


@pytest.mark.parametrize("replicas,labels", [(1, 0), (12, 40)])
def test_the_node_page_costs_a_fixed_number_of_queries_and_no_network_call(
    admin_client, django_assert_max_num_queries, no_network, replicas, labels
):
    node = node_with(replicas, labels)
    # session, user, the node (its labels prefetched, as for the list), the label formset's
    # rows, the content type of the label inline (when not cached yet), the replica rows (one
    # table); none per row
    with django_assert_max_num_queries(7):
        response = admin_client.get(change_url(node))
    assert response.status_code == 200
    html = response.content.decode()
    assert all(f"model-{i}" in html for i in range(replicas))
    assert all(f"team.{i}" in html for i in range(labels))


@pytest.mark.parametrize("replicas,labels", [(1, 0), (12, 40)])
def test_saving_the_node_page_costs_a_fixed_number_of_queries(
    admin_client, django_assert_max_num_queries, replicas, labels
):
    node = node_with(replicas, labels)
    before = NodeLabel.objects.as_dict(node.pk)
    data = form_data(admin_client.get(change_url(node)))
    with django_assert_max_num_queries(30):
        response = admin_client.post(change_url(node), data)
    assert response.status_code == 302, response.content[:2000]
    # The page posted back unchanged: the same labels, the same replica rows.
    assert NodeLabel.objects.as_dict(node.pk) == before
    assert node.replicas.count() == replicas


def test_the_page_renders_and_saves_with_the_most_labels_a_node_may_carry(admin_client, settings):
    node = node_with(3, 0)
    room = max_labels_per_node() - NodeLabel.objects.filter(node=node).count()
    NodeLabel.objects.merge(node.pk, {f"team.{i}": "x" * 255 for i in range(room)})
    assert NodeLabel.objects.filter(node=node).count() == max_labels_per_node()

    response = admin_client.get(change_url(node))
    assert response.status_code == 200
    assert len(response.content) < 1_000_000
    data = form_data(response)
    assert len(data) < settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    data["labels-0-value"] = "changed"
    saved = admin_client.post(change_url(node), data)
    assert saved.status_code == 302
    assert len(NodeLabel.objects.as_dict(node.pk)) == max_labels_per_node()
    assert "changed" in NodeLabel.objects.as_dict(node.pk).values()


def test_the_page_refuses_more_labels_than_a_node_may_carry(admin_client, settings):
    node = node_with(0, 0)
    settings.CONTROLPLANE_MAX_LABELS_PER_NODE = NodeLabel.objects.filter(node=node).count() + 1
    data = form_data(admin_client.get(change_url(node)))
    prefix = "labels"
    total = int(data[f"{prefix}-TOTAL_FORMS"])
    for extra in range(2):
        data[f"{prefix}-{total + extra}-key"] = f"extra-{extra}"
        data[f"{prefix}-{total + extra}-value"] = "x"
        data[f"{prefix}-{total + extra}-node"] = node.pk
    data[f"{prefix}-TOTAL_FORMS"] = total + 2
    response = admin_client.post(change_url(node), data)
    assert response.status_code == 200  # the form again, with the error
    assert "extra-0" not in NodeLabel.objects.as_dict(node.pk)


def test_saving_the_page_never_writes_back_the_node_row_it_read(admin_client, now):
    """An operator edits labels while the node drains itself: the drain stands."""
    node = node_with(1, 0)
    data = form_data(admin_client.get(change_url(node)))
    Node.objects.mark_draining(node.pk, by=Node.DrainedBy.NODE, now=now)

    data["labels-0-value"] = "edited"
    assert admin_client.post(change_url(node), data).status_code == 302

    node.refresh_from_db()
    assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.NODE)
    assert "edited" in NodeLabel.objects.as_dict(node.pk).values()


def test_reconcile_now_needs_the_change_permission_as_the_api_does(client, django_user_model):
    from django.contrib.auth.models import Permission

    from reconciler.models import ReconcilePass

    viewer = django_user_model.objects.create_user("sched-viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_modelschedulingconfig"))
    client.force_login(viewer)
    response = client.post(reverse("admin:registry_modelschedulingconfig_reconcile"))
    assert response.status_code == 302
    assert not ReconcilePass.objects.exists()
