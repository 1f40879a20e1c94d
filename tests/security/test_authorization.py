"""Who may call what, checked by enumeration so new endpoints are covered automatically.

* every ``/api/node/{id}/...`` verb refuses another node's token (403);
* every endpoint whose view requires ``IsOperator`` (found by walking the URL conf) refuses a
  frontend key (403) and admits an operator key (not 401/403);
* the admin refuses authenticated non-staff users.
"""

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.urls import URLPattern, URLResolver, get_resolver

from core.auth import IsOperator
from registry.api.auth import IsNodeSelf
from tests.clients import client_with
from tests.factories import make_api_key, make_node

pytestmark = pytest.mark.django_db

HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _walk(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def _concrete(route: str, node_id: uuid.UUID) -> str:
    values = {"uuid:node_id": str(node_id), "uuid": str(uuid.uuid4())}
    path = route
    while "<" in path:
        start, end = path.index("<"), path.index(">")
        spec = path[start + 1 : end]
        converter = spec.split(":")[0] if ":" in spec else "str"
        replacement = values.get(spec) or values.get(converter) or ("m" if converter != "int" else "1")
        path = path[:start] + replacement + path[end + 1 :]
    return "/" + path.lstrip("^").rstrip("$")


def _permission_classes(view, actions, method):
    """The permission classes of one action: a viewset may set some per action
    (``action_permission_classes``, e.g. listing replicas is an operator's, reporting one a
    frontend's)."""
    per_action = getattr(view, "action_permission_classes", {})
    action = (actions or {}).get(method)
    return per_action.get(action, getattr(view, "permission_classes", ()))


def _endpoints(permission):
    """(route, method) of every view whose permission classes include ``permission``."""
    found = []
    for route, callback in _walk(get_resolver().url_patterns):
        view = getattr(callback, "cls", None)
        if view is None:
            continue
        actions = getattr(callback, "actions", None)
        methods = sorted(actions) if actions else [m for m in HTTP_METHODS if hasattr(view, m)]
        # DRF adds ``head`` to a viewset's actions after its first GET; HEAD mirrors GET, which
        # is already in the list, and its empty body would not parse as a problem.
        methods = [m for m in methods if m != "head"]
        found += [(route, method) for method in methods if permission in _permission_classes(view, actions, method)]
    return found


def _call(client, method, path):
    body = {} if method in ("post", "put", "patch") else None
    return getattr(client, method)(path, body, format="json") if body is not None else getattr(client, method)(path)


def test_the_enumeration_finds_the_known_operator_and_node_endpoints():
    operator = {(route, method) for route, method in _endpoints(IsOperator)}
    assert ("api/v1/nodes", "get") in operator
    assert ("api/v1/reconcile", "post") in operator
    assert any(route.endswith("/scheduling") and method == "put" for route, method in operator)
    node = {route.rsplit("/", 1)[-1] for route, _ in _endpoints(IsNodeSelf)}
    assert node >= {"heartbeat", "drain", "resume", "deregister", "models"}


def test_a_node_token_cannot_act_on_another_node():
    mine, other = make_node(name="sec-mine"), make_node(name="sec-other")
    client = client_with(mine.token)
    endpoints = _endpoints(IsNodeSelf)
    assert endpoints
    for route, method in endpoints:
        path = _concrete(route, other.pk)
        response = _call(client, method, path)
        assert response.status_code == 403, (method, path, response.status_code, response.content[:300])
        # and the same verb on its own node is admitted
        own = _call(client, method, _concrete(route, mine.pk))
        assert own.status_code not in (401, 403), (method, route, own.status_code)
    other.refresh_from_db()
    assert other.status == "healthy"  # nothing the foreign token did stuck


def test_a_frontend_key_cannot_use_any_operator_endpoint():
    node = make_node(name="sec-target")
    frontend = client_with(make_api_key("frontend")[1])
    operator = client_with(make_api_key("operator")[1])
    endpoints = _endpoints(IsOperator)
    assert len(endpoints) >= 10, endpoints
    for route, method in endpoints:
        path = _concrete(route, node.pk)
        refused = _call(frontend, method, path)
        assert refused.status_code == 403, (method, path, refused.status_code, refused.content[:300])
        assert refused.json()["code"] == "permission_denied"
    # an operator is admitted everywhere (the non-destructive calls; DELETE of the node last)
    for route, method in sorted(endpoints, key=lambda e: e[1] == "delete"):
        admitted = _call(operator, method, _concrete(route, node.pk))
        assert admitted.status_code not in (401, 403), (method, route, admitted.status_code)


def test_no_credential_and_a_node_token_are_refused_on_operator_and_frontend_endpoints():
    node = make_node(name="sec-node")
    for route, method in _endpoints(IsOperator):
        path = _concrete(route, node.pk)
        assert _call(client_with(), method, path).status_code in (401, 403)
        assert _call(client_with(node.token), method, path).status_code in (401, 403)


def test_the_admin_refuses_non_staff_users(client):
    user = get_user_model().objects.create_user("plain", password="x-" + uuid.uuid4().hex)
    client.force_login(user)
    for path in ("/admin/", "/admin/registry/node/", "/admin/controlplane/apikey/"):
        response = client.get(path)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], (path, response.status_code)
    # a non-staff session is not an operator either
    assert client.get("/api/v1/nodes").status_code == 403
    # nor is a staff session without the permission (test_operator_permissions.py)
    staff = get_user_model().objects.create_user("staff", password="x-" + uuid.uuid4().hex, is_staff=True)
    client.force_login(staff)
    assert client.get("/api/v1/nodes").status_code == 403
