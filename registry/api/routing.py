"""Frontend API of the router: route a request to a replica (or a cold load), release and renew
leases, follow a load job, and report a replica a frontend loaded itself; operators list the
replica rows.

Thin viewsets: each action calls one router function or registry verb
(``registry.router.route``, ``Lease.objects.release``/``renew``,
``NodeModel.objects.report_loaded``). Router errors become problem documents with their stable
``code`` (``RoutingProblem``); everything else is rendered by
``core.problems.exception_handler``. Callers need a frontend or operator API key (listing
replicas: an operator key).
"""

from __future__ import annotations

import logging
import unicodedata
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.settings import ISO_8601, api_settings

from core import names
from core.auth import IsFrontend, IsOperator
from core.credentials import backend_token, worker_command_token
from core.problems import ProblemError
from core.schema import problems
from core.serializers import RejectUnknownFieldsMixin, StrictCharField, StrictIntegerField
from proto import client, tls, worker_pb2
from registry import affinity, router
from registry.models import Lease, LoadJob, ModelRevision, Node, NodeModel

from . import serializers as s
from .filters import ReplicaFilter, ordering_parameter
from .problems import ReplicaNotVouched
from .views import MODEL

logger = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 300.0
MAX_LEASE_TTL_SECONDS = 24 * 3600
ROUTE_409 = "`no_load_info`: the model was never loaded and the request carried no options"
ROUTE_503 = (
    "`no_matching_nodes` (no healthy node matches the model's selector), `capacity_exhausted` (every "
    "candidate holds its maximum replicas), `all_replicas_busy` (no VRAM and nothing idle to evict), "
    "`load_failed` (StartBackend or LoadModel failed; the node is backed off), `database_unavailable`, or "
    "`broker_unavailable` (a cold load could not be handed to the task broker, Redis; the load job is kept "
    "and sent again once it answers)"
)


def retry_after_seconds() -> str:
    return str(int(settings.ROUTE_RETRY_AFTER_SECONDS))


class RoutingProblem(ProblemError):
    """A ``router.RouterError`` as a problem: its status, stable code and title; ``model`` is
    added to the document, and a 503 says when to try again (``Retry-After``)."""

    def __init__(self, error: router.RouterError, model_name: str):
        self.status_code = error.status
        self.title = error.title
        headers = {"Retry-After": retry_after_seconds()} if error.status == 503 else None
        super().__init__(error.message, code=error.code, extra={"model": model_name}, headers=headers)


class LeaseReleased(ProblemError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "lease_released"
    default_detail = "The lease was already released (by its holder or by expiry)."
    title = "Lease released"


# --------------------------------------------------------------------------------------------
# Serializers
# --------------------------------------------------------------------------------------------


class RouteBodySerializer(s.LoadInfoWriteSerializer):
    """Optional body of a route call. Options, when sent, become the model's load info (and are
    what a cold load uses); at most one of the two forms."""

    options_required = False

    backend_type = StrictCharField(max_length=255, required=False, allow_blank=True, trim_whitespace=False)
    wait_seconds = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=MAX_WAIT_SECONDS,
        help_text="how long to wait for a cold load before answering 202 (default ROUTE_WAIT_SECONDS, 30)",
    )
    affinity_key = StrictCharField(
        required=False,
        allow_blank=True,
        allow_null=True,
        trim_whitespace=False,
        max_length=affinity.MAX_KEY_LENGTH,
        help_text="route requests with the same key to the same replica while its load allows (a session id, or a "
        "hash of the prompt prefix): rendezvous hashing over the model's routable replicas, a replica taking the "
        "key only while its in-flight is below ceil(ROUTE_AFFINITY_LOAD_FACTOR (1.25) x the model's average with this "
        "request counted) + 1, else the key's next replica under that bound. No control characters; empty or null: no affinity",
    )

    def validate_affinity_key(self, value):
        try:
            return affinity.validate_key(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc


# A route call without a body (or with {}): no options, the default wait.
EMPTY_ROUTE_BODY = {"opts_blob": None}

# Set in the WSGI environ (never from a header: those are HTTP_*) by the warm route's lean path
# (``lean_route.py``) when its warm pick found nothing for this very request: the view goes on
# from there (``router.route(warm_tried=True)``) instead of picking a second time.
WARM_ROUTE_MISSED = "controlplane.warm_route_missed"


class LeaseSerializer(serializers.Serializer):
    """A granted lease: call the replica at ``address``, then release the lease."""

    lease_id = serializers.UUIDField(source="pk")
    model_name = serializers.CharField()
    node_id = serializers.UUIDField()
    node_name = serializers.CharField()
    address = serializers.CharField(help_text="host:port of the replica's backend.Backend gRPC service; grpcs://host:port when it serves TLS (dial it with TLS)")
    replica_index = serializers.IntegerField()
    expires_at = serializers.DateTimeField(help_text="released automatically after this instant")
    model_identity = serializers.CharField(
        allow_blank=True,
        help_text="send this as `ModelIdentity` in every request to the replica (PredictOptions field 54 and its "
        "namesakes): the `Model` of the ModelOptions the replica was loaded with. A LocalAI backend answers "
        "NOT_FOUND `model identity mismatch` when it holds another model; empty: send none (no check)",
    )
    backend_token = serializers.CharField(
        help_text="send this as `authorization: Bearer <backend_token>` to the replica: the data-plane credential "
        "of the node's backends (it opens that node's backends only; it cannot register a node or command a "
        "worker). A LocalAI worker's backends require their own LOCALAI_GRPC_AUTH_TOKEN instead",
    )


class LoadJobSerializer(serializers.ModelSerializer):
    class Meta:
        model = LoadJob
        fields = [
            "id",
            "model_name",
            "state",
            "progress",
            "attempts",
            "node_id",
            "replica_index",
            "address",
            "error_code",
            "error_message",
            "created_at",
            "heartbeat_at",
            "finished_at",
        ]
        read_only_fields = fields


class RouteAcceptedSerializer(serializers.Serializer):
    load_job = LoadJobSerializer()


class LeaseReleaseSerializer(serializers.Serializer):
    lease_id = serializers.UUIDField(source="pk")
    released = serializers.BooleanField(help_text="true when this call released it; false when it already was")
    released_at = serializers.DateTimeField()


class LeaseRenewBodySerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    ttl_seconds = StrictIntegerField(
        required=False, min_value=1, max_value=MAX_LEASE_TTL_SECONDS, help_text="default LEASE_TTL_SECONDS (600)"
    )


class LeaseRenewSerializer(serializers.Serializer):
    lease_id = serializers.UUIDField(source="pk")
    expires_at = serializers.DateTimeField()


class ReplicaReportSerializer(s.LoadInfoWriteSerializer):
    """A replica a frontend loaded itself: where it runs and the recipe it was loaded with."""

    node_id = serializers.UUIDField()
    model_name = StrictCharField(
        max_length=s.MAX_MODEL_NAME, trim_whitespace=False, validators=[names.validate_model_name]
    )
    replica_index = StrictIntegerField(min_value=0, max_value=s.MAX_INT)
    address = StrictCharField(max_length=512, help_text="host:port of the replica's backend")
    revision = StrictIntegerField(
        min_value=1,
        max_value=s.MAX_INT,
        required=False,
        allow_null=True,
        help_text="the model's config revision the frontend loaded it from (GET /api/v1/models/{model} "
        "`revision`); omitted: the revision the reported recipe is (a new one if it differs)",
    )


class ReplicaSerializer(serializers.ModelSerializer):
    class Meta:
        model = NodeModel
        fields = [
            "id",
            "node_id",
            "model_name",
            "replica_index",
            "address",
            "state",
            "in_flight",
            "backend_type",
            "revision",
            "draining_since",
        ]
        read_only_fields = fields


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def node_header_value(node_name: str) -> str:
    """``X-Control-Plane-Node``: the node's name, with any control character percent-encoded so
    that the header can always be sent (names registered before names were validated may hold
    a CR/LF, which would split the header)."""
    return "".join(f"%{ord(c):02X}" if unicodedata.category(c) == "Cc" else c for c in node_name)


# The fields of the two answers on every routed request, rendered with DRF's own field classes
# built once (instantiating a Serializer deep-copies its declared fields: a cost per request that
# the warm route does not need). ``LeaseSerializer``/``LeaseReleaseSerializer`` stay the schema;
# tests/router/test_api.py checks that both renderings agree.
_UUID = serializers.UUIDField()
_DATETIME = serializers.DateTimeField()


def _datetime_representation(value) -> str | None:
    """``DateTimeField().to_representation(value)`` (ISO 8601 in the current time zone, UTC as
    ``Z``), without DRF's per-call time zone lookups for the one case of every routed request:
    an aware UTC instant while the current time zone is UTC. Anything else goes through DRF."""
    if (
        isinstance(value, datetime)
        and value.utcoffset() == _ZERO
        and settings.USE_TZ
        and timezone.get_current_timezone_name() == "UTC"
        and api_settings.DATETIME_FORMAT == ISO_8601
    ):
        return value.replace(tzinfo=None).isoformat() + "Z"
    return _DATETIME.to_representation(value)


_ZERO = timedelta(0)


def _lease_answer(result: router.RouteResult) -> dict:
    lease = result.lease
    return {
        "lease_id": str(lease.pk),
        "model_name": lease.model_name,
        "node_id": str(lease.node_id),
        "node_name": result.node_name,
        "address": lease.address,
        "replica_index": lease.replica_index,
        "expires_at": _datetime_representation(lease.expires_at),
        "model_identity": result.model_identity,
        "backend_token": backend_token(lease.node_id),
    }


def _release_answer(lease_id, released: bool, released_at) -> dict:
    return {
        "lease_id": _UUID.to_representation(lease_id),
        "released": released,
        "released_at": _datetime_representation(released_at),
    }


_VOUCHING_STATES = ("RUNNING",)  # a backend that answered its Health check


def _host(address: str) -> str:
    """The host of ``host:port`` or ``grpcs://host:port`` (brackets of an IPv6 literal removed,
    lower case); "" if none."""
    try:
        return (urlsplit(f"//{tls.split_address(address)[0]}").hostname or "").lower()
    except ValueError:
        return ""


def _why_not_vouched(node: Node, model_name: str, replica_index: int, address: str) -> str:
    """Why ``node`` does not vouch for a backend of ``model_name``#``replica_index`` at
    ``address`` ("" when it does). A frontend's word alone must never make the control plane
    route to (and probe) an address: the node's own worker must list that backend there,
    asked with the worker command credential (a network call, so never inside a transaction).
    A node without the worker service (LocalAI's worker) cannot be asked; its backends run on
    its own host, so the address must be on the host it registered."""
    if node.status not in (Node.Status.HEALTHY, Node.Status.DRAINING):
        return f"node {node.pk} is {node.status}"
    if node.worker_api != Node.WorkerApi.AVAILABLE:
        if _host(address) and _host(address) == _host(node.address):
            return ""
        return f"node {node.pk} has no worker service to ask, and {address} is not on its registered host"
    try:
        listing = client.list_backends(
            node.address, node_id=str(node.pk), token=worker_command_token(node.pk), timeout=None
        )
    except client.GrpcCallError as exc:
        return f"could not ask node {node.pk}'s worker: {exc.code.name if exc.code else 'UNKNOWN'}"
    for backend in listing.backends:
        state = worker_pb2.BackendProcess.State.Name(backend.state)
        if (
            backend.model_name == model_name
            and backend.replica_index == replica_index
            and backend.address == address
            and state in _VOUCHING_STATES
        ):
            return ""
    return f"node {node.pk}'s worker lists no backend of {model_name}#{replica_index} at {address}"


class RouteViewSet(viewsets.ViewSet):
    # POST /api/v1/models/{model}/route

    permission_classes = [IsFrontend]
    lookup_url_kwarg = "model"
    lookup_value_converter = "model_name"

    @extend_schema(
        tags=["routing"],
        summary="Route a request: lease a replica, loading the model if needed",
        description=(
            "Warm path: the least busy loaded replica on a healthy node is leased (its in-flight "
            "count is incremented); release the lease when the request is done. With `affinity_key`, the "
            "replica the key maps to (consistent hashing with bounded load) is preferred over the least busy "
            "one while its in-flight stays within the bound. Cold path: one "
            "load job per model across all frontends; this call waits up to `wait_seconds` for it, "
            "then answers 202 with the job (poll `GET /api/v1/load-jobs/{id}` or call route again "
            "after `Retry-After`). Options sent here are stored as the model's load info. Requests to "
            "the leased replica carry the answer's `model_identity` as `ModelIdentity`."
        ),
        parameters=[MODEL],
        request=RouteBodySerializer,
        responses={
            200: LeaseSerializer,
            202: OpenApiResponse(RouteAcceptedSerializer, description="still loading; `Retry-After` says when to ask"),
            **problems(
                400,
                409,
                503,
                description_400="`validation_error`, or `invalid_model_options`",
                description_409=ROUTE_409,
                description_503=ROUTE_503,
            ),
        },
    )
    @action(detail=True, methods=["post"])
    def route(self, request, model):
        model = s.validate_model_name(model)
        if request.data:
            body = RouteBodySerializer(data=request.data)
            body.is_valid(raise_exception=True)
            data = body.validated_data
        else:
            data = EMPTY_ROUTE_BODY  # what the serializer makes of {} (tests/router/test_api.py)
        try:
            result = router.route(
                model,
                backend_type=data.get("backend_type"),
                opts_blob=data["opts_blob"],
                wait=data.get("wait_seconds"),
                affinity_key=data.get("affinity_key"),
                warm_tried=request.META.get(WARM_ROUTE_MISSED) is True and data["opts_blob"] is None,
            )
        except router.RouterError as exc:
            raise RoutingProblem(exc, model) from exc
        if not result.ready:
            job = result.load_job
            headers = {
                "Retry-After": retry_after_seconds(),
                "Location": reverse("load-job", kwargs={"job_id": job.pk}),
            }
            return Response({"load_job": LoadJobSerializer(job).data}, status=status.HTTP_202_ACCEPTED, headers=headers)
        try:
            headers = {}
            if settings.CONTROLPLANE_NODE_HEADER:
                headers["X-Control-Plane-Node"] = node_header_value(result.node_name)
            return Response(_lease_answer(result), headers=headers)
        except BaseException:
            # The caller would never learn this lease: give its in-flight slot back at once
            # instead of holding the replica until the lease expires.
            Lease.objects.release(result.lease.pk)
            raise


@extend_schema(tags=["routing"])
class LeaseViewSet(viewsets.ViewSet):
    # /api/v1/leases/{lease_id}/release and /renew

    permission_classes = [IsFrontend]
    lookup_url_kwarg = "lease_id"
    lookup_value_converter = "uuid"

    @extend_schema(
        summary="Release a lease (idempotent)",
        description="Gives the replica's in-flight slot back. Releasing twice is harmless: `released` is false.",
        request=None,
        responses={200: LeaseReleaseSerializer},
    )
    @action(detail=True, methods=["post"])
    def release(self, request, lease_id):
        # One statement on PostgreSQL; released False: released before (by its holder or by
        # expiry), or unknown.
        outcome = Lease.objects.release_with_outcome(lease_id, now=timezone.now())
        if not outcome.exists:
            raise NotFound("No such lease.")
        return Response(_release_answer(lease_id, outcome.released, outcome.released_at))

    @extend_schema(
        summary="Extend a live lease (long requests, streams)",
        request=LeaseRenewBodySerializer,
        responses={
            200: LeaseRenewSerializer,
            **problems(409, description_409="`lease_released`: the lease was released or expired"),
        },
    )
    @action(detail=True, methods=["post"])
    def renew(self, request, lease_id):
        body = LeaseRenewBodySerializer(data=request.data if request.data else {})
        body.is_valid(raise_exception=True)
        ttl = body.validated_data.get("ttl_seconds") or settings.LEASE_TTL_SECONDS
        if not Lease.objects.filter(pk=lease_id).exists():
            raise NotFound("No such lease.")
        expires_at = Lease.objects.renew(lease_id, ttl=ttl)
        if expires_at is None:
            raise LeaseReleased()
        return Response(LeaseRenewSerializer({"pk": lease_id, "expires_at": expires_at}).data)


@extend_schema_view(retrieve=extend_schema(summary="A load job's state and progress"))
@extend_schema(tags=["routing"])
class LoadJobViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    # GET /api/v1/load-jobs/{job_id}: a cold load's progress, for the frontends that wait on it.

    permission_classes = [IsFrontend]
    serializer_class = LoadJobSerializer
    queryset = LoadJob.objects.all()
    lookup_url_kwarg = "job_id"
    lookup_value_converter = "uuid"

    def get_object(self):
        job = LoadJob.objects.filter(pk=self.kwargs["job_id"]).first()
        if job is None:
            raise NotFound("No such load job.")
        return job


@extend_schema_view(
    list=extend_schema(
        summary="List replica rows (operator)",
        description="Every replica row of every node, by model, node name and replica index unless `ordering` says.",
        parameters=[ordering_parameter(ReplicaFilter)],
    )
)
@extend_schema(tags=["routing"])
class ReplicaViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    # /api/v1/replicas: an operator lists the replica rows; a frontend reports a replica it
    # loaded itself (the only action a frontend key opens here).

    permission_classes = [IsFrontend]
    action_permission_classes = {"list": [IsOperator]}
    session_permissions = {"list": ("registry.view_nodemodel",)}
    serializer_class = ReplicaSerializer
    queryset = NodeModel.objects.order_by("model_name", "node__name", "replica_index", "pk")
    filterset_class = ReplicaFilter

    def get_permissions(self):
        return [permission() for permission in self.action_permission_classes.get(self.action, self.permission_classes)]

    @extend_schema(
        summary="Report a replica this frontend loaded itself",
        description=(
            "Records the replica row as loaded (upsert on node, model, replica index) with its "
            "per-replica load info, and stores the model's load info, so the reconciler can "
            "restore it later. Send `backend_type` and exactly one of `model_options_b64` or "
            "`model_options`.\n\n"
            "The node must vouch for the address before anything is stored: a node that serves the "
            "worker service must list (ListBackends) a running backend of this model "
            "and replica at exactly this address; a node without it (LocalAI's worker) must have "
            "registered the same host. Otherwise 409 `replica_not_vouched`, and the node must be "
            "healthy or draining (409 `replica_not_vouched` too)."
        ),
        request=ReplicaReportSerializer,
        responses={
            201: ReplicaSerializer,
            **problems(
                400,
                409,
                description_400="`validation_error`, `invalid_model_options`",
                description_409="`replica_not_vouched`",
            ),
        },
    )
    def create(self, request):
        body = ReplicaReportSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        node = Node.objects.filter(pk=data["node_id"]).first()
        if node is None:
            raise serializers.ValidationError({"node_id": ["Unknown node."]})
        refusal = _why_not_vouched(node, data["model_name"], data["replica_index"], data["address"])
        if refusal:
            logger.warning(
                "refused a replica report of %s#%d on node %s at %s: %s",
                data["model_name"],
                data["replica_index"],
                node.pk,
                data["address"],
                refusal,
            )
            raise ReplicaNotVouched(refusal)
        revision = data.get("revision")
        if (
            revision is not None
            and not ModelRevision.objects.filter(model_name=data["model_name"], number=revision).exists()
        ):
            raise serializers.ValidationError({"revision": ["The model has no such revision."]})
        replica = NodeModel.objects.report_loaded(
            node.pk,
            data["model_name"],
            data["replica_index"],
            address=data["address"],
            backend_type=data["backend_type"],
            opts_blob=data["opts_blob"],
            revision=revision,
        )
        if replica is None:
            raise serializers.ValidationError({"node_id": ["Unknown node."]})
        return Response(ReplicaSerializer(replica).data, status=status.HTTP_201_CREATED)
