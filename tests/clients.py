"""API clients and the assertions about their answers, shared by every test package.

Where the suite's shared test code lives:

* ``tests/conftest.py``: suite-wide fixtures (database lane, fixed clock, thread connections,
  the registration settings, API clients by role);
* ``tests/clients.py`` (this module): API clients by credential, bearer headers, staff
  sessions, the RFC 9457 problem assertion;
* ``tests/factories.py``: rows, reached through the registry verbs;
* ``tests/concurrency.py``: real threads, and locks or transactions held in another thread;
* ``tests/processes.py``: free ports and child processes (``manage.py``, workers).

A package's own ``conftest.py``/helpers hold only what that package uses (fake workers of
``tests/router``, the e2e harness, ...).
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from tests.factories import make_api_key

# The fleet's registration token in tests (``registration_settings`` sets it).
REGISTRATION_TOKEN = "test-registration-token-5b1f0c"

PROBLEM = "application/problem+json"

# What an operator given the fleet's model permissions in the admin holds.
OPERATOR_PERMISSIONS = (
    "registry.view_node",
    "registry.change_node",
    "registry.delete_node",
    "registry.view_modelschedulingconfig",
    "registry.add_modelschedulingconfig",
    "registry.change_modelschedulingconfig",
    "registry.delete_modelschedulingconfig",
    "registry.change_modelloadinfo",
    "registry.view_nodemodel",
    "registry.use_frontend_api",
)


def bearer(token: str) -> dict:
    """The ``Authorization`` header of ``token``, as keyword arguments of a test client call."""
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def client_with(token: str | None = None, *, raise_request_exception: bool = True, **headers) -> APIClient:
    """An API client presenting ``token`` (none: anonymous) and ``headers`` on every call."""
    client = APIClient(raise_request_exception=raise_request_exception)
    if token:
        client.credentials(**bearer(token), **headers)
    return client


def client_for_role(role: str) -> APIClient:
    """An API client with a fresh API key of ``role`` (``operator``, ``frontend``)."""
    return client_with(make_api_key(role)[1])


def staff_user(username: str, *permissions: str):
    """A staff user (not a superuser) holding ``permissions`` ("app_label.codename")."""
    user = get_user_model().objects.create_user(username, password="x", is_staff=True)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return get_user_model().objects.get(pk=user.pk)  # fresh: no stale permission cache


def session_client(user) -> APIClient:
    """An API client logged in as ``user`` (a session, as the admin's pages use)."""
    client = APIClient()
    client.force_login(user)
    return client


def assert_problem(response, status: int, code: str | None = None) -> dict:
    """The response is an RFC 9457 problem of ``status`` (and ``code``); returns its body."""
    assert response.status_code == status, (response.status_code, getattr(response, "content", b"")[:500])
    assert response["Content-Type"].startswith(PROBLEM), response["Content-Type"]
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}, body
    assert body["status"] == status
    assert body["type"] == f"urn:controlplane:problem:{body['code']}"
    if code is not None:
        assert body["code"] == code, body
    return body
