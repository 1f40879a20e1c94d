"""A staff session has the rights its Django permissions give it on the API, never more.

Before: any staff user with a session was an operator (and a frontend): a staff user with no
model permission, to whom the admin shows nothing, could delete nodes through the API. Now each
operator action maps to the model permission the admin asks for the same change, and the
frontend endpoints need ``registry.use_frontend_api``. Checked by enumeration (every view of
the URL conf), and both ways on real verbs: refused calls change nothing, admitted calls store
their effect.
"""

import pytest

from core.auth import IsFrontend, IsOperator
from registry.models import ModelSchedulingConfig, Node, NodeLabel
from tests.clients import OPERATOR_PERMISSIONS, client_with, session_client, staff_user
from tests.factories import make_api_key, make_node
from tests.security.test_authorization import _call, _concrete, _endpoints, _permission_classes, _walk

pytestmark = pytest.mark.django_db


def test_every_operator_action_maps_to_django_permissions():
    """A view that forgot to map an action would refuse every session: catch it here."""
    from django.urls import get_resolver

    unmapped = []
    for route, callback in _walk(get_resolver().url_patterns):
        view = getattr(callback, "cls", None)
        if view is None:
            continue
        actions = getattr(callback, "actions", None) or {
            m: m for m in ("get", "post", "put", "patch", "delete") if hasattr(view, m)
        }
        names = {name for method, name in actions.items() if IsOperator in _permission_classes(view, actions, method)}
        unmapped += [(route, name) for name in names if name not in (getattr(view, "session_permissions", None) or {})]
    assert not unmapped, unmapped


def test_a_staff_session_without_permissions_is_refused_everywhere_and_changes_nothing():
    node = make_node(name="perm-target", labels={"zone": "a"})
    client = session_client(staff_user("nobody"))
    endpoints = _endpoints(IsOperator) + _endpoints(IsFrontend)
    assert len(endpoints) >= 20
    for route, method in endpoints:
        response = _call(client, method, _concrete(route, node.pk))
        assert response.status_code == 403, (method, route, response.status_code, response.content[:300])
        assert response.json()["code"] == "permission_denied"
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY
    assert NodeLabel.objects.as_dict(node.pk)["zone"] == "a"


def test_a_staff_session_without_delete_permission_cannot_delete_a_node():
    node = make_node(name="keep-me")
    viewer = session_client(staff_user("viewer", "registry.view_node", "registry.change_node"))
    response = viewer.delete(f"/api/v1/nodes/{node.pk}")
    assert response.status_code == 403 and response.json()["code"] == "permission_denied"
    assert Node.objects.filter(pk=node.pk).exists()
    # reading and changing are what this user holds
    assert viewer.get(f"/api/v1/nodes/{node.pk}").status_code == 200
    assert viewer.post(f"/api/v1/nodes/{node.pk}/drain").json()["status"] == Node.Status.DRAINING


def test_a_view_only_staff_session_reads_but_cannot_drain_or_label():
    node = make_node(name="read-only")
    viewer = session_client(staff_user("reader", "registry.view_node"))
    assert viewer.get("/api/v1/nodes").status_code == 200
    assert viewer.post(f"/api/v1/nodes/{node.pk}/drain").status_code == 403
    assert viewer.patch(f"/api/v1/nodes/{node.pk}/labels", {"labels": {"x": "1"}}, format="json").status_code == 403
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY and "x" not in NodeLabel.objects.as_dict(node.pk)


def test_a_staff_session_with_the_permissions_is_admitted_and_its_changes_are_stored():
    node = make_node(name="perm-ok")
    client = session_client(staff_user("ops", *OPERATOR_PERMISSIONS))
    for route, method in sorted(_endpoints(IsOperator) + _endpoints(IsFrontend), key=lambda e: e[1] == "delete"):
        response = _call(client, method, _concrete(route, node.pk))
        assert response.status_code not in (401, 403), (method, route, response.status_code)

    other = make_node(name="perm-ok-2")
    assert client.post(f"/api/v1/nodes/{other.pk}/drain").json()["status"] == Node.Status.DRAINING
    assert client.patch(f"/api/v1/nodes/{other.pk}/labels", {"labels": {"x": "1"}}, format="json").status_code == 200
    assert client.put("/api/v1/models/llama/scheduling", {"min_replicas": 1}, format="json").status_code == 200
    assert NodeLabel.objects.as_dict(other.pk)["x"] == "1"
    assert ModelSchedulingConfig.objects.get(model_name="llama").min_replicas == 1
    assert client.delete(f"/api/v1/nodes/{other.pk}").status_code == 204
    assert not Node.objects.filter(pk=other.pk).exists()


def test_scheduling_and_reconcile_need_the_scheduling_permissions():
    viewer = session_client(staff_user("sched-viewer", "registry.view_modelschedulingconfig"))
    assert viewer.get("/api/v1/scheduling").status_code == 200
    assert viewer.put("/api/v1/models/llama/scheduling", {"min_replicas": 1}, format="json").status_code == 403
    assert viewer.post("/api/v1/reconcile").status_code == 403
    assert not ModelSchedulingConfig.objects.filter(model_name="llama").exists()


def test_the_frontend_api_needs_its_permission_for_a_session():
    without = session_client(staff_user("no-frontend", "registry.view_node"))
    assert without.get("/api/v1/models/llama/load-info").status_code == 403
    assert without.post("/api/v1/models/llama/route", {}, format="json").status_code == 403
    frontend = session_client(staff_user("frontend-user", "registry.use_frontend_api"))
    assert frontend.get("/api/v1/models/llama/load-info").json()["code"] == "no_load_info"
    # the frontend permission gives no operator right
    assert frontend.get("/api/v1/nodes").status_code == 403


def test_superusers_and_api_keys_keep_their_rights(django_user_model):
    node = make_node(name="su-target")
    superuser = django_user_model.objects.create_superuser("root", password="x")
    assert session_client(superuser).post(f"/api/v1/nodes/{node.pk}/drain").status_code == 200

    operator = client_with(make_api_key('operator')[1])
    assert operator.post(f"/api/v1/nodes/{node.pk}/resume").json()["status"] == Node.Status.HEALTHY
