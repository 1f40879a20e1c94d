"""Operator API of the reconciler, mounted under ``/api/v1/``:

- ``POST /reconcile`` (operator): run one pass now and answer its summary;
- ``GET /models``, ``GET /models/{model}`` (frontend or operator): desired and observed replicas
  and the conditions that say why;
- ``GET /events`` (frontend or operator): the event history, newest first, filterable.

Authentication, permissions, pagination and problem documents are the project's
(``core.auth``, ``core.pagination``, ``core.problems``).
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from core.auth import IsFrontend, IsOperator
from core.problems import ProblemError
from core.schema import problems
from registry.api.serializers import validate_model_name
from registry.api.views import MODEL

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
    load_info = serializers.ChoiceField(
        choices=["model", "replica"], allow_null=True, help_text="where the load recipe comes from; null: none"
    )
    ready_replicas = serializers.IntegerField(help_text="loaded replicas on healthy backend nodes")
    loading_replicas = serializers.IntegerField()
    replicas = serializers.IntegerField(help_text="replica rows in any state on any node")
    conditions = ConditionSerializer(many=True)


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["id", "created_at", "kind", "model_name", "node_id", "node_name", "message", "details"]


class EventFilterSerializer(serializers.Serializer):
    model = serializers.CharField(
        required=False, allow_blank=True, max_length=255, help_text="exact model name; empty: events of no model"
    )
    node = serializers.UUIDField(required=False, help_text="node id (events outlive deleted nodes)")
    kind = serializers.ChoiceField(required=False, choices=Event.Kind.choices)


class ReconcileFailed(ProblemError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "reconcile_failed"
    default_detail = "The reconcile pass failed."
    title = "Reconcile pass failed"


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@extend_schema(tags=["reconciler"])
class ReconcileView(APIView):
    """Run one reconcile pass now (operator key, or a staff session allowed to change
    scheduling configs, as the admin's "Reconcile now")."""

    permission_classes = [IsOperator]
    session_permissions = {"post": ("registry.change_modelschedulingconfig",)}

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
    def post(self, request):
        summary = reconcile_once()
        if summary.outcome == ReconcilePass.Outcome.ERROR:
            raise ReconcileFailed(summary.reason, extra={"summary": summary.as_dict()})
        return Response(ReconcileSummarySerializer(summary.as_dict()).data)


@extend_schema(tags=["reconciler"])
class ModelStatusListView(generics.ListAPIView):
    """Every model known from scheduling configs, load info or replica rows."""

    permission_classes = [IsFrontend]
    serializer_class = ModelStatusSerializer

    @extend_schema(summary="List models with replica counts and conditions (by name)", operation_id="models_list")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def list(self, request, *args, **kwargs):
        # Page over names (one query), then read the page's statuses (a fixed number of queries).
        page = self.paginate_queryset(known_model_names())
        return self.get_paginated_response(self.get_serializer(model_statuses(page), many=True).data)


@extend_schema(tags=["reconciler"], parameters=[MODEL])
class ModelStatusView(generics.GenericAPIView):
    permission_classes = [IsFrontend]
    serializer_class = ModelStatusSerializer

    @extend_schema(
        summary="A model's replica counts and conditions",
        operation_id="models_status_retrieve",
        responses={200: ModelStatusSerializer},
    )
    def get(self, request, model):
        model = validate_model_name(model)
        found = model_status(model)
        if found is None:
            raise NotFound(f"No model {model!r} is known (no scheduling config, load info or replica).")
        return Response(self.get_serializer(found).data)


@extend_schema(tags=["reconciler"])
class EventListView(generics.ListAPIView):
    """The reconciler's event history, newest first."""

    permission_classes = [IsFrontend]
    serializer_class = EventSerializer

    @extend_schema(
        summary="List events, newest first",
        parameters=[
            OpenApiParameter("model", OpenApiTypes.STR, description="exact model name; empty: events of no model"),
            OpenApiParameter("node", OpenApiTypes.UUID, description="node id"),
            OpenApiParameter("kind", OpenApiTypes.STR, enum=Event.Kind.values, description="event kind"),
        ],
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        # A plain dict, not the QueryDict: DRF skips an empty optional HTML-form value, but
        # ``?kind=`` is not a kind and must be refused.
        params = {
            name: self.request.query_params[name]
            for name in ("model", "node", "kind")
            if name in self.request.query_params
        }
        query = EventFilterSerializer(data=params)
        query.is_valid(raise_exception=True)
        events = Event.objects.newest_first()
        if "model" in query.validated_data:
            events = events.for_model(query.validated_data["model"])
        if "node" in query.validated_data:
            events = events.for_node(query.validated_data["node"])
        if "kind" in query.validated_data:
            events = events.of_kind(query.validated_data["kind"])
        return events
