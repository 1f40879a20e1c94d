"""URLs of the registry API.

``node_urlpatterns`` -> ``/api/node/`` (worker-facing, LocalAI's paths);
``urlpatterns`` -> ``/api/v1/`` (frontends and operators). Model names may contain slashes and
dots (``org/llama-3.1-8b.gguf``), hence the ``model_name`` converter (``converters.py``): a
later route such as ``models/<model_name:model>`` must come after the
``models/<model_name:model>/<suffix>`` routes.
"""

from django.urls import path

from . import converters  # noqa: F401  (registers <model_name:...>)
from .views import ModelLoadInfoView, NodeRegistrationView, NodeSelfViewSet, NodeViewSet, SchedulingConfigViewSet

node_urlpatterns = [
    path("register", NodeRegistrationView.as_view(), name="node-register"),
    path("<uuid:node_id>/heartbeat", NodeSelfViewSet.as_view({"post": "heartbeat"}), name="node-heartbeat"),
    path("<uuid:node_id>/drain", NodeSelfViewSet.as_view({"post": "drain"}), name="node-drain"),
    path("<uuid:node_id>/resume", NodeSelfViewSet.as_view({"post": "resume"}), name="node-resume"),
    path("<uuid:node_id>/deregister", NodeSelfViewSet.as_view({"post": "deregister"}), name="node-deregister"),
    path("<uuid:node_id>/models", NodeSelfViewSet.as_view({"get": "models"}), name="node-models"),
    # LocalAI's route for the same "go offline" call as /deregister.
    path("<uuid:node_id>", NodeSelfViewSet.as_view({"delete": "deregister"}), name="node-self"),
]

urlpatterns = [
    path("nodes", NodeViewSet.as_view({"get": "list"}), name="node-list"),
    path("nodes/<uuid:node_id>", NodeViewSet.as_view({"get": "retrieve", "delete": "destroy"}), name="node-detail"),
    path("nodes/<uuid:node_id>/approve", NodeViewSet.as_view({"post": "approve"}), name="node-approve"),
    path("nodes/<uuid:node_id>/drain", NodeViewSet.as_view({"post": "drain"}), name="node-admin-drain"),
    path("nodes/<uuid:node_id>/resume", NodeViewSet.as_view({"post": "resume"}), name="node-admin-resume"),
    path(
        "nodes/<uuid:node_id>/labels",
        NodeViewSet.as_view({"put": "replace_labels", "patch": "merge_labels"}),
        name="node-labels",
    ),
    path("nodes/<uuid:node_id>/labels/<path:key>", NodeViewSet.as_view({"delete": "remove_label"}), name="node-label"),
    path(
        "nodes/<uuid:node_id>/max-replicas-per-model",
        NodeViewSet.as_view({"put": "set_max_replicas", "delete": "reset_max_replicas"}),
        name="node-max-replicas",
    ),
    path("scheduling", SchedulingConfigViewSet.as_view({"get": "list"}), name="scheduling-list"),
    path(
        "models/<model_name:model>/scheduling",
        SchedulingConfigViewSet.as_view({"get": "retrieve", "put": "update", "delete": "destroy"}),
        name="model-scheduling",
    ),
    path("models/<model_name:model>/load-info", ModelLoadInfoView.as_view(), name="model-load-info"),
]
