"""Operator API of the reconciler (mounted under /api/v1/ by controlplane/urls.py).

Model names may contain slashes, so ``models/<model>`` uses a converter matching everything
except the registry API's ``models/<model>/scheduling``, ``/load-info`` and ``/route`` routes:
whichever order the two URL modules are included in, those paths never reach this view.
"""

from django.urls import path, register_converter

from .api import EventListView, ModelStatusListView, ModelStatusView, ReconcileView


class ModelNameConverter:
    """Any non-empty path (slashes allowed) not ending in a registry sub-resource."""

    regex = r"[\s\S]+"  # line breaks too: a malformed name is the view's 400, not a 404
    RESERVED_SUFFIXES = ("/scheduling", "/load-info", "/route")

    def to_python(self, value: str) -> str:
        if value.endswith(self.RESERVED_SUFFIXES):
            raise ValueError("a registry sub-resource, not a model name")
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ModelNameConverter, "reconciler_model")

urlpatterns = [
    path("reconcile", ReconcileView.as_view(), name="reconcile"),
    path("models", ModelStatusListView.as_view(), name="model-list"),
    path("models/<reconciler_model:model>", ModelStatusView.as_view(), name="model-detail"),
    path("events", EventListView.as_view(), name="event-list"),
]
