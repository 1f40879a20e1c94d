"""Root URL configuration.

``/api/node/`` worker-facing (node tokens), ``/api/v1/`` frontends and operators (API keys),
``/api/schema/`` + ``/api/docs/`` the OpenAPI schema and Swagger UI. Errors on ``/api/`` paths
are problem documents, including Django's own 400/403/404/500 (``handler*`` below).
"""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from controlplane import health, metrics
from registry.api.urls import node_urlpatterns

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/node/", include(node_urlpatterns)),
    path("api/v1/", include("registry.api.routing_urls")),
    path("api/v1/", include("registry.api.urls")),
    path("api/v1/", include("reconciler.urls")),
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
