"""Operator API of the reconciler, mounted under ``/api/v1/``:

- ``POST /reconcile`` (operator): run one pass now and answer its summary;
- ``GET /models``, ``GET /models/{model}`` (frontend or operator): desired and observed replicas
  and the conditions that say why;
- ``GET /events`` (frontend or operator): the event history, newest first, filterable.

Authentication, permissions, pagination and problem documents are the project's
(``core.auth``, ``core.pagination``, ``core.problems``).
"""

from __future__ import annotations

import django_filters
from django_filters.utils import translate_validation
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.response import Response

from core.auth import IsFrontend, IsOperator
from core.problems import ProblemError
from core.schema import problems
from registry.api.filters import InstantFilter, StableOrderingFilter, StrictFilterSet, ordering_parameter
from registry.api.serializers import validate_model_name
from registry.api.views import MODEL
from registry.models import ModelSchedulingConfig

from .models import Event, ModelCondition, ReconcilePass
from .reconcile import reconcile_once
from .status import known_model_names, model_status, model_statuses

# --------------------------------------------------------------------------------------------
# Serializers (shape only; nothing here changes state)
# --------------------------------------------------------------------------------------------


class ReconcileSummarySerializer(serializers.Serializer):
    outcome = serializers.ChoiceField(choices=ReconcilePass.Outcome.choices)
    reason = serializers.CharField(allow_blank=True, help_text="`held` when skipped; the error when failed")
    started_at = serializers.DateTimeField()
    duration_s = serializers.FloatField()
    nodes = serializers.IntegerField()
    models = serializers.IntegerField(help_text="autoscaled models planned")
    known_models = serializers.IntegerField()
    actions = serializers.DictField(child=serializers.IntegerField(), help_text="counts by action")
    skipped = serializers.DictField(child=serializers.IntegerField(), help_text="counts by reason")
    holder = serializers.CharField(help_text="host:pid that ran the pass")


class ConditionSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=ModelCondition.Type.choices)
    status = serializers.BooleanField()
    reason = serializers.CharField(help_text="stable machine-readable code")
    message = serializers.CharField(allow_blank=True)
    since = serializers.DateTimeField(help_text="last change of status or reason")
    updated_at = serializers.DateTimeField()


class ModelStatusSerializer(serializers.Serializer):
    model_name = serializers.CharField()
    configured = serializers.BooleanField(help_text="has a scheduling config")
    min_replicas = serializers.IntegerField()
    max_replicas = serializers.IntegerField(help_text="0 = unlimited")
    node_selector = serializers.DictField(child=serializers.CharField(allow_blank=True))
    autoscaled = serializers.BooleanField()
    unsatisfiable_until = serializers.DateTimeField(allow_null=True)
    target_in_flight_per_replica = serializers.IntegerField(
        allow_null=True, help_text="load-aware autoscaling target; null = off"
    )
    effective_min_replicas = serializers.IntegerField(
        help_text="the floor in force now: min_replicas, raised by an open window of the floor schedule"
    )
    desired_replicas = serializers.IntegerField(
        allow_null=True,
        help_text="replicas the reconciler aims at: with a load target, what the load asked for at the last pass; "
        "otherwise the floor of an autoscaled model; null for an unmanaged model",
    )
    load_info = serializers.ChoiceField(
        choices=["model", "replica"], allow_null=True, help_text="where the load recipe comes from; null: none"
    )
    ready_replicas = serializers.IntegerField(help_text="loaded replicas on healthy backend nodes")
    loading_replicas = serializers.IntegerField()
    replicas = serializers.IntegerField(help_text="replica rows in any state on any node")
    revision = serializers.IntegerField(
        allow_null=True, help_text="the current config revision (GET .../revisions); null: none recorded yet"
    )
    conditions = ConditionSerializer(many=True)


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["id", "created_at", "kind", "model_name", "node_id", "node_name", "message", "details"]


class EventFilter(StrictFilterSet):
    """``?model=`` (an explicitly empty value: the events of no model), ``?node=``, ``?kind=``,
    ``?since=``/``?until=`` (ISO 8601 instants: created at or after, before) and ``?ordering=``."""

    blank_allowed = ("model",)

    model = django_filters.CharFilter(
        method="filter_model", max_length=255, help_text="exact model name; empty: events of no model"
    )
    node = django_filters.UUIDFilter(field_name="node_id", help_text="node id")
    kind = django_filters.ChoiceFilter(choices=Event.Kind.choices, help_text="event kind")
    since = InstantFilter(
        field_name="created_at", lookup_expr="gte", help_text="created at or after this instant (ISO 8601)"
    )
    until = InstantFilter(field_name="created_at", lookup_expr="lt", help_text="created before this instant (ISO 8601)")
    ordering = StableOrderingFilter(
        fields=("created_at",), help_text="`created_at` (oldest first) or `-created_at` (newest first, the default)"
    )

    class Meta:
        model = Event
        fields = ["model", "node", "kind", "since", "until"]

    def filter_model(self, queryset, name, value):
        return queryset.for_model(value)

    def filter_queryset(self, queryset):
        queryset = super().filter_queryset(queryset)
        # A method filter skips an empty value; here it names the events of no model.
        if "model" in self.data and self.form.cleaned_data.get("model") == "":
            queryset = queryset.for_model("")
        return queryset


class ReconcileFailed(ProblemError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "reconcile_failed"
    default_detail = "The reconcile pass failed."
    title = "Reconcile pass failed"


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@extend_schema(tags=["reconciler"])
class ReconcileViewSet(viewsets.ViewSet):
    """Run one reconcile pass now (operator key, or a staff session allowed to change
    scheduling configs, as the admin's "Reconcile now")."""

    permission_classes = [IsOperator]
    session_permissions = {"create": ("registry.change_modelschedulingconfig",)}

    @extend_schema(
        summary="Run one reconcile pass now",
        description=(
            "Runs a pass synchronously under the reconcile lock and answers its summary. When "
            "another pass is running, answers at once with `outcome: skipped`, `reason: held`."
        ),
        request=None,
        responses={
            200: ReconcileSummarySerializer,
            **problems(
                503, description_503="`reconcile_failed` (the summary is in `summary`) or `database_unavailable`"
            ),
        },
    )
    def create(self, request):
        summary = reconcile_once()
        if summary.outcome == ReconcilePass.Outcome.ERROR:
            raise ReconcileFailed(summary.reason, extra={"summary": summary.as_dict()})
        return Response(ReconcileSummarySerializer(summary.as_dict()).data)


class ModelStatusFilter(StrictFilterSet):
    """``?configured=``, ``?autoscaled=`` (``true``/``false``) and ``?name=`` (part of the
    name, case-insensitive). The model list is a UNION of names from three tables
    (``reconciler.status.known_model_names``), not one queryset: this FilterSet validates the
    parameters (a 400 ``validation_error`` naming a bad one) and the union applies them to each
    of its parts."""

    BOOLEAN = (("true", "true"), ("false", "false"))

    configured = django_filters.ChoiceFilter(choices=BOOLEAN, help_text="has a scheduling config")
    autoscaled = django_filters.ChoiceFilter(
        choices=BOOLEAN, help_text="kept at its replica counts by the reconciler (min or max replicas set)"
    )
    name = django_filters.CharFilter(max_length=255, help_text="part of the model name (case-insensitive)")

    class Meta:
        model = ModelSchedulingConfig
        fields = ["configured", "autoscaled", "name"]

    def criteria(self) -> dict:
        """The validated parameters as ``known_model_names``' keyword arguments."""
        data = self.form.cleaned_data
        flag = {"true": True, "false": False}
        return {
            "configured": flag.get(data.get("configured")),
            "autoscaled": flag.get(data.get("autoscaled")),
            "name_contains": data.get("name") or "",
        }


@extend_schema_view(
    list=extend_schema(
        summary="List models with replica counts and conditions (by name)",
        operation_id="models_list",
        parameters=[
            OpenApiParameter(name, OpenApiTypes.STR, enum=["true", "false"], description=description)
            for name, description in (
                ("configured", "has a scheduling config"),
                ("autoscaled", "kept at its replica counts by the reconciler (min or max replicas set)"),
            )
        ]
        + [
            OpenApiParameter(
                "name",
                {"type": "string", "minLength": 1, "maxLength": 255},
                description="part of the model name (case-insensitive)",
            )
        ],
    ),
    retrieve=extend_schema(
        summary="A model's replica counts and conditions",
        operation_id="models_status_retrieve",
        parameters=[MODEL],
        responses={200: ModelStatusSerializer},
    ),
)
@extend_schema(tags=["reconciler"])
class ModelStatusViewSet(viewsets.GenericViewSet):
    # GET /api/v1/models and GET /api/v1/models/{model}

    permission_classes = [IsFrontend]
    serializer_class = ModelStatusSerializer
    filter_backends = []  # ModelStatusFilter is applied by list(): the list is not one queryset
    lookup_url_kwarg = "model"
    lookup_value_converter = "model_name"

    def list(self, request):
        """Every model known from scheduling configs, load info or replica rows."""
        filters = ModelStatusFilter(request.query_params, queryset=ModelSchedulingConfig.objects.none())
        if not filters.is_valid():
            raise translate_validation(filters.errors)
        # Page over names (one query), then read the page's statuses (a fixed number of queries).
        page = self.paginate_queryset(known_model_names(**filters.criteria()))
        return self.get_paginated_response(self.get_serializer(model_statuses(page), many=True).data)

    def retrieve(self, request, model):
        model = validate_model_name(model)
        found = model_status(model)
        if found is None:
            raise NotFound(f"No model {model!r} is known (no scheduling config, load info or replica).")
        return Response(self.get_serializer(found).data)


@extend_schema_view(
    list=extend_schema(
        summary="List events, newest first",
        # As published before the FilterSet: the kinds are the enum's values.
        parameters=[
            OpenApiParameter("kind", OpenApiTypes.STR, enum=Event.Kind.values, description="event kind"),
            ordering_parameter(EventFilter),
        ],
    )
)
@extend_schema(tags=["reconciler"])
class EventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The reconciler's event history, newest first."""

    permission_classes = [IsFrontend]
    serializer_class = EventSerializer
    queryset = Event.objects.newest_first()
    filterset_class = EventFilter
