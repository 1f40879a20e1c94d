"""Who is calling: DRF authentication classes and the permission classes built on them.

Three bearer credentials, all sent as ``Authorization: Bearer <secret>``:

- **API key** (``cpk_...``, ``ApiKeyAuthentication``): frontends and operators on ``/api/v1/``;
  ``request.auth`` is the ``ApiKey``.
- **Node token** (``cpn_...``, ``NodeTokenAuthentication``): issued by ``Node.objects.register``
  and valid only for ``/api/node/<its own id>/...``; ``request.auth`` is the ``Node``.
- **Registration token** (``RegistrationTokenAuthentication``): the fleet-wide secret in
  ``settings.CONTROLPLANE_REGISTRATION_TOKEN`` for ``POST /api/node/register``; the LocalAI
  body field ``token`` is accepted too. ``request.auth`` is ``REGISTRATION``.

Staff users may also call the API (JSON) with their Django admin session (``SessionAuthentication``).

Permissions (declare one on each view; the default of ``REST_FRAMEWORK`` is ``IsOperator``)::

    from controlplane.auth import IsFrontend, IsOperator, IsNodeSelf, HasRegistrationToken

    class RouteView(APIView):
        permission_classes = [IsFrontend]          # frontend or operator key, or staff session

No credential -> 401 ``not_authenticated``; a wrong/revoked/unknown one -> 401
``invalid_token``; a valid one without the right -> 403 ``permission_denied``; another node's
token -> 403 ``node_token_mismatch``. Secrets are never logged or echoed.
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
    """``Authorization: Bearer cpn_...`` on ``/api/node/<node_id>/...``.

    The node named by the URL is read by primary key and the token's hash compared with its
    ``token_hash`` in constant time. Only when that fails is the token looked up by hash, to
    tell "another node's token" (authenticated as that node; ``IsNodeSelf`` then answers 403
    ``node_token_mismatch``) from "no such token" (401 ``invalid_token``).
    """

    realm = "node"

    def authenticate(self, request):
        from registry.models import Node  # the registry app imports controlplane, not the reverse

        token = bearer_token(request)
        if token is None:
            return None
        node_id = (getattr(request, "parser_context", None) or {}).get("kwargs", {}).get("node_id")
        if node_id is not None:
            node = Node.objects.filter(pk=node_id).first()
            if node is not None and token_matches(token, node.token_hash):
                return Principal("node", node.name), node
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


class IsFrontend(permissions.BasePermission):
    """Frontend endpoints: an API key of role ``frontend`` or ``operator``, or a staff session."""

    message = "This endpoint needs a frontend or operator API key."

    def has_permission(self, request, view):
        return _api_key_role(request) in (ApiKey.Role.FRONTEND, ApiKey.Role.OPERATOR) or _is_staff_session(request)


class IsOperator(permissions.BasePermission):
    """Operator endpoints: an API key of role ``operator``, or a staff session."""

    message = "This endpoint needs an operator API key."

    def has_permission(self, request, view):
        return _api_key_role(request) == ApiKey.Role.OPERATOR or _is_staff_session(request)


class IsNodeSelf(permissions.BasePermission):
    """Node endpoints: the node token of the node named by the URL's ``node_id``."""

    message = "This node token belongs to another node."
    code = "node_token_mismatch"

    def has_permission(self, request, view):
        from registry.models import Node

        node = request.auth
        return isinstance(node, Node) and str(node.pk) == str(view.kwargs.get("node_id"))


class HasRegistrationToken(permissions.BasePermission):
    """``POST /api/node/register``: the registration token (or open registration)."""

    message = "Registration needs the fleet's registration token."

    def has_permission(self, request, view):
        return request.auth is REGISTRATION
