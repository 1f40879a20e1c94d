"""Views of the registry API: configuration plus one registry verb per action.

Every state change is a verb of ``registry.managers`` (``Node.objects.register``,
``mark_draining``, ``ModelLoadInfo.objects.upsert``, ...); views translate HTTP to a verb call
and a verb's "did not apply" answer to a problem. Errors are rendered by
``core.problems.exception_handler``.
"""

from __future__ import annotations

import logging

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.generics import get_object_or_404
from rest_framework.response import Response

from core import names
from core.auth import IsFrontend, IsOperator
from core.credentials import backend_token, worker_command_token
from core.schema import problems
from registry.managers import DrainedByOperator as DrainedByOperatorError
from registry.managers import NodeCredentialRequired as NodeCredentialRequiredError
from registry.managers import NodeTokenRequired as NodeTokenRequiredError
from registry.managers import TooManyLabels as TooManyLabelsError
from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeLabel, NodeModel

from . import serializers as s
from .auth import (
    FleetTokenNodesRefused,
    HasRegistrationToken,
    IsNodeSelf,
    NodeTokenAuthentication,
    NodeTokenClaim,
    RegistrationTokenAuthentication,
    actor,
    authenticate_claim_by_reading,
    calling_node,
    fleet_token_nodes_allowed,
)
from .filters import NodeFilter, ordering_parameter
from .problems import (
    DrainedByOperator,
    InvalidTransition,
    NodeCredentialRequired,
    NodeTokenRequired,
    NoLoadInfo,
    TooManyLabels,
)

logger = logging.getLogger(__name__)

# The canonical form of core.names: 1-255 characters, no control characters, no outer
# whitespace, slash-separated segments none of which is empty, "." or "..". Anything else is a 400.
MODEL_NAME_PATTERN = (
    r"^(?!\s)(?!.*\s$)(?!(.*/)?\.{1,2}(/|$))"
    r"[^/\x00-\x1F\x7F-\x9F\uD800-\uDFFF]+(/[^/\x00-\x1F\x7F-\x9F\uD800-\uDFFF]+)*$"
)
MODEL = OpenApiParameter(
    "model",
    type={"type": "string", "minLength": 1, "maxLength": s.MAX_MODEL_NAME, "pattern": MODEL_NAME_PATTERN},
    location=OpenApiParameter.PATH,
    description=(
        "model name; may contain slashes and dots (e.g. org/llama-3.1-8b.gguf). Canonical form: at most "
        "255 characters, no control characters, no leading or trailing whitespace or slash, no empty, `.` "
        "or `..` segment; percent-encode non-ASCII characters (UTF-8)"
    ),
)
MODEL_PROBLEMS = problems(400, description_400="Malformed model name (`validation_error`)")


def too_many_labels(exc: TooManyLabelsError) -> TooManyLabels:
    return TooManyLabels(str(exc), extra={"max_labels_per_node": exc.limit, "labels_after_write": exc.count})


def apply_transition(node_id, verb, target_status: str, action: str) -> str:
    """Run a conditional-update verb; returns the node's status afterwards.

    The verb answered False: the node is unknown (404), already in ``target_status`` (a no-op,
    so repeating a call is harmless), or in a status the transition does not apply to (409).
    A node's resume of an operator's drain is a 409 ``drained_by_operator``.
    """
    try:
        done = verb(node_id)
    except DrainedByOperatorError as exc:
        raise DrainedByOperator(str(exc), extra={"node_status": Node.Status.DRAINING}) from None
    if done:
        return target_status
    current = Node.objects.filter(pk=node_id).values_list("status", flat=True).first()
    if current is None:
        raise NotFound("No such node.")
    if current != target_status:
        raise InvalidTransition(f"Cannot {action} a node that is {current}.", extra={"node_status": current})
    return current


# --------------------------------------------------------------------------------------------
# Worker-facing: /api/node/...
# --------------------------------------------------------------------------------------------


class NodeRegistrationViewSet(viewsets.ViewSet):
    # POST /api/node/register: the one call a worker makes with the fleet registration token.

    authentication_classes = [RegistrationTokenAuthentication]
    permission_classes = [HasRegistrationToken]

    @extend_schema(
        tags=["node"],
        summary="Register a worker (or re-register a returning one)",
        description=(
            "A returning name keeps its id and comes back healthy, except that a pending node stays "
            "pending (only an operator's approval ends it) and a node an operator drained stays "
            "draining; its replica rows are deleted, the labels it sends replace the ones it sent "
            "last time (operator labels are kept) and, in `node_token` mode, a new `node_token` "
            "replaces the old one. New nodes are healthy when auto-approve is on, else pending. "
            "`max_replicas_per_model` 0 means 1. Unknown body fields are ignored.\n\n"
            'Credential modes: with `"auth_mode": "node_token"` the answer carries a per-node '
            "`node_token` for every later call of the node, and the fleet token is refused for it. "
            "Without it (LocalAI's worker) the node is bound to the fleet registration token: no "
            "`node_token`, later calls present the fleet token; 403 `fleet_token_nodes_refused` "
            "when CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES is off. A node that holds a per-node token "
            "cannot re-register without asking for one (409 `node_token_required`), nor without "
            "presenting its current node token in the `X-Node-Token` header (409 "
            "`node_credential_required`, nothing changed): the fleet token alone cannot take a node over. "
            "A node_token answer also carries `worker_token` (the only credential its worker gRPC service "
            "may accept) and `backend_token` (what its backends require)."
        ),
        request=s.NodeRegistrationSerializer,
        responses={
            201: s.NodeRegisteredSerializer,
            **problems(
                403,
                409,
                description_403="`fleet_token_nodes_refused`",
                description_409=(
                    "`node_token_required`, `node_credential_required`, `too_many_labels` (the node would "
                    "carry more than CONTROLPLANE_MAX_LABELS_PER_NODE labels), or `conflict` (a concurrent "
                    "registration)"
                ),
            ),
        },
    )
    def create(self, request):
        body = s.NodeRegistrationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if body.validated_data["auth_mode"] == Node.AuthMode.FLEET_TOKEN and not fleet_token_nodes_allowed():
            raise FleetTokenNodesRefused()
        try:
            registration = Node.objects.register(
                **body.validated_data,
                auto_approve=settings.CONTROLPLANE_AUTO_APPROVE,
                presented_node_token=request.headers.get("X-Node-Token") or None,
            )
        except NodeTokenRequiredError as exc:
            raise NodeTokenRequired(str(exc)) from None
        except TooManyLabelsError as exc:
            raise too_many_labels(exc) from None
        except NodeCredentialRequiredError:
            logger.warning(
                "refused re-registration of existing node %r from %s: no valid node token presented",
                body.validated_data["name"],
                request.META.get("REMOTE_ADDR", "?"),
            )
            raise NodeCredentialRequired() from None
        answer = s.NodeRegisteredSerializer(registration.node).data
        if registration.node_token:
            node_id = registration.node.pk
            answer["node_token"] = registration.node_token
            answer["worker_token"] = worker_command_token(node_id)
            answer["backend_token"] = backend_token(node_id)
        # The answer may carry a secret: no cache (browser, proxy) may keep a copy.
        return Response(answer, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


_NODE_CALL_PROBLEMS = problems(
    403,
    404,
    description_403=(
        "`node_token_mismatch` (another node's token), `fleet_token_not_accepted` (the fleet token for a node "
        "that holds a node token), `fleet_token_nodes_refused`"
    ),
    description_404="No such node (`not_found`)",
)


_GO_OFFLINE = {
    "summary": "Go offline (graceful shutdown, last step)",
    "description": (
        "The node's replica rows are deleted and its last heartbeat forgotten (it is exiting); "
        "the node row is kept so that re-registration restores it. A pending node stays "
        "pending (the answer says so): signing off and registering again never approves it. "
        "`DELETE /api/node/{id}` is the same call (LocalAI's route)."
    ),
    "request": None,
    "responses": {200: s.NodeStatusSerializer, **_NODE_CALL_PROBLEMS},
}


@extend_schema(tags=["node"])
class NodeSelfViewSet(viewsets.ViewSet):
    """Calls a worker makes about itself: authenticated by its own node token, or by the fleet
    registration token for a node registered in ``fleet_token`` mode (LocalAI's worker)."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [IsNodeSelf]
    lookup_url_kwarg = "node_id"
    lookup_value_converter = "uuid"
    # Set on the heartbeat only: its UPDATE checks the node token (NodeTokenAuthentication).
    node_token_checked_by_write = False

    @property
    def node(self) -> Node:
        return calling_node(self.request)  # IsNodeSelf guarantees it is the node of the URL

    @extend_schema(
        summary="Heartbeat with the node's free VRAM/RAM and disk",
        description=(
            "Unknown values are omitted; unknown fields are ignored (LocalAI's workers send what they "
            "measure). Never changes the node's status."
        ),
        request=s.HeartbeatSerializer,
        responses={200: s.HeartbeatAnswerSerializer, **_NODE_CALL_PROBLEMS},
    )
    @action(detail=True, methods=["post"], node_token_checked_by_write=True)
    def heartbeat(self, request, node_id):
        if isinstance(request.auth, NodeTokenClaim):
            answer = self._heartbeat_checked_by_write(request, node_id)
            if answer is not None:
                return answer
        body = s.HeartbeatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if not Node.objects.heartbeat(self.node.pk, **body.validated_data):
            raise NotFound("No such node.")
        return Response({"status": self.node.status, "address": self.node.address})

    def _heartbeat_checked_by_write(self, request, node_id) -> Response | None:
        """The UPDATE checks the token (one statement, no read). No row, or a body that is not
        a valid heartbeat: authenticate by reading first (the 401/403/404 of every node call
        come before any complaint about the body), then None lets the ordinary path answer."""
        try:
            data = request.data
        except Exception as unreadable:  # 400/413/415, once authenticated (DRF reads it as empty next time)
            authenticate_claim_by_reading(self, request)
            raise unreadable
        body = s.HeartbeatSerializer(data=data)
        if body.is_valid():
            answer = Node.objects.heartbeat_with_token(node_id, request.auth.token_hash, **body.validated_data)
            if answer is not None:
                return Response({"status": answer[0], "address": answer[1]})
        authenticate_claim_by_reading(self, request)
        return None

    @extend_schema(
        summary="Stop new work on this node (graceful shutdown, step 1)",
        description=(
            "Repeating it is harmless (so is draining a node an operator already drained); a pending "
            "or offline node cannot drain (409 `invalid_transition`)."
        ),
        request=None,
        responses={200: s.NodeStatusSerializer, **problems(409), **_NODE_CALL_PROBLEMS},
    )
    @action(detail=True, methods=["post"])
    def drain(self, request, node_id):
        def drain(pk):
            return Node.objects.mark_draining(pk, by=Node.DrainedBy.NODE)

        return Response({"status": apply_transition(self.node.pk, drain, Node.Status.DRAINING, "drain")})

    @extend_schema(
        summary="Accept work again after the node's own drain",
        description=(
            "Lifts a drain this node set. A drain an operator set is lifted by an operator only "
            "(409 `drained_by_operator`); a pending node is approved by an operator only (409 "
            "`invalid_transition`)."
        ),
        request=None,
        responses={
            200: s.NodeStatusSerializer,
            **problems(409, description_409="`drained_by_operator`, `invalid_transition`"),
            **_NODE_CALL_PROBLEMS,
        },
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, node_id):
        def resume(pk):
            return Node.objects.resume(pk, by=Node.DrainedBy.NODE)

        return Response({"status": apply_transition(self.node.pk, resume, Node.Status.HEALTHY, "resume")})

    @extend_schema(**_GO_OFFLINE)
    @action(detail=True, methods=["post"])
    def deregister(self, request, node_id):
        if not Node.objects.mark_offline(self.node.pk, forget_heartbeat=True):
            raise NotFound("No such node.")
        return Response({"status": Node.objects.filter(pk=self.node.pk).values_list("status", flat=True).first()})

    @extend_schema(**_GO_OFFLINE)
    def destroy(self, request, node_id):
        return self.deregister(request, node_id)

    @extend_schema(
        summary="This node's replica rows",
        description="Polled by a draining worker until the in-flight sum is 0. Not paginated.",
        responses={200: s.NodeReplicaSerializer(many=True), **_NODE_CALL_PROBLEMS},
    )
    @action(detail=True, methods=["get"])
    def models(self, request, node_id):
        rows = NodeModel.objects.filter(node_id=self.node.pk).order_by("model_name", "replica_index")
        return Response(s.NodeReplicaSerializer(rows, many=True).data)


# --------------------------------------------------------------------------------------------
# Operator: /api/v1/nodes...
# --------------------------------------------------------------------------------------------


_NODE_ACTION = {"request": None, "responses": {200: s.NodeSerializer, **problems(409)}}
_LABELS_WRITE = {
    "request": s.NodeLabelsSerializer,
    "responses": {200: s.NodeLabelsSerializer, **problems(409, description_409="`too_many_labels`")},
}


@extend_schema_view(
    list=extend_schema(
        summary="List nodes (by name) with labels and load", parameters=[ordering_parameter(NodeFilter)]
    ),
    retrieve=extend_schema(summary="One node with labels and load"),
    destroy=extend_schema(summary="Delete a node, its labels and replica rows (hard delete)"),
)
@extend_schema(tags=["nodes"])
class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Fleet administration (operator key, or a staff session with the permission below)."""

    permission_classes = [IsOperator]
    _change = ("registry.change_node",)
    session_permissions = {
        "list": ("registry.view_node",),
        "retrieve": ("registry.view_node",),
        "destroy": ("registry.delete_node",),
        "approve": _change,
        "drain": _change,
        "resume": _change,
        "replace_labels": _change,
        "merge_labels": _change,
        "remove_label": _change,
        "set_max_replicas": _change,
        "reset_max_replicas": _change,
    }
    serializer_class = s.NodeSerializer
    queryset = Node.objects.with_load().prefetch_related("labels")
    filterset_class = NodeFilter
    ordering_fields = ["name", "status", "created_at", "last_heartbeat"]
    ordering = ["name"]
    lookup_field = "pk"
    lookup_url_kwarg = "node_id"
    lookup_value_converter = "uuid"

    def destroy(self, request, node_id):
        if not Node.objects.deregister(node_id):
            raise NotFound("No such node.")
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _node_answer(self, node_id):
        return Response(self.get_serializer(get_object_or_404(self.get_queryset(), pk=node_id)).data)

    def _transition(self, node_id, verb, target_status, action):
        apply_transition(node_id, verb, target_status, action)
        return self._node_answer(node_id)

    @extend_schema(summary="Approve a pending node", **_NODE_ACTION)
    @action(detail=True, methods=["post"])
    def approve(self, request, node_id):
        return self._transition(node_id, Node.objects.approve, Node.Status.HEALTHY, "approve")

    @extend_schema(
        summary="Drain a node: no new work, in-flight work finishes",
        description=(
            "An operator's drain: the node cannot lift it (its `/resume` is a 409 `drained_by_operator`), "
            "and it survives the worker's restarts and outages until an operator resumes the node. "
            "A pending node is approved, not drained (409)."
        ),
        **_NODE_ACTION,
    )
    @action(detail=True, methods=["post"], url_name="admin-drain")
    def drain(self, request, node_id):
        def drain(pk):
            return Node.objects.mark_draining(pk, by=Node.DrainedBy.OPERATOR)

        return self._transition(node_id, drain, Node.Status.DRAINING, "drain")

    @extend_schema(summary="Resume a draining node (whoever drained it)", **_NODE_ACTION)
    @action(detail=True, methods=["post"], url_name="admin-resume")
    def resume(self, request, node_id):
        def resume(pk):
            return Node.objects.resume(pk, by=Node.DrainedBy.OPERATOR)

        return self._transition(node_id, resume, Node.Status.HEALTHY, "resume")

    def _write_labels(self, request, node_id, verb):
        """Validate a labels body, apply ``verb`` (replace or merge) to this node, answer its labels."""
        body = s.NodeLabelsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if not Node.objects.filter(pk=node_id).exists():
            raise NotFound("No such node.")
        try:
            verb(node_id, body.validated_data["labels"])
        except TooManyLabelsError as exc:
            raise too_many_labels(exc) from None
        return Response({"labels": NodeLabel.objects.as_dict(node_id)})

    @extend_schema(summary="Replace the node's labels", **_LABELS_WRITE)
    @action(detail=True, methods=["put"], url_path="labels", url_name="labels")
    def replace_labels(self, request, node_id):
        return self._write_labels(request, node_id, NodeLabel.objects.replace)

    @extend_schema(
        summary="Merge labels into the node's labels (other keys kept)",
        description="The node may carry at most CONTROLPLANE_MAX_LABELS_PER_NODE labels (409 `too_many_labels`).",
        **_LABELS_WRITE,
    )
    @replace_labels.mapping.patch
    def merge_labels(self, request, node_id):
        return self._write_labels(request, node_id, NodeLabel.objects.merge)

    @extend_schema(
        summary="Remove one label",
        parameters=[OpenApiParameter("key", type=str, location=OpenApiParameter.PATH, description="label key")],
        request=None,
        responses={204: None},
    )
    @action(detail=True, methods=["delete"], url_path="labels/<path:key>", url_name="label")
    def remove_label(self, request, node_id, key):
        if not Node.objects.filter(pk=node_id).exists():
            raise NotFound("No such node.")
        # A key no label can have (too long, control characters) is not looked up: PostgreSQL
        # refuses NUL.
        storable = not names.name_errors(key, what="Label key", trimmed=False)
        if not storable or not NodeLabel.objects.remove(node_id, key):
            raise NotFound(f"The node has no label {key!r}.")
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Set the node's replica slots per model (kept across re-registrations)",
        request=s.MaxReplicasSerializer,
        responses={200: s.NodeSerializer},
    )
    @action(detail=True, methods=["put"], url_path="max-replicas-per-model", url_name="max-replicas")
    def set_max_replicas(self, request, node_id):
        body = s.MaxReplicasSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if not Node.objects.set_max_replicas_per_model(node_id, body.validated_data["max_replicas_per_model"]):
            raise NotFound("No such node.")
        return self._node_answer(node_id)

    @extend_schema(
        summary="Back to the replica slots the worker reports", request=None, responses={200: s.NodeSerializer}
    )
    @set_max_replicas.mapping.delete
    def reset_max_replicas(self, request, node_id):
        if not Node.objects.reset_max_replicas_per_model(node_id):
            raise NotFound("No such node.")
        return self._node_answer(node_id)


# --------------------------------------------------------------------------------------------
# Operator: /api/v1/scheduling, /api/v1/models/{model}/scheduling
# --------------------------------------------------------------------------------------------


class _SchedulingConfigs:
    permission_classes = [IsOperator]
    serializer_class = s.SchedulingConfigSerializer
    queryset = ModelSchedulingConfig.objects.order_by("model_name")


@extend_schema_view(list=extend_schema(summary="List scheduling configs (by model name)"))
@extend_schema(tags=["scheduling"])
class SchedulingConfigViewSet(_SchedulingConfigs, mixins.ListModelMixin, viewsets.GenericViewSet):
    # GET /api/v1/scheduling: every model's scheduling config.

    session_permissions = {"list": ("registry.view_modelschedulingconfig",)}


@extend_schema(tags=["scheduling"], parameters=[MODEL])
class ModelSchedulingViewSet(_SchedulingConfigs, viewsets.GenericViewSet):
    # /api/v1/models/{model}/scheduling: one model's scheduling config.

    session_permissions = {
        "config": ("registry.view_modelschedulingconfig",),
        # An upsert: it may create the row or change it.
        "upsert_config": ("registry.add_modelschedulingconfig", "registry.change_modelschedulingconfig"),
        "delete_config": ("registry.delete_modelschedulingconfig",),
    }
    lookup_field = "model_name"
    lookup_url_kwarg = "model"
    lookup_value_converter = "model_name"

    def get_object(self):
        s.validate_model_name(self.kwargs["model"])
        return super().get_object()

    @extend_schema(
        summary="A model's scheduling config", responses={200: s.SchedulingConfigSerializer, **MODEL_PROBLEMS}
    )
    @action(detail=True, methods=["get"], url_path="scheduling", url_name="scheduling")
    def config(self, request, model):
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(
        summary="Create or replace a model's scheduling config",
        description=(
            "`min_replicas >= 0`, `max_replicas >= 0` (0 = unlimited), `min <= max` when max > 0; "
            "`node_selector` labels must all match. The circuit breaker's columns are kept."
        ),
        request=s.SchedulingConfigWriteSerializer,
        responses={200: s.SchedulingConfigSerializer},
    )
    @config.mapping.put
    def upsert_config(self, request, model):
        model = s.validate_model_name(model)
        body = s.SchedulingConfigWriteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        config = ModelSchedulingConfig.objects.upsert(model, **body.validated_data, created_by=actor(request))
        return Response(self.get_serializer(config).data)

    @extend_schema(summary="Delete a model's scheduling config", responses={204: None, **MODEL_PROBLEMS})
    @config.mapping.delete
    def delete_config(self, request, model):
        if not ModelSchedulingConfig.objects.remove(self.get_object().model_name):
            raise NotFound()
        return Response(status=status.HTTP_204_NO_CONTENT)


# --------------------------------------------------------------------------------------------
# Frontend: /api/v1/models/{model}/load-info
# --------------------------------------------------------------------------------------------


@extend_schema(tags=["load-info"], parameters=[MODEL])
class ModelLoadInfoViewSet(viewsets.ViewSet):
    """The per-model load recipe that outlives every replica row (frontend key or better)."""

    permission_classes = [IsFrontend]
    lookup_url_kwarg = "model"
    lookup_value_converter = "model_name"

    @extend_schema(
        summary="A model's load info",
        description="The per-model row, else (legacy) the first loaded replica row with a blob; `source` says which.",
        responses={
            200: s.LoadInfoSerializer,
            **problems(404, description_404="No load info for this model (`no_load_info`)"),
            **MODEL_PROBLEMS,
        },
    )
    @action(detail=True, methods=["get"], url_path="load-info", url_name="load-info")
    def load_info(self, request, model):
        model = s.validate_model_name(model)
        try:
            info = ModelLoadInfo.objects.for_model(model)
        except ModelLoadInfo.DoesNotExist:
            raise NoLoadInfo(f"No load info is stored for model {model!r}.", extra={"model": model}) from None
        return Response(s.LoadInfoSerializer(info).data)

    @extend_schema(
        summary="Store a model's load info (last write wins)",
        description=(
            "Send `backend_type` and exactly one of `model_options_b64` (a serialized "
            "`backend.ModelOptions`, stored byte for byte so fields unknown to this server "
            "survive) or `model_options` (its JSON form, fields by proto name). A blob or JSON "
            "that is not a ModelOptions is a 400 `invalid_model_options`."
        ),
        request=s.LoadInfoWriteSerializer,
        responses={
            200: s.LoadInfoSerializer,
            **problems(400, description_400="`validation_error` (body or model name), or `invalid_model_options`"),
        },
    )
    @load_info.mapping.put
    def store_load_info(self, request, model):
        model = s.validate_model_name(model)
        body = s.LoadInfoWriteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        info = ModelLoadInfo.objects.upsert(
            model, body.validated_data["backend_type"], body.validated_data["opts_blob"], created_by=actor(request)
        )
        return Response(s.LoadInfoSerializer(info).data)
