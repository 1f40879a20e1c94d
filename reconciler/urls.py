"""Operator API of the reconciler (mounted under /api/v1/ by controlplane/urls.py)."""

urlpatterns = []
