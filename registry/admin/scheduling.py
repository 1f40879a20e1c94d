"""Models in the admin: the scheduling config form (saved with ``ModelSchedulingConfig.objects
.upsert``, validated like the API) with the model's replicas and load recipe under it, and the
load info pages.

``ModelSchedulingConfigAdmin`` is not registered here: ``reconciler/admin/scheduling.py``
registers a subclass that adds what the reconciler knows (conditions, events, "Reconcile now"),
which this app may not import. The page and its URLs (``admin:registry_modelschedulingconfig_*``)
are the registry model's, as for any other model of this app.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from proto.codec import InvalidModelOptions, options_to_json

from .. import floor_schedule
from ..loading import explain_next_replica
from ..managers import validate_scheduling
from ..models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, NodeModel
from .base import ReadOnlyAdmin


class SchedulingForm(forms.ModelForm):
    """Validated by ``validate_scheduling``, the same function the API's upsert runs."""

    node_selector = forms.JSONField(required=False, help_text='labels every node must carry, e.g. {"gpu": "a100"}')
    floor_schedule = forms.JSONField(
        required=False,
        help_text='scheduled floors: windows with a higher min_replicas, e.g. [{"days": "mon-fri", "start": '
        '"08:00", "end": "18:00", "min_replicas": 3, "timezone": "Europe/Paris"}] (see docs/autoscaling.md)',
    )
    disk_bytes = forms.IntegerField(
        required=False,
        min_value=0,
        help_text="size of the model on disk in bytes; nodes reporting less free disk are skipped (empty/0 = unknown)",
    )

    class Meta:
        model = ModelSchedulingConfig
        fields = [
            "model_name",
            "min_replicas",
            "max_replicas",
            "node_selector",
            "placement",
            "target_in_flight_per_replica",
            "upscale_delay_s",
            "downscale_delay_s",
            "floor_schedule",
            "disk_bytes",
            "spread_by",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Left empty, a delay keeps its default (``upsert``).
        for name in ("upscale_delay_s", "downscale_delay_s"):
            self.fields[name].required = False

    def clean_node_selector(self):
        return self.cleaned_data.get("node_selector") or {}

    def clean_floor_schedule(self):
        return self.cleaned_data.get("floor_schedule") or []

    def _post_clean(self):
        # The model's own constraint check would duplicate (and word differently) the verb's.
        data = self.cleaned_data
        if {"min_replicas", "max_replicas", "node_selector"} <= set(data):
            try:
                validate_scheduling(data["min_replicas"], data["max_replicas"], data["node_selector"])
            except ValidationError as exc:
                for field, errors in exc.message_dict.items():
                    self.add_error(field if field in self.fields else None, errors)
        if "floor_schedule" in data and isinstance(data.get("max_replicas"), int):
            try:
                floor_schedule.parse(data["floor_schedule"], max_replicas=data["max_replicas"])
            except floor_schedule.ScheduleError as exc:
                self.add_error("floor_schedule", exc.args[0])
        if self.instance.pk is None and data.get("model_name"):
            if ModelSchedulingConfig.objects.filter(model_name=data["model_name"]).exists():
                self.add_error("model_name", "this model already has a scheduling config")


class ModelSchedulingConfigAdmin(admin.ModelAdmin):
    """The model page as the registry knows it; registered (with the reconciler's additions) by
    ``reconciler/admin/scheduling.py``."""

    form = SchedulingForm
    list_display = [
        "model_name",
        "min_replicas",
        "max_replicas",
        "selector",
        "placement",
        "unsatisfiable_until",
        "unsatisfiable_ticks",
        "updated_at",
    ]
    list_filter = ["placement"]
    search_fields = ["model_name"]
    readonly_fields = [
        "unsatisfiable_until",
        "unsatisfiable_ticks",
        "floor_in_force",
        "desired_replicas",
        "desired_since",
        "load_avg",
        "load_sampled_at",
        "waiting_at_zero",
        "created_at",
        "updated_at",
    ]
    change_form_template = "admin/registry/modelschedulingconfig/change_form.html"

    def get_readonly_fields(self, request, obj=None):
        # The model name is the key of the upsert: fixed once the row exists.
        return [*self.readonly_fields, "model_name"] if obj else self.readonly_fields

    def get_changeform_initial_data(self, request):
        return {"model_name": request.GET.get("model_name", "")}

    @admin.display(description="floor in force now")
    def floor_in_force(self, obj):
        """``min_replicas`` as the reconciler applies it now, and the schedule's windows."""
        if obj is None or obj.pk is None:
            return "-"
        try:
            windows = floor_schedule.parse(obj.floor_schedule or [])
        except floor_schedule.ScheduleError as exc:
            return f"{obj.min_replicas} (schedule ignored: {exc.args[0]})"
        floor = floor_schedule.effective_floor(obj.min_replicas, windows, timezone.now(), max_replicas=obj.max_replicas)
        if not windows:
            return str(floor)
        listed = "; ".join(floor_schedule.describe(window) for window in windows)
        return f"{floor} (min_replicas {obj.min_replicas}; windows: {listed})"

    @admin.display(description="node selector")
    def selector(self, obj):
        return ", ".join(f"{k}={v}" for k, v in (obj.node_selector or {}).items()) or "-"

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        saved = ModelSchedulingConfig.objects.upsert(
            data.get("model_name") or obj.model_name,
            min_replicas=data["min_replicas"],
            max_replicas=data["max_replicas"],
            node_selector=data["node_selector"],
            placement=data["placement"],
            disk_bytes=data.get("disk_bytes") or 0,
            spread_by=data.get("spread_by") or "",
            target_in_flight_per_replica=data.get("target_in_flight_per_replica"),
            upscale_delay_s=data.get("upscale_delay_s"),
            downscale_delay_s=data.get("downscale_delay_s"),
            floor_schedule=data.get("floor_schedule") or [],
            created_by=request.user.get_username(),
        )
        obj.pk = saved.pk
        obj.refresh_from_db()

    def delete_model(self, request, obj):
        ModelSchedulingConfig.objects.remove(obj.model_name)

    def delete_queryset(self, request, queryset):
        for name in list(queryset.values_list("model_name", flat=True)):
            ModelSchedulingConfig.objects.remove(name)

    def get_urls(self):
        name = f"{self.opts.app_label}_{self.opts.model_name}_rollback"
        return [
            path("<path:object_id>/rollback/", self.admin_site.admin_view(self.rollback_view), name=name),
            *super().get_urls(),
        ]

    def rollback_view(self, request, object_id):
        """POST only: ``ModelRevision.objects.rollback`` to the posted ``revision`` (a new
        revision with its values; the reconciler rolls the replicas), as the API's
        ``POST /api/v1/models/{model}/rollback``. Needs the change permission."""
        config = get_object_or_404(ModelSchedulingConfig, pk=object_id)
        target = reverse("admin:registry_modelschedulingconfig_change", args=[config.pk])
        if request.method != "POST" or not self.has_change_permission(request, config):
            return HttpResponseRedirect(target)
        try:
            number = int(request.POST.get("revision", ""))
            revision = ModelRevision.objects.rollback(
                config.model_name, number, created_by=request.user.get_username()
            )
        except (ValueError, ModelRevision.DoesNotExist) as exc:
            self.message_user(request, f"rollback refused: {exc or 'no such revision'}", messages.ERROR)
        else:
            self.message_user(
                request,
                f"rolled back to revision {number} as revision {revision.number}; "
                "the reconciler replaces the replicas one at a time",
                messages.SUCCESS,
            )
        return HttpResponseRedirect(target)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        config = get_object_or_404(ModelSchedulingConfig, pk=object_id)
        extra_context = {**(extra_context or {}), **self.diagnosis(config.model_name)}
        return super().change_view(request, object_id, form_url, extra_context)

    def diagnosis(self, model_name: str) -> dict:
        """What the page shows under the form: the load recipe and the replica rows."""
        try:
            info = ModelLoadInfo.objects.for_model(model_name)
        except ModelLoadInfo.DoesNotExist:
            info = None
        options, options_error = {}, ""
        if info is not None:
            try:
                options = options_to_json(info.model_opts_blob)
            except InvalidModelOptions as exc:
                options_error = str(exc)
        rows = list(
            NodeModel.objects.for_model(model_name).select_related("node").order_by("node__name", "replica_index")
        )
        ready = sum(1 for row in rows if row.state == NodeModel.State.LOADED and row.node.is_schedulable)
        return {
            "diag_model_name": model_name,
            "diag_load_info": info,
            "diag_options": [(key, value) for key, value in _flat(options).items()],
            "diag_options_error": options_error,
            "diag_replicas": rows,
            "diag_ready": ready,
            "diag_placement": explain_next_replica(model_name),
            "diag_revisions": list(ModelRevision.objects.filter(model_name=model_name).order_by("-number")[:10]),
        }


@admin.register(ModelLoadInfo)
class ModelLoadInfoAdmin(ReadOnlyAdmin):
    list_display = ["model_name", "backend_type", "options_summary", "updated_at"]
    search_fields = ["model_name", "backend_type"]
    list_filter = ["backend_type"]
    fields = ["model_name", "backend_type", "source", "options", "updated_at"]
    readonly_fields = fields

    @admin.display(description="source")
    def source(self, obj):
        return ModelLoadInfo.Source(obj.source).label

    @admin.display(description="model options (decoded)")
    def options(self, obj):
        try:
            decoded = options_to_json(bytes(obj.model_opts_blob or b""))
        except InvalidModelOptions as exc:
            return f"undecodable blob: {exc}"
        if not decoded:
            return "(all defaults)"
        return format_html(
            "<table>{}</table>",
            format_html_join("", "<tr><th>{}</th><td><code>{}</code></td></tr>", sorted(_flat(decoded).items())),
        )

    @admin.display(description="options")
    def options_summary(self, obj):
        try:
            decoded = options_to_json(bytes(obj.model_opts_blob or b""))
        except InvalidModelOptions:
            return "undecodable"
        text = ", ".join(f"{k}={v}" for k, v in sorted(_flat(decoded).items()))
        return text[:120] + ("..." if len(text) > 120 else "")


def _flat(decoded: dict) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in decoded.items()}
