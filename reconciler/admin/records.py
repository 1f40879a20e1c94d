"""Read-only admin pages for what the reconciler records (nothing here changes fleet state)."""

from django.contrib import admin
from django.utils import timezone

from registry.admin.base import ReadOnlyAdmin

from ..models import Event, ModelCondition, ReconcilePass


def summary_text(summary: dict | None) -> str:
    """One line for a stored ``ReconcilePass.summary``."""
    summary = summary or {}
    if summary.get("reason"):
        return f"{summary.get('outcome', '')}: {summary['reason']}"
    parts = [f"{n} {name}" for name, n in (summary.get("actions") or {}).items()]
    parts += [f"skipped {n} {name}" for name, n in (summary.get("skipped") or {}).items()]
    return ", ".join(parts) or "nothing to do"


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "kind", "model_name", "node_name", "message"]
    list_filter = ["kind", "model_name", "node_name"]
    search_fields = ["model_name", "node_name", "message", "node_id"]
    date_hierarchy = "created_at"


@admin.register(ModelCondition)
class ModelConditionAdmin(ReadOnlyAdmin):
    list_display = ["model_name", "type", "status", "reason", "since", "message"]
    list_filter = ["type", "status", "reason"]
    search_fields = ["model_name"]


@admin.register(ReconcilePass)
class ReconcilePassAdmin(ReadOnlyAdmin):
    list_display = ["started_at", "outcome", "duration", "short_summary", "holder_host", "holder_pid"]
    list_filter = ["outcome"]
    date_hierarchy = "started_at"
    change_list_template = "admin/reconciler/reconcilepass/change_list.html"

    def changelist_view(self, request, extra_context=None):
        # The timeline of the last hour above the list (one query, bounded by the window).
        from .history import pass_charts

        return super().changelist_view(request, {**(extra_context or {}), **pass_charts(now=timezone.now())})

    @admin.display(description="summary")
    def short_summary(self, obj):
        return summary_text(obj.summary)
