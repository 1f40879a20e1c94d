"""Who is calling, for the APIs of every app: bearer parsing, API keys, staff sessions and the
permission classes built on them.

- **API key** (``cpk_...``, ``ApiKeyAuthentication``): frontends and operators on ``/api/v1/``;
  ``request.auth`` is the ``ApiKey``. Verified through a per-process cache
  (``ApiKey.objects.verify``): no database read per call; a revocation holds at once in the
  revoking process and within ``API_KEY_CACHE_SECONDS`` (5 s) in the others.
- Staff users may also call the API (JSON) with their Django admin session
  (``SessionAuthentication``), with the rights their Django permissions give them, never more:
  each operator view names the model permission of each of its actions in
  ``session_permissions`` (``registry.change_node`` to approve, drain, resume or label a node,
  ``registry.delete_node`` to delete one, ...), and every frontend view needs
  ``registry.use_frontend_api``. A superuser holds them all; an action a view does not map is
  refused to every session. API keys keep their roles.

The workers' credentials (node tokens, the fleet registration token) belong to the registry:
``registry/api/auth.py``.

Permissions (declare one on each view; the default of ``REST_FRAMEWORK`` is ``IsOperator``)::

    from core.auth import IsFrontend, IsOperator

    class RouteView(APIView):
        permission_classes = [IsFrontend]          # frontend or operator key, or a permitted staff session

No credential -> 401 ``not_authenticated``; a wrong/revoked/unknown one -> 401
``invalid_token``; a valid one without the right -> 403 ``permission_denied``. Secrets are never
logged or echoed.
"""

from __future__ import annotations

import logging

from rest_framework import authentication, exceptions, permissions

from core.models import ApiKey

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


class BearerAuthentication(authentication.BaseAuthentication):
    realm = "api"

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when credentials are missing or wrong.
        return f'Bearer realm="{self.realm}"'


class ApiKeyAuthentication(BearerAuthentication):
    """``Authorization: Bearer cpk_...``: an active API key (frontend or operator role)."""

    realm = "api"

    def authenticate(self, request):
        token = bearer_token(request)
        if token is None:
            return None
        key = ApiKey.objects.verify(token)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return Principal("api_key", key.name), key


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
