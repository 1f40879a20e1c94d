"""Replica rows in the admin: read-only, with one action, Unload (the row first, then the
worker's ``StopBackend``, through ``registry.operations.unload_replica``)."""

from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from .. import operations
from ..models import NodeModel
from .base import ReadOnlyAdmin
from .display import age, human_bytes, status_badge


@admin.register(NodeModel)
class NodeModelAdmin(ReadOnlyAdmin):
    list_display = [
        "model_name",
        "node_link",
        "replica_index",
        "state",
        "in_flight",
        "last_used_age",
        "address",
        "probe_failures",
        "reserved",
    ]
    list_filter = ["state", "model_name", "node"]
    list_select_related = ["node"]
    search_fields = ["model_name", "node__name", "address"]
    exclude = ["model_opts_blob"]
    actions = ["unload"]

    @admin.display(description="node", ordering="node__name")
    def node_link(self, obj):
        url = reverse("admin:registry_node_change", args=[obj.node_id])
        return format_html('<a href="{}">{}</a> {}', url, obj.node.name, status_badge(obj.node.status))

    @admin.display(description="last used", ordering="last_used")
    def last_used_age(self, obj):
        return age(obj.last_used)

    @admin.display(description="reserved VRAM", ordering="reserved_vram")
    def reserved(self, obj):
        return human_bytes(obj.reserved_vram)

    @admin.action(description="Unload (remove the replica row, then stop its backend)")
    def unload(self, request, queryset):
        """``operations.unload_replica`` per row: the row first, then ``StopBackend`` on the
        worker, best effort and outside any transaction (the reconciler stops orphan backends
        later if the call fails)."""
        rows = list(queryset.select_related("node"))
        results = [
            (
                row,
                operations.unload_replica(
                    operations.WORKERS,
                    node_id=row.node_id,
                    address=row.node.address,
                    model_name=row.model_name,
                    replica_index=row.replica_index,
                ),
            )
            for row in rows
        ]
        removed = sum(1 for _, result in results if result.removed)
        if removed:
            self.message_user(request, f"removed {removed} replica row(s).", messages.SUCCESS)
        for row, result in results:
            if result.stop_error:
                self.message_user(
                    request,
                    f"row removed, but stopping {row.model_name}#{row.replica_index} on {row.node.name} "
                    f"({row.node.address}) failed: {result.stop_error}. The reconciler stops orphan backends "
                    "on its next pass.",
                    messages.WARNING,
                )
