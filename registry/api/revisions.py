"""Operator API of config revisions: ``GET /api/v1/models/{model}/revisions`` (the history)
and ``POST /api/v1/models/{model}/rollback`` (docs/revisions.md)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.auth import IsOperator
from core.schema import problems
from registry.models import ModelRevision

from . import serializers as s
from .auth import actor
from .problems import RevisionCurrent, RevisionNotFound
from .views import MODEL, MODEL_PROBLEMS


@extend_schema(tags=["scheduling"], parameters=[MODEL])
class ModelRevisionViewSet(viewsets.GenericViewSet):
    """A model's config revisions (newest first) and the rollback to one of them."""

    permission_classes = [IsOperator]
    serializer_class = s.RevisionSerializer
    session_permissions = {
        "revisions": ("registry.view_modelschedulingconfig",),
        "rollback": ("registry.change_modelschedulingconfig", "registry.change_modelloadinfo"),
    }
    lookup_url_kwarg = "model"
    lookup_value_converter = "model_name"

    @extend_schema(
        summary="A model's config revisions, newest first",
        description="Each load-info or scheduling change made one; `current` marks the one in force.",
        responses={200: s.RevisionSerializer(many=True), **MODEL_PROBLEMS},
    )
    @action(detail=True, methods=["get"], url_path="revisions", url_name="revisions")
    def revisions(self, request, model):
        model = s.validate_model_name(model)
        rows = ModelRevision.objects.filter(model_name=model).order_by("-number")
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        summary="Roll a model back to an earlier revision",
        description=(
            "Restores revision `revision`'s load info and scheduling config as a NEW revision "
            "(the current number + 1, reason `rollback to revision N`): the history only grows, "
            "as with `kubectl rollout undo`. The reconciler then replaces, one at a time, the "
            "replicas whose revision loads something else (see docs/revisions.md); replicas "
            "still at revision N are kept. A revision taken before the model had load info (or a "
            "scheduling config) leaves that part as it is."
        ),
        request=s.RollbackSerializer,
        responses={
            201: s.RevisionSerializer,
            **problems(
                400,
                404,
                409,
                description_400="`validation_error` (body or model name)",
                description_404="`revision_not_found`",
                description_409="`revision_current`: that revision's values are in force already",
            ),
        },
    )
    @action(detail=True, methods=["post"], url_path="rollback", url_name="rollback")
    def rollback(self, request, model):
        model = s.validate_model_name(model)
        body = s.RollbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        number = body.validated_data["revision"]
        try:
            revision = ModelRevision.objects.rollback(model, number, created_by=actor(request))
        except ModelRevision.DoesNotExist:
            raise RevisionNotFound(
                f"Model {model!r} has no revision {number}.", extra={"model": model, "revision": number}
            ) from None
        except ValueError as exc:
            raise RevisionCurrent(str(exc), extra={"model": model, "revision": number}) from None
        return Response(self.get_serializer(revision).data, status=status.HTTP_201_CREATED)
