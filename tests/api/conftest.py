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


@pytest.fixture
def staff_client(db):
    user = get_user_model().objects.create_user("admin", password="x", is_staff=True)
    client = APIClient()
    client.force_login(user)
    return client


@pytest.fixture
def non_staff_client(db):
    user = get_user_model().objects.create_user("someone", password="x")
    client = APIClient()
    client.force_login(user)
    return client
