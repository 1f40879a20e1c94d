"""The model page with what the reconciler knows: the registry's scheduling config page
(``registry.admin.scheduling``) plus the model's conditions, its last events and a "Reconcile
now" button (also an action of the list). ``ModelSchedulingConfig``'s admin is registered here,
and only here."""

from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.urls import path, reverse

from registry.admin.scheduling import ModelSchedulingConfigAdmin
from registry.models import ModelSchedulingConfig

from .. import reconcile
from ..models import Event, ModelCondition, ReconcilePass

MODEL_PAGE_EVENTS = 20


@admin.register(ModelSchedulingConfig)
class ReconciledModelSchedulingConfigAdmin(ModelSchedulingConfigAdmin):
    actions = ["reconcile_now"]
    change_form_template = "admin/reconciler/modelschedulingconfig/change_form.html"

    def get_urls(self):
        name = f"{self.opts.app_label}_{self.opts.model_name}_reconcile"
        return [
            path("reconcile/", self.admin_site.admin_view(self.reconcile_view), name=name),
            *super().get_urls(),
        ]

    def reconcile_view(self, request):
        """POST only: one reconcile pass now; its summary becomes a message. Needs the change
        permission of scheduling configs, as the API's ``POST /api/v1/reconcile`` does."""
        if request.method != "POST" or not self.has_change_permission(request):
            return HttpResponseRedirect(reverse("admin:registry_modelschedulingconfig_changelist"))
        self._reconcile(request)
        target = request.POST.get("next") or ""
        if not target.startswith("/") or target.startswith("//"):
            target = reverse("admin:registry_modelschedulingconfig_changelist")
        return HttpResponseRedirect(target)

    def _reconcile(self, request):
        summary = reconcile.reconcile_once()
        level = messages.SUCCESS if summary.outcome == ReconcilePass.Outcome.OK else messages.WARNING
        self.message_user(request, f"reconcile pass: {summary}", level)

    @admin.action(description="Reconcile now (one pass over the whole fleet)", permissions=["change"])
    def reconcile_now(self, request, queryset):
        self._reconcile(request)

    def diagnosis(self, model_name: str) -> dict:
        """The registry's part (load recipe, replicas), then the conditions and last events."""
        return {
            **super().diagnosis(model_name),
            "diag_conditions": list(ModelCondition.objects.filter(model_name=model_name)),
            "diag_events": list(Event.objects.filter(model_name=model_name)[:MODEL_PAGE_EVENTS]),
        }
