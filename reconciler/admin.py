"""Read-only admin pages for what the reconciler records (nothing here changes fleet state)."""

from django.contrib import admin

from .models import Event, ModelCondition, ReconcilePass


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "kind", "model_name", "node_name", "message"]
    list_filter = ["kind"]
    search_fields = ["model_name", "node_name", "message"]
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

    @admin.display(description="summary")
    def short_summary(self, obj):
        summary = obj.summary or {}
        if summary.get("reason"):
            return summary["reason"]
        parts = [f"{n} {name}" for name, n in (summary.get("actions") or {}).items()]
        parts += [f"skipped {n} {name}" for name, n in (summary.get("skipped") or {}).items()]
        return ", ".join(parts) or "nothing to do"
