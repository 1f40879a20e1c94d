"""URLs of the router's frontend API, mounted under ``/api/v1/``.

Model names may contain slashes (``org/llama-3.1-8b.gguf``): ``models/<model_name:model>/route``
must be included before any catch-all ``models/<model_name:model>`` route.
"""

from django.urls import path

from . import converters  # noqa: F401  (registers <model_name:...>)
from .routing import LeaseReleaseView, LeaseRenewView, LoadJobView, ReplicaReportView, RouteView

urlpatterns = [
    path("models/<model_name:model>/route", RouteView.as_view(), name="model-route"),
    path("leases/<uuid:lease_id>/release", LeaseReleaseView.as_view(), name="lease-release"),
    path("leases/<uuid:lease_id>/renew", LeaseRenewView.as_view(), name="lease-renew"),
    path("load-jobs/<uuid:job_id>", LoadJobView.as_view(), name="load-job"),
    path("replicas", ReplicaReportView.as_view(), name="replica-report"),
]
