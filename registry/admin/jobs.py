"""Load jobs, leases and load failures in the admin: read-only lists for diagnosis."""

from django.contrib import admin

from ..models import Lease, LoadFailure, LoadJob
from .base import ReadOnlyAdmin


@admin.register(LoadJob)
class LoadJobAdmin(ReadOnlyAdmin):
    list_display = [
        "model_name",
        "state",
        "attempts",
        "runner",
        "heartbeat_at",
        "progress",
        "error_code",
        "created_at",
        "finished_at",
    ]
    list_filter = ["state", "error_code", "model_name"]
    search_fields = ["model_name", "runner", "id"]
    date_hierarchy = "created_at"
    exclude = ["opts_blob"]


class LeaseLiveFilter(admin.SimpleListFilter):
    title = "live"
    parameter_name = "live"

    def lookups(self, request, model_admin):
        return [("yes", "live"), ("no", "released")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(released_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(released_at__isnull=False)
        return queryset


@admin.register(Lease)
class LeaseAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "model_name",
        "node_id",
        "replica_index",
        "address",
        "created_at",
        "expires_at",
        "released_at",
    ]
    list_filter = [LeaseLiveFilter, "model_name"]
    search_fields = ["model_name", "address", "id"]
    date_hierarchy = "created_at"


@admin.register(LoadFailure)
class LoadFailureAdmin(ReadOnlyAdmin):
    list_display = ["model_name", "node", "failures", "retry_after", "updated_at", "last_error"]
    list_filter = ["model_name", "node"]
    list_select_related = ["node"]
