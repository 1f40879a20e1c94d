"""URLs of the router's frontend API, mounted under ``/api/v1/``.

Model names may contain slashes (``org/llama-3.1-8b.gguf``): ``models/<path:model>/route``
must be included before any catch-all ``models/<path:model>`` route.
"""

from django.urls import path

from .routing import LeaseReleaseView, LeaseRenewView, LoadJobView, ReplicaReportView, RouteView

urlpatterns = [
    path("models/<path:model>/route", RouteView.as_view(), name="model-route"),
    path("leases/<uuid:lease_id>/release", LeaseReleaseView.as_view(), name="lease-release"),
    path("leases/<uuid:lease_id>/renew", LeaseRenewView.as_view(), name="lease-renew"),
    path("load-jobs/<uuid:job_id>", LoadJobView.as_view(), name="load-job"),
    path("replicas", ReplicaReportView.as_view(), name="replica-report"),
]
