"""The model page is registered once, by the reconciler, on top of the registry's page (the
registry's admin imports nothing from the reconciler and no module grows too long:
tests/test_layers.py checks both for every app)."""

from django.contrib import admin

from reconciler.admin.scheduling import ReconciledModelSchedulingConfigAdmin
from registry.admin.scheduling import ModelSchedulingConfigAdmin
from registry.models import ModelSchedulingConfig


def test_the_model_page_is_registered_once_with_the_reconcilers_features():
    registered = admin.site._registry[ModelSchedulingConfig]
    assert type(registered) is ReconciledModelSchedulingConfigAdmin
    assert isinstance(registered, ModelSchedulingConfigAdmin)
