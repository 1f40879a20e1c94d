"""The fleet's admin, built for diagnosis: every page reads annotated querysets (no query per
row) and every button calls a registry verb; nothing here writes a status, a slot count or a
replica row itself.

The fleet dashboard (``/admin/fleet/``) is registered on the default admin site by wrapping its
``get_urls`` (see the bottom of this module), so neither ``settings.py`` nor ``urls.py`` needs a
custom ``AdminSite``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from proto.codec import InvalidModelOptions, options_to_json
from reconciler import reconcile
from reconciler.models import Event, ModelCondition, ReconcilePass
from reconciler.snapshot import take_snapshot

from . import operations
from .labels import auto_labels, validate_labels
from .managers import max_labels_per_node, validate_scheduling
from .models import (
    Lease,
    LoadFailure,
    LoadJob,
    ModelLoadInfo,
    ModelSchedulingConfig,
    Node,
    NodeLabel,
    NodeModel,
)

# Derived at registration (registry.labels.auto_labels): shown on the node page, not in the list.
AUTO_LABEL_KEYS = frozenset(auto_labels(name="-", gpu_vendor="-", total_vram=1, max_replicas_per_model=1))

STATUS_COLOURS = {
    Node.Status.HEALTHY: "#2e7d32",
    Node.Status.PENDING: "#6d4c41",
    Node.Status.DRAINING: "#ef6c00",
    Node.Status.UNHEALTHY: "#c62828",
    Node.Status.OFFLINE: "#616161",
}


# --------------------------------------------------------------------------------------------
# Formatting helpers (pure, reused by the dashboard)
# --------------------------------------------------------------------------------------------


def human_bytes(value: int | None) -> str:
    """``25769803776`` -> ``"24.0 GiB"``; binary units, one decimal above bytes."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"  # pragma: no cover


def age(moment: datetime | None, *, now: datetime | None = None) -> str:
    """``"12 s ago"``, ``"3 min ago"``, ``"2 h ago"``, ``"4 d ago"``; ``"never"`` for None."""
    if moment is None:
        return "never"
    seconds = int(((now or timezone.now()) - moment).total_seconds())
    if seconds < 0:
        return "in the future"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def status_badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#616161")
    return format_html(
        '<span class="fleet-badge" style="background:{};color:#fff;padding:1px 7px;border-radius:8px;'
        'font-size:11px;white-space:nowrap">{}</span>',
        colour,
        status,
    )


def replica_cell(rows) -> str:
    """Text of one dashboard cell: ``"loaded x2 (1 in flight), loading x1"``."""
    by_state = defaultdict(list)
    for row in rows:
        by_state[row.state].append(row)
    parts = []
    for state in (NodeModel.State.LOADED, NodeModel.State.LOADING):
        group = by_state.get(state)
        if not group:
            continue
        text = f"{state} x{len(group)}"
        in_flight = sum(row.in_flight for row in group)
        if in_flight:
            text += f" ({in_flight} in flight)"
        parts.append(text)
    return ", ".join(parts)


def summary_text(summary: dict | None) -> str:
    """One line for a stored ``ReconcilePass.summary``."""
    summary = summary or {}
    if summary.get("reason"):
        return f"{summary.get('outcome', '')}: {summary['reason']}"
    parts = [f"{n} {name}" for name, n in (summary.get("actions") or {}).items()]
    parts += [f"skipped {n} {name}" for name, n in (summary.get("skipped") or {}).items()]
    return ", ".join(parts) or "nothing to do"


NO_WORKER_SERVICE = "does not answer the worker gRPC service (LocalAI workers take backend commands over NATS)"


def worker_service_summary(node) -> tuple[bool, str]:
    """``(placed on, why not)`` from ``node.worker_api`` (and the node type)."""
    WorkerApi = Node.WorkerApi
    if node.node_type != Node.NodeType.BACKEND:
        return False, "agent node"
    if node.worker_api == WorkerApi.AVAILABLE:
        return True, ""
    if node.worker_api == WorkerApi.MISSING:
        return False, NO_WORKER_SERVICE
    return False, "worker gRPC service not checked yet"


def worker_service_text(node) -> str:
    """Whether new replicas go to ``node``, and why not, with the reason of the last check."""
    placed, why = worker_service_summary(node)
    if placed:
        return "answers the worker gRPC service: placed on"
    detail = f" ({node.worker_api_detail})" if node.worker_api_detail else ""
    return f"not placed on: {why}{detail}"


class WorkerServiceFilter(admin.ChoicesFieldListFilter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.title = "worker service"


class CredentialFilter(admin.ChoicesFieldListFilter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.title = "credential"


def _report(modeladmin, request, done: int, total: int, verb: str) -> None:
    """One message per action: how many rows the verb changed, and how many it refused."""
    if done:
        modeladmin.message_user(request, f"{verb}: {done} node(s).", messages.SUCCESS)
    if total - done:
        modeladmin.message_user(
            request,
            f"{verb}: {total - done} node(s) unchanged (not in a status this verb applies to).",
            messages.WARNING,
        )


def _operator_drain(node_id) -> bool:
    return Node.objects.mark_draining(node_id, by=Node.DrainedBy.OPERATOR)


def _operator_resume(node_id) -> bool:
    return Node.objects.resume(node_id, by=Node.DrainedBy.OPERATOR)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by verbs and processes: viewable, never edited or added by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class LabelKeyFilter(admin.SimpleListFilter):
    title = "label key"
    parameter_name = "label_key"

    def lookups(self, request, model_admin):
        keys = NodeLabel.objects.order_by("key").values_list("key", flat=True).distinct()
        return [(key, key) for key in keys]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(labels__key=self.value()).distinct()
        return queryset


class KnownRowChoiceField(forms.ModelChoiceField):
    """The hidden primary-key field of an inline row, validated against the rows the formset
    already read (Django's own field runs one query per row on every save)."""

    def __init__(self, rows: dict, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = rows

    def to_python(self, value):
        if value in self.empty_values:
            return None
        if isinstance(value, self.queryset.model):
            return value
        row = self.rows.get(str(value))
        if row is None:
            raise ValidationError(self.error_messages["invalid_choice"], code="invalid_choice", params={"value": value})
        return row


class LabelFormSet(BaseInlineFormSet):
    """Labels are edited as a whole and written with ``NodeLabel.objects.replace`` (see
    ``NodeAdmin.save_formset``), so cooldowns are cleared like the API's label verbs do. At
    most ``CONTROLPLANE_MAX_LABELS_PER_NODE`` rows, and a fixed number of queries to validate
    them, so the page stays small enough to render and to save."""

    def _rows_by_pk(self) -> dict:
        if not hasattr(self, "_known_rows"):
            self._known_rows = {str(row.pk): row for row in self.get_queryset()}
        return self._known_rows

    def add_fields(self, form, index):
        super().add_fields(form, index)
        name = self.model._meta.pk.name
        field = form.fields.get(name)
        if isinstance(field, forms.ModelChoiceField):
            form.fields[name] = KnownRowChoiceField(
                self._rows_by_pk(), field.queryset, initial=field.initial, required=False, widget=field.widget
            )

    def clean(self):
        super().clean()
        labels = {}
        for form in self.forms:
            data = getattr(form, "cleaned_data", None) or {}
            if not data or data.get("DELETE") or not data.get("key"):
                continue
            if data["key"] in labels:
                raise ValidationError(f"label {data['key']!r} appears twice")
            labels[data["key"]] = data.get("value") or ""
        if len(labels) > max_labels_per_node():
            raise ValidationError(f"a node carries at most {max_labels_per_node()} labels")
        try:
            self.labels = validate_labels(labels)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc


class NodeLabelInline(admin.TabularInline):
    model = NodeLabel
    formset = LabelFormSet
    extra = 1
    fields = ["key", "value", "source"]
    readonly_fields = ["source"]

    def get_max_num(self, request, obj=None, **kwargs):
        return max_labels_per_node()


class MaxReplicasForm(forms.Form):
    max_replicas_per_model = forms.IntegerField(min_value=1, label="Max replicas per model")


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "status_badge",
        "node_type",
        "address",
        "heartbeat_age",
        "placement",
        "auth",
        "vram_with_reserved",
        "slots",
        "label_list",
        "replica_count",
        "in_flight_sum",
    ]
    list_filter = [
        "status",
        "node_type",
        ("worker_api", WorkerServiceFilter),
        ("auth_mode", CredentialFilter),
        LabelKeyFilter,
    ]
    search_fields = ["name", "address", "id"]
    # Replicas are a read-only table (``replica_table``), not an inline formset: a formset
    # would add form fields and a validation query per row to every save of the page.
    inlines = [NodeLabelInline]
    actions = [
        "approve",
        "drain",
        "resume",
        "mark_offline",
        "set_max_replicas",
        "reset_max_replicas",
    ]
    readonly_fields = [
        "id",
        "name",
        "status_badge",
        "drained_by",
        "node_type",
        "address",
        "http_address",
        "heartbeat_age",
        "last_heartbeat",
        "vram",
        "reserved",
        "ram",
        "disk",
        "gpu_vendor",
        "slots",
        "reported_max_replicas_per_model",
        "auth",
        "worker_service",
        "worker_api_checked_at",
        "created_at",
        "updated_at",
        "replica_table",
    ]
    fieldsets = [
        (None, {"fields": ["id", "name", "status_badge", "drained_by", "node_type", "address", "http_address"]}),
        ("Liveness", {"fields": ["heartbeat_age", "last_heartbeat"]}),
        ("Worker service and credentials", {"fields": ["worker_service", "worker_api_checked_at", "auth"]}),
        (
            "Capacity",
            {"fields": ["vram", "reserved", "ram", "disk", "gpu_vendor", "slots", "reported_max_replicas_per_model"]},
        ),
        # The node token's hash is never shown: it serves no operator and need not leave the database.
        ("Bookkeeping", {"classes": ["collapse"], "fields": ["created_at", "updated_at"]}),
        ("Replicas (read-only; unload from the replica list)", {"fields": ["replica_table"]}),
    ]

    def get_queryset(self, request):
        # One query for the list whatever its size: load sums are subqueries, labels prefetched.
        return super().get_queryset(request).with_load().prefetch_related("labels")

    def has_add_permission(self, request):
        return False  # nodes register themselves

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            # Django's confirmation page, then delete_queryset -> Node.objects.deregister.
            actions["delete_selected"] = (delete_selected, "delete_selected", "Deregister selected nodes (hard delete)")
        return actions

    def get_deleted_objects(self, objs, request):
        # Replica rows, labels and load failures go with the node inside the verb; their
        # admins being read-only must not block deregistration.
        deleted, model_count, _perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, model_count, set(), protected

    def delete_model(self, request, obj):
        Node.objects.deregister(obj.pk)

    def delete_queryset(self, request, queryset):
        for pk in list(queryset.values_list("pk", flat=True)):
            Node.objects.deregister(pk)

    def save_model(self, request, obj, form, change):
        """Nothing to write: every field of the node is read-only here (labels are saved by
        ``save_formset`` through their verb). Django's ``obj.save()`` would write back every
        column as the page read it, undoing a drain, a heartbeat or a re-registration that
        happened since."""

    def save_formset(self, request, form, formset, change):
        if isinstance(formset, LabelFormSet):
            NodeLabel.objects.replace(form.instance.pk, formset.labels)
            formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
            return
        super().save_formset(request, form, formset, change)

    # ----- columns ----------------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status)

    @admin.display(description="replicas")
    def replica_table(self, obj):
        """One query, no network call: the rows as stored (state, in flight, last probe)."""
        rows = obj.replicas.order_by("model_name", "replica_index").values_list(
            "pk", "model_name", "replica_index", "state", "in_flight", "address", "last_used", "probe_failures"
        )
        body = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:registry_nodemodel_change", args=[pk]),
                    model,
                    index,
                    state,
                    in_flight,
                    address,
                    age(last_used),
                    failures,
                )
                for pk, model, index, state, in_flight, address, last_used, failures in rows
            ),
        )
        if not body:
            return "none"
        return format_html(
            "<table><thead><tr><th>model</th><th>replica</th><th>state</th><th>in flight</th><th>address</th>"
            "<th>last used</th><th>probe failures</th></tr></thead><tbody>{}</tbody></table>",
            body,
        )

    @admin.display(description="heartbeat", ordering="last_heartbeat")
    def heartbeat_age(self, obj):
        return age(obj.last_heartbeat)

    @admin.display(description="VRAM free / total")
    def vram(self, obj):
        return f"{human_bytes(obj.free_vram)} / {human_bytes(obj.total_vram)}"

    @admin.display(description="VRAM free / total (reserved); disk")
    def vram_with_reserved(self, obj):
        return format_html(
            "{} / {}<br><small>{} reserved</small><br><small>disk {}</small>",
            human_bytes(obj.free_vram),
            human_bytes(obj.total_vram),
            human_bytes(obj.reserved_vram),
            self.disk(obj),
        )

    @admin.display(description="reserved", ordering="reserved_vram")
    def reserved(self, obj):
        return human_bytes(obj.reserved_vram)

    @admin.display(description="RAM available / total")
    def ram(self, obj):
        return f"{human_bytes(obj.available_ram)} / {human_bytes(obj.total_ram)}"

    @admin.display(description="disk available / total")
    def disk(self, obj):
        # 0 total: the worker does not report its models directory's filesystem.
        if not obj.total_disk:
            return "not reported"
        return f"{human_bytes(obj.available_disk)} / {human_bytes(obj.total_disk)}"

    @admin.display(description="credential", ordering="auth_mode")
    def auth(self, obj):
        return Node.AuthMode(obj.auth_mode).label if obj.auth_mode in Node.AuthMode.values else obj.auth_mode

    @admin.display(description="worker service", ordering="worker_api")
    def worker_service(self, obj):
        return worker_service_text(obj)

    @admin.display(description="worker service", ordering="worker_api")
    def placement(self, obj):
        """The list's short form of ``worker_service``; the reason of the last check is on the
        node page and in the cell's tooltip."""
        placed, why = worker_service_summary(obj)
        if placed:
            return "answers"
        return format_html(
            '<span title="{}"><strong>not placed on</strong><br><small>{}</small></span>',
            obj.worker_api_detail or why,
            why,
        )

    @admin.display(description="slots / model", ordering="max_replicas_per_model")
    def slots(self, obj):
        manual = " (operator)" if obj.max_replicas_per_model_manual else ""
        return f"{obj.max_replicas_per_model}{manual}"

    @admin.display(description="labels (operator)")
    def label_list(self, obj):
        labels = [label for label in obj.labels.all() if label.key not in AUTO_LABEL_KEYS]
        return format_html_join(
            " ",
            '<code style="font-size:11px;white-space:nowrap">{}={}</code>',
            ((label.key, label.value) for label in labels),
        )

    @admin.display(description="replicas", ordering="replica_count")
    def replica_count(self, obj):
        return getattr(obj, "replica_count", None) or 0

    @admin.display(description="in flight", ordering="in_flight_total")
    def in_flight_sum(self, obj):
        return getattr(obj, "in_flight_total", None) or 0

    # ----- actions: each calls one registry verb per selected node ---------------------------

    def _each(self, request, queryset, verb, label):
        ids = list(queryset.values_list("pk", flat=True))
        done = sum(1 for pk in ids if verb(pk))
        _report(self, request, done, len(ids), label)

    @admin.action(description="Approve (pending -> healthy)", permissions=["change"])
    def approve(self, request, queryset):
        self._each(request, queryset, Node.objects.approve, "approved")

    @admin.action(
        description="Drain (stop routing and scheduling here; the node cannot lift it)", permissions=["change"]
    )
    def drain(self, request, queryset):
        self._each(request, queryset, _operator_drain, "draining")

    @admin.action(description="Resume (draining -> healthy, whoever drained it)", permissions=["change"])
    def resume(self, request, queryset):
        self._each(request, queryset, _operator_resume, "resumed")

    @admin.action(description="Mark offline (deletes replica rows, keeps load info)", permissions=["change"])
    def mark_offline(self, request, queryset):
        self._each(request, queryset, Node.objects.mark_offline, "marked offline")

    @admin.action(description="Reset max replicas per model to the reported value", permissions=["change"])
    def reset_max_replicas(self, request, queryset):
        self._each(request, queryset, Node.objects.reset_max_replicas_per_model, "slots reset")

    @admin.action(description="Set max replicas per model...", permissions=["change"])
    def set_max_replicas(self, request, queryset):
        """Intermediate page: the form posts back to this action with ``apply``."""
        form = MaxReplicasForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            slots = form.cleaned_data["max_replicas_per_model"]
            ids = list(queryset.values_list("pk", flat=True))
            done = sum(1 for pk in ids if Node.objects.set_max_replicas_per_model(pk, slots))
            self.message_user(request, f"max replicas per model set to {slots} on {done} node(s).", messages.SUCCESS)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Set max replicas per model",
            "opts": self.model._meta,
            "nodes": queryset,
            "form": form,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "action": "set_max_replicas",
        }
        return TemplateResponse(request, "admin/registry/node/set_max_replicas.html", context)


# --------------------------------------------------------------------------------------------
# Replicas
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Models: scheduling config + load info + conditions + events on one page
# --------------------------------------------------------------------------------------------


class SchedulingForm(forms.ModelForm):
    """Validated by ``validate_scheduling``, the same function the API's upsert runs."""

    node_selector = forms.JSONField(required=False, help_text='labels every node must carry, e.g. {"gpu": "a100"}')

    class Meta:
        model = ModelSchedulingConfig
        fields = ["model_name", "min_replicas", "max_replicas", "node_selector", "placement"]

    def clean_node_selector(self):
        return self.cleaned_data.get("node_selector") or {}

    def _post_clean(self):
        # The model's own constraint check would duplicate (and word differently) the verb's.
        data = self.cleaned_data
        if {"min_replicas", "max_replicas", "node_selector"} <= set(data):
            try:
                validate_scheduling(data["min_replicas"], data["max_replicas"], data["node_selector"])
            except ValidationError as exc:
                for field, errors in exc.message_dict.items():
                    self.add_error(field if field in self.fields else None, errors)
        if self.instance.pk is None and data.get("model_name"):
            if ModelSchedulingConfig.objects.filter(model_name=data["model_name"]).exists():
                self.add_error("model_name", "this model already has a scheduling config")


@admin.register(ModelSchedulingConfig)
class ModelSchedulingConfigAdmin(admin.ModelAdmin):
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
    readonly_fields = ["unsatisfiable_until", "unsatisfiable_ticks", "created_at", "updated_at"]
    actions = ["reconcile_now"]
    change_form_template = "admin/registry/modelschedulingconfig/change_form.html"

    def get_readonly_fields(self, request, obj=None):
        # The model name is the key of the upsert: fixed once the row exists.
        return [*self.readonly_fields, "model_name"] if obj else self.readonly_fields

    def get_changeform_initial_data(self, request):
        return {"model_name": request.GET.get("model_name", "")}

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
        )
        obj.pk = saved.pk
        obj.refresh_from_db()

    def delete_model(self, request, obj):
        ModelSchedulingConfig.objects.remove(obj.model_name)

    def delete_queryset(self, request, queryset):
        for name in list(queryset.values_list("model_name", flat=True)):
            ModelSchedulingConfig.objects.remove(name)

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

    def change_view(self, request, object_id, form_url="", extra_context=None):
        config = get_object_or_404(ModelSchedulingConfig, pk=object_id)
        extra_context = {**(extra_context or {}), **model_diagnosis(config.model_name)}
        return super().change_view(request, object_id, form_url, extra_context)


def model_diagnosis(model_name: str) -> dict:
    """What the model page shows under the form: load recipe, counts, conditions, events."""
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
    rows = list(NodeModel.objects.for_model(model_name).select_related("node").order_by("node__name", "replica_index"))
    ready = sum(1 for row in rows if row.state == NodeModel.State.LOADED and row.node.is_schedulable)
    return {
        "diag_model_name": model_name,
        "diag_load_info": info,
        "diag_options": [
            (key, json.dumps(value) if not isinstance(value, str) else value) for key, value in options.items()
        ],
        "diag_options_error": options_error,
        "diag_replicas": rows,
        "diag_ready": ready,
        "diag_conditions": list(ModelCondition.objects.filter(model_name=model_name)),
        "diag_events": list(Event.objects.filter(model_name=model_name)[:20]),
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


# --------------------------------------------------------------------------------------------
# Load jobs, leases, load failures (read-only)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The fleet dashboard
# --------------------------------------------------------------------------------------------

DASHBOARD_EVENTS = 15


def dashboard_context(*, now: datetime | None = None) -> dict:
    """Everything the dashboard shows, in a fixed number of queries: the reconciler's snapshot
    (six), the newest events (one) and the newest reconcile pass (one)."""
    snapshot = take_snapshot(now=now)
    nodes = sorted(snapshot.nodes.values(), key=lambda node: node.name)
    models = snapshot.model_names
    cells = defaultdict(list)
    for replica in snapshot.replicas:
        cells[(replica.node_id, replica.model_name)].append(replica)
    grid = [
        {
            "node": node,
            "badge": status_badge(node.status),
            "heartbeat": age(node.last_heartbeat, now=snapshot.taken_at),
            "cells": [replica_cell(cells.get((node.id, model), ())) for model in models],
        }
        for node in nodes
    ]
    model_rows = []
    for model in models:
        config = snapshot.config_for(model)
        conditions = {kind: snapshot.conditions.get((model, kind)) for kind, _ in ModelCondition.Type.choices}
        unhealthy = [
            f"{kind}: {cond['reason']}"
            for kind, cond in conditions.items()
            if cond
            and cond["status"] == (kind != ModelCondition.Type.AVAILABLE)
            and kind != ModelCondition.Type.PROGRESSING
        ]
        model_rows.append(
            {
                "name": model,
                "ready": len(snapshot.ready(model)),
                "loading": len(snapshot.loading(model)),
                "desired": config.min_replicas if config.autoscaled else None,
                "max": config.max_replicas,
                "has_config": model in snapshot.configs,
                "has_load_info": snapshot.has_load_info(model),
                "problems": unhealthy,
            }
        )
    status_counts = Counter(node.status for node in nodes)
    last_pass = ReconcilePass.objects.order_by("-started_at", "-id").first()
    return {
        "taken_at": snapshot.taken_at,
        "models": models,
        "grid": grid,
        "model_rows": model_rows,
        "status_counts": [
            (status, label, status_counts.get(status, 0), status_badge(status)) for status, label in Node.Status.choices
        ],
        "events": list(Event.objects.all()[:DASHBOARD_EVENTS]),
        "last_pass": last_pass,
        "last_pass_summary": summary_text(last_pass.summary) if last_pass else "",
        "refresh_seconds": 10,
    }


def dashboard_view(request):
    context = {
        **admin.site.each_context(request),
        "title": "Fleet dashboard",
        **dashboard_context(),
    }
    return TemplateResponse(request, "admin/registry/dashboard.html", context)


def _with_dashboard(get_urls):
    def urls():
        return [path("fleet/", admin.site.admin_view(dashboard_view), name="fleet_dashboard"), *get_urls()]

    return urls


# admin_view: staff only, login redirect otherwise, never cached.
admin.site.get_urls = _with_dashboard(admin.site.get_urls)
