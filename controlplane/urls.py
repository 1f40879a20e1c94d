"""Root URL configuration: every public path of the API is routed here.

``/api/node/`` worker-facing (node tokens), ``/api/v1/`` frontends and operators (API keys),
``/api/schema/`` + ``/api/docs/`` the OpenAPI schema and Swagger UI. Errors on ``/api/`` paths
are problem documents, including Django's own 400/403/404/500 (``handler*`` below).

The registry's viewsets and the reconciler's share ``/api/v1/models/{model}...``, so they are
joined here, in the one module above both apps. Model names may contain slashes and dots
(``org/llama-3.1-8b.gguf``): ``ApiRouter`` tries every sub-resource route
(``models/{model}/route``, ``/scheduling``, ``/load-info``) before the status route
``models/{model}``, so a model whose name ends in one of those suffixes has no status URL
(``registry/api/routers.py``).
"""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from controlplane import health, metrics
from reconciler.api import EventViewSet, ModelStatusViewSet, ReconcileViewSet
from registry.api.revisions import ModelRevisionViewSet
from registry.api.routers import ApiRouter
from registry.api.routing import LeaseViewSet, LoadJobViewSet, ReplicaViewSet, RouteViewSet
from registry.api.views import (
    ModelLoadInfoViewSet,
    ModelSchedulingViewSet,
    NodeRegistrationViewSet,
    NodeSelfViewSet,
    NodeViewSet,
    SchedulingConfigViewSet,
)

# /api/node/: LocalAI's worker paths. DELETE /api/node/{id} is LocalAI's route for /deregister.
node_api = ApiRouter()
node_api.register("register", NodeRegistrationViewSet, "node-register", list_name="node-register")
node_api.register("", NodeSelfViewSet, "node", detail_name="node-self")

# /api/v1/
v1 = ApiRouter()
v1.register("nodes", NodeViewSet, "node")
v1.register("scheduling", SchedulingConfigViewSet, "scheduling")
v1.register("models", RouteViewSet, "model")
v1.register("models", ModelSchedulingViewSet, "model")
v1.register("models", ModelLoadInfoViewSet, "model")
v1.register("models", ModelStatusViewSet, "model")
v1.register("models", ModelRevisionViewSet, "model")
v1.register("leases", LeaseViewSet, "lease")
v1.register("load-jobs", LoadJobViewSet, "load-job", detail_name="load-job")
v1.register("replicas", ReplicaViewSet, "replica", list_name="replica-report")
v1.register("reconcile", ReconcileViewSet, "reconcile", list_name="reconcile")
v1.register("events", EventViewSet, "event")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/node/", include(node_api.urls)),
    path("api/v1/", include(v1.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # Operations (docs/operations.md): plain Django views, not part of the OpenAPI schema.
    path("livez", health.livez, name="livez"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]

handler400 = "core.problems.handler400"
handler403 = "core.problems.handler403"
handler404 = "core.problems.handler404"
handler500 = "core.problems.handler500"
