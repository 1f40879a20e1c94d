"""Security review fixtures (both lanes): a registration token and credentials of every kind."""

import pytest

REGISTRATION_TOKEN = "sec-registration-token-" + "7f3a9c1e5b2d4806"


@pytest.fixture(autouse=True)
def registration_settings(settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = REGISTRATION_TOKEN
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    settings.CONTROLPLANE_AUTO_APPROVE = True
    return settings
