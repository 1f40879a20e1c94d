"""API test fixtures: credentials of every kind and clients that carry them."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from tests.factories import make_api_key, make_node

REGISTRATION_TOKEN = "test-registration-token-5b1f0c"


@pytest.fixture(autouse=True)
def registration_settings(settings):
    """The web process refuses to serve without a registration token; tests set one."""
    settings.CONTROLPLANE_REGISTRATION_TOKEN = REGISTRATION_TOKEN
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    settings.CONTROLPLANE_AUTO_APPROVE = True
    return settings


@pytest.fixture
def api_client():
    return APIClient()


def _client_with(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def operator_key(db):
    return make_api_key("operator", name="ops")[1]


@pytest.fixture
def frontend_key(db):
    return make_api_key("frontend", name="frontend-1")[1]


@pytest.fixture
def operator_client(operator_key):
    return _client_with(operator_key)


@pytest.fixture
def frontend_client(frontend_key):
    return _client_with(frontend_key)


@pytest.fixture
def registration_client():
    return _client_with(REGISTRATION_TOKEN)


@pytest.fixture
def node(db):
    """A registered healthy node; ``node.token`` is its node token."""
    return make_node(name="gpu-1")


@pytest.fixture
def other_node(db):
    return make_node(name="gpu-2")


@pytest.fixture
def node_client(node):
    return _client_with(node.token)


def staff_user(username: str, *permissions: str):
    """A staff user (not a superuser) holding ``permissions`` ("app_label.codename")."""
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user(username, password="x", is_staff=True)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return get_user_model().objects.get(pk=user.pk)  # fresh: no stale permission cache


def session_client(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


# What an operator given the fleet's model permissions in the admin holds.
OPERATOR_PERMISSIONS = (
    "registry.view_node",
    "registry.change_node",
    "registry.delete_node",
    "registry.view_modelschedulingconfig",
    "registry.add_modelschedulingconfig",
    "registry.change_modelschedulingconfig",
    "registry.delete_modelschedulingconfig",
    "registry.view_nodemodel",
    "registry.use_frontend_api",
)


@pytest.fixture
def staff_client(db):
    """A staff session with the fleet's operator permissions."""
    return session_client(staff_user("admin", *OPERATOR_PERMISSIONS))


@pytest.fixture
def bare_staff_client(db):
    """A staff session without any model permission: the admin shows it nothing."""
    return session_client(staff_user("bare-staff"))


@pytest.fixture
def non_staff_client(db):
    user = get_user_model().objects.create_user("someone", password="x")
    client = APIClient()
    client.force_login(user)
    return client
