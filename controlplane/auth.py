"""Who is calling: DRF authentication classes and the permission classes built on them.

Bearer credentials, all sent as ``Authorization: Bearer <secret>``:

- **API key** (``cpk_...``, ``ApiKeyAuthentication``): frontends and operators on ``/api/v1/``;
  ``request.auth`` is the ``ApiKey``.
- **Node token** (``cpn_...``, ``NodeTokenAuthentication``): issued by ``Node.objects.register``
  to a node that asked for one (``auth_mode = node_token``) and valid only for
  ``/api/node/<its own id>/...``; ``request.auth`` is the ``Node``.
- **Fleet token on a node call** (``NodeTokenAuthentication`` too): LocalAI's own workers never
  ask for a per-node token and present the registration token on every call. It drives only a
  node registered that way (``auth_mode = fleet_token``), and only while
  ``CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES`` is on; ``request.auth`` is a ``FleetTokenCredential``
  naming the URL's node, and ``IsNodeSelf`` decides.
- **Registration token** (``RegistrationTokenAuthentication``): the fleet-wide secret in
  ``settings.CONTROLPLANE_REGISTRATION_TOKEN`` for ``POST /api/node/register``; the LocalAI
  body field ``token`` is accepted too. ``request.auth`` is ``REGISTRATION``.

Staff users may also call the API (JSON) with their Django admin session (``SessionAuthentication``),
with the rights their Django permissions give them, never more: each operator view names the
model permission of each of its actions in ``session_permissions`` (``registry.change_node`` to
approve, drain, resume or label a node, ``registry.delete_node`` to delete one, ...), and every
frontend view needs ``registry.use_frontend_api``. A superuser holds them all; an action a view
does not map is refused to every session. API keys keep their roles.

Permissions (declare one on each view; the default of ``REST_FRAMEWORK`` is ``IsOperator``)::

    from controlplane.auth import IsFrontend, IsOperator, IsNodeSelf, HasRegistrationToken

    class RouteView(APIView):
        permission_classes = [IsFrontend]          # frontend or operator key, or a permitted staff session

No credential -> 401 ``not_authenticated``; a wrong/revoked/unknown one -> 401
``invalid_token``; a valid one without the right -> 403 ``permission_denied``; another node's
token -> 403 ``node_token_mismatch``; the fleet token on a node that holds a per-node token ->
403 ``fleet_token_not_accepted``; the fleet token on a fleet-token node while such nodes are
refused -> 403 ``fleet_token_nodes_refused``; the fleet token on an unknown node id -> 404
``not_found`` (LocalAI's answer). Secrets are never logged or echoed.
"""

from __future__ import annotations

import logging

from django.conf import settings
from rest_framework import authentication, exceptions, permissions

from controlplane.models import ApiKey
from controlplane.tokens import hash_token, secret_matches, token_matches

logger = logging.getLogger(__name__)


class Principal:
    """``request.user`` for a bearer credential: authenticated, never staff, not a Django user."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    is_active = True
    pk = None
    id = None

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name
        self.username = f"{kind}:{name}"

    def __str__(self):
        return self.username

    def get_username(self) -> str:
        return self.username


class _RegistrationCredential:
    """``request.auth`` of a request that presented the registration token (or of an open
    registration when no token is configured and open registration is allowed)."""

    def __repr__(self):
        return "<registration credential>"


REGISTRATION = _RegistrationCredential()


class FleetTokenCredential:
    """``request.auth`` of a node call that presented the fleet registration token: ``node`` is
    the node named by the URL (None when there is none). Whether that node may be driven with
    the fleet token is ``IsNodeSelf``'s decision, not the authenticator's."""

    def __init__(self, node):
        self.node = node

    def __repr__(self):
        return f"<fleet token for node {getattr(self.node, 'pk', None)}>"


# PermissionDenied subclasses (not ProblemError: controlplane.problems imports DRF's views,
# which import this module through REST_FRAMEWORK's settings); the problem handler keeps their
# codes.
class FleetTokenNotAccepted(exceptions.PermissionDenied):
    """The fleet token was presented for a node that holds a per-node token: such a node is
    driven with its own token only, so a leaked fleet token cannot drain or deregister it."""

    default_code = "fleet_token_not_accepted"
    default_detail = "This node authenticates with its own node token; the fleet registration token is refused."


class FleetTokenNodesRefused(exceptions.PermissionDenied):
    """``CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES`` is off (or no registration token is configured):
    nodes bound to the fleet token may neither register nor call."""

    default_code = "fleet_token_nodes_refused"
    default_detail = (
        "This control plane refuses nodes that authenticate with the fleet registration token; register "
        'with "auth_mode": "node_token" and use the per-node token.'
    )


def bearer_token(request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None when there is no bearer
    header; raises AuthenticationFailed for a malformed one."""
    parts = authentication.get_authorization_header(request).split()
    if not parts or parts[0].lower() != b"bearer":
        return None
    if len(parts) != 2:
        raise exceptions.AuthenticationFailed("Malformed Authorization header: expected 'Bearer <token>'.")
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed("Malformed bearer token.") from None


class _BearerAuthentication(authentication.BaseAuthentication):
    realm = "api"

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when credentials are missing or wrong.
        return f'Bearer realm="{self.realm}"'


class ApiKeyAuthentication(_BearerAuthentication):
    """``Authorization: Bearer cpk_...``: an active API key (frontend or operator role)."""

    realm = "api"

    def authenticate(self, request):
        token = bearer_token(request)
        if token is None:
            return None
        key = ApiKey.objects.authenticate(token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return Principal("api_key", key.name), key


class NodeTokenAuthentication(_BearerAuthentication):
    """``Authorization: Bearer <node token or fleet token>`` on ``/api/node/<node_id>/...``.

    The node named by the URL is read by primary key and the token's hash compared with its
    ``token_hash`` in constant time. Then the fleet registration token is tried (LocalAI's
    workers send it on every call): ``request.auth`` becomes a ``FleetTokenCredential`` for the
    URL's node. Only when both fail is the token looked up by hash, to tell "another node's
    token" (authenticated as that node; ``IsNodeSelf`` then answers 403 ``node_token_mismatch``)
    from "no such token" (401 ``invalid_token``).
    """

    realm = "node"

    def authenticate(self, request):
        from registry.models import Node  # the registry app imports controlplane, not the reverse

        token = bearer_token(request)
        if token is None:
            return None
        node_id = (getattr(request, "parser_context", None) or {}).get("kwargs", {}).get("node_id")
        node = Node.objects.filter(pk=node_id).first() if node_id is not None else None
        if node is not None and token_matches(token, node.token_hash):
            return Principal("node", node.name), node
        if node_id is not None and secret_matches(token, settings.CONTROLPLANE_REGISTRATION_TOKEN):
            return Principal("fleet_token", node.name if node is not None else str(node_id)), FleetTokenCredential(node)
        other = Node.objects.filter(token_hash=hash_token(token)).first()
        if other is not None and token_matches(token, other.token_hash):
            return Principal("node", other.name), other
        raise exceptions.AuthenticationFailed("Invalid node token; register again to get a new one.")


class RegistrationTokenAuthentication(_BearerAuthentication):
    """The fleet's registration token, from the bearer header or (LocalAI workers) the body
    field ``token``; compared in constant time. When no token is configured and
    ``CONTROLPLANE_ALLOW_OPEN_REGISTRATION`` is on, every caller may register."""

    realm = "registration"

    def authenticate(self, request):
        expected = settings.CONTROLPLANE_REGISTRATION_TOKEN
        if not expected:
            if settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION:
                return Principal("registration", "open"), REGISTRATION
            raise exceptions.AuthenticationFailed("Registration is closed: no registration token is configured.")
        presented = bearer_token(request)
        if presented is None:
            presented = self._body_token(request)
        if presented is None:
            return None
        if not secret_matches(presented, expected):
            raise exceptions.AuthenticationFailed("Invalid registration token.")
        return Principal("registration", "token"), REGISTRATION

    @staticmethod
    def _body_token(request) -> str | None:
        data = request.data  # parse errors and oversized bodies surface as their own problems
        token = data.get("token") if hasattr(data, "get") else None
        return token if isinstance(token, str) and token else None


# --- permissions -----------------------------------------------------------------------------


def _is_staff_session(request) -> bool:
    user = request.user
    return bool(user and user.is_authenticated and user.is_active and user.is_staff) and request.auth is None


def _api_key_role(request) -> str | None:
    return request.auth.role if isinstance(request.auth, ApiKey) else None


# The permission a staff session needs on every frontend endpoint (declared on registry.Lease).
FRONTEND_API_PERMISSION = "registry.use_frontend_api"


def session_action(request, view) -> str:
    """The name under which a view's ``session_permissions`` lists the current request: the
    ViewSet action (``approve``, ``destroy``, ...), else the HTTP method (``get``, ``post``);
    HEAD and OPTIONS read like GET."""
    action = getattr(view, "action", None)
    if action:
        return action
    method = request.method.lower()
    return "get" if method in ("head", "options") else method


def session_permissions_for(request, view) -> tuple[str, ...] | None:
    """The Django permissions a staff session needs for this request to an operator view, or
    None when the view does not map the action (then no session may call it)."""
    mapping = getattr(view, "session_permissions", None) or {}
    needed = mapping.get(session_action(request, view))
    return tuple(needed) if needed is not None else None


def _session_holds(request, needed: tuple[str, ...] | None) -> bool:
    return _is_staff_session(request) and needed is not None and request.user.has_perms(needed)


class IsFrontend(permissions.BasePermission):
    """Frontend endpoints: an API key of role ``frontend`` or ``operator``, or a staff session
    whose user holds ``registry.use_frontend_api``."""

    message = "This endpoint needs a frontend or operator API key (or the permission to use the frontend API)."

    def has_permission(self, request, view):
        if _api_key_role(request) in (ApiKey.Role.FRONTEND, ApiKey.Role.OPERATOR):
            return True
        return _session_holds(request, (FRONTEND_API_PERMISSION,))


class IsOperator(permissions.BasePermission):
    """Operator endpoints: an API key of role ``operator``, or a staff session whose user holds
    the Django permissions the view maps to this action (``view.session_permissions``: action
    or method name -> permissions), the same ones the admin asks for the same change."""

    message = "This endpoint needs an operator API key (or the Django permission for this action)."

    def has_permission(self, request, view):
        if _api_key_role(request) == ApiKey.Role.OPERATOR:
            return True
        return _session_holds(request, session_permissions_for(request, view))


def fleet_token_nodes_allowed() -> bool:
    """Whether nodes bound to the fleet token may register and call: the setting is on and a
    registration token exists (without one, such a node could never authenticate again)."""
    return bool(settings.CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES and settings.CONTROLPLANE_REGISTRATION_TOKEN)


class IsNodeSelf(permissions.BasePermission):
    """Node endpoints: the node token of the node named by the URL's ``node_id``, or the fleet
    token for a node registered in ``fleet_token`` mode (while such nodes are allowed)."""

    message = "This node token belongs to another node."
    code = "node_token_mismatch"

    def has_permission(self, request, view):
        from registry.models import Node

        credential = request.auth
        if isinstance(credential, FleetTokenCredential):
            node = credential.node
            if node is None:
                raise exceptions.NotFound("No such node.")
            if node.auth_mode != Node.AuthMode.FLEET_TOKEN:
                raise FleetTokenNotAccepted()
            if not fleet_token_nodes_allowed():
                raise FleetTokenNodesRefused()
            return True
        return isinstance(credential, Node) and str(credential.pk) == str(view.kwargs.get("node_id"))


def calling_node(request):
    """The node a request to ``/api/node/<node_id>/...`` acts for, once ``IsNodeSelf`` passed."""
    credential = request.auth
    return credential.node if isinstance(credential, FleetTokenCredential) else credential


class HasRegistrationToken(permissions.BasePermission):
    """``POST /api/node/register``: the registration token (or open registration)."""

    message = "Registration needs the fleet's registration token."

    def has_permission(self, request, view):
        return request.auth is REGISTRATION
