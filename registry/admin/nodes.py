"""Nodes in the admin: a list annotated in one query, a read-only change page whose labels are
edited inline (saved with ``NodeLabel.objects.replace``), and actions that each call one
``Node.objects`` verb per selected node."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import ValidationError
from django.forms.models import BaseInlineFormSet
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from ..labels import auto_labels, validate_labels
from ..managers import max_labels_per_node
from ..models import Node, NodeLabel
from .display import age, human_bytes, status_badge

# Derived at registration (registry.labels.auto_labels): shown on the node page, not in the list.
AUTO_LABEL_KEYS = frozenset(auto_labels(name="-", gpu_vendor="-", total_vram=1, max_replicas_per_model=1))


NO_WORKER_SERVICE = "does not answer the worker gRPC service (LocalAI workers take backend commands over NATS)"


def worker_service_summary(node) -> tuple[bool, str]:
    """``(placed on, why not)`` from ``node.worker_api``, the node type and its status (only
    schedulable nodes get new replicas: ``Node.SCHEDULABLE``)."""
    WorkerApi = Node.WorkerApi
    if node.node_type != Node.NodeType.BACKEND:
        return False, "agent node"
    if node.status == Node.Status.UNHEALTHY:
        # Marked by the reconciler because its worker stopped answering ListBackends, while
        # worker_api still records the last answer it gave.
        return False, "its worker stopped answering the worker gRPC service (node unhealthy)"
    if not node.is_schedulable:
        return False, f"node {Node.Status(node.status).label}"
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


def _report(modeladmin, request, done: int, unchanged: int, verb: str) -> None:
    """One message per action: how many rows the verb changed, and how many it refused."""
    if done:
        modeladmin.message_user(request, f"{verb}: {done} node(s).", messages.SUCCESS)
    if unchanged:
        modeladmin.message_user(
            request,
            f"{verb}: {unchanged} node(s) unchanged (not in a status this verb applies to).",
            messages.WARNING,
        )


def _operator_drain(node_id) -> bool:
    return Node.objects.mark_draining(node_id, by=Node.DrainedBy.OPERATOR)


def _operator_resume(node_id) -> bool:
    return Node.objects.resume(node_id, by=Node.DrainedBy.OPERATOR)


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
            {
                "fields": [
                    "vram",
                    "reserved",
                    "vram_budget",
                    "ram",
                    "disk",
                    "gpu_vendor",
                    "slots",
                    "reported_max_replicas_per_model",
                ]
            },
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
        """Only the VRAM budget is editable, written by its verb when changed (labels are saved
        by ``save_formset`` through theirs). Django's default, saving the instance, would write
        back every column as the page read it, undoing a drain, a heartbeat or a
        re-registration that happened since."""
        if change and "vram_budget" in form.changed_data:
            Node.objects.set_vram_budget(obj.pk, form.cleaned_data.get("vram_budget"))

    def save_formset(self, request, form, formset, change):
        # The labels' formset is the page's only inline: written as a whole by their verb.
        NodeLabel.objects.replace(form.instance.pk, formset.labels)
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []

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
        _report(self, request, done, len(ids) - done, label)

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
        """``Node.objects.mark_offline`` per node. The verb keeps a ``pending`` node ``pending``
        (only Approve lets a node out of it) while dropping its replica rows, and still answers
        True: such a node is reported as staying pending, not as marked offline."""
        ids = list(queryset.values_list("pk", flat=True))
        changed = [pk for pk in ids if Node.objects.mark_offline(pk)]
        pending = Node.objects.filter(pk__in=changed, status=Node.Status.PENDING).count()
        _report(self, request, len(changed) - pending, len(ids) - len(changed), "marked offline")
        if pending:
            self.message_user(
                request,
                f"marked offline: {pending} pending node(s) stay pending (replica rows dropped; "
                "a pending node leaves pending through Approve only).",
                messages.WARNING,
            )

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
