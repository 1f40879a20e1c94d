"""API test fixtures: the registration settings on every test, a registered node and its
client, staff sessions. Clients by role and the registration token: ``tests/conftest.py`` and
``tests/clients.py``."""

import pytest
from django.contrib.auth import get_user_model

from tests.clients import OPERATOR_PERMISSIONS, client_with, session_client, staff_user
from tests.factories import make_node


@pytest.fixture(autouse=True)
def _registration(registration_settings):
    return registration_settings


@pytest.fixture
def node(db):
    """A registered healthy node; ``node.token`` is its node token."""
    return make_node(name="gpu-1")


@pytest.fixture
def other_node(db):
    return make_node(name="gpu-2")


@pytest.fixture
def node_client(node):
    return client_with(node.token)


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
    return session_client(get_user_model().objects.create_user("someone", password="x"))
