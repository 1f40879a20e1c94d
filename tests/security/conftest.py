"""Security review fixtures (both lanes): the registration settings on every test (the shared
fixtures and clients: ``tests/conftest.py``, ``tests/clients.py``)."""

import pytest


@pytest.fixture(autouse=True)
def _registration(registration_settings):
    return registration_settings
