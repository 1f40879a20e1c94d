"""Who is calling the worker-facing API (``/api/node/``): node tokens and the fleet token.

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

Heartbeats skip the authenticating read: the token's hash
becomes a ``NodeTokenClaim`` that the heartbeat's UPDATE checks itself (``WHERE id = ... AND
token_hash = ...``); only when that UPDATE finds no row does the view authenticate by reading,
to answer the same problem as any other node call.

Another node's token -> 403 ``node_token_mismatch``; the fleet token on a node that holds a
per-node token -> 403 ``fleet_token_not_accepted``; the fleet token on a fleet-token node while
such nodes are refused -> 403 ``fleet_token_nodes_refused``; the fleet token on an unknown node
id -> 404 ``not_found`` (LocalAI's answer). Secrets are never logged or echoed.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import exceptions, permissions

from core.auth import BearerAuthentication, Principal, bearer_token
from core.tokens import hash_token, secret_matches, token_matches
from registry.models import Node


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


# PermissionDenied subclasses (not ProblemError: core.problems imports DRF's views, which
# import the authentication classes through REST_FRAMEWORK's settings); the problem handler
# keeps their codes.
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


class NodeTokenClaim:
    """``request.auth`` of a heartbeat presenting a node token that nothing has checked yet:
    the URL's ``node_id`` and the presented token's hash. The write that acts on it checks it
    (``Node.objects.heartbeat_with_token``); only a view that sets
    ``node_token_checked_by_write`` gets one."""

    def __init__(self, node_id, token_hash: str):
        self.node_id = node_id
        self.token_hash = token_hash

    def __repr__(self):
        return f"<unchecked node token for node {self.node_id}>"


class NodeTokenAuthentication(BearerAuthentication):
    """``Authorization: Bearer <node token or fleet token>`` on ``/api/node/<node_id>/...``.

    The node named by the URL is read by primary key and the token's hash compared with its
    ``token_hash`` in constant time. Then the fleet registration token is tried (LocalAI's
    workers send it on every call): ``request.auth`` becomes a ``FleetTokenCredential`` for the
    URL's node. Only when both fail is the token looked up by hash, to tell "another node's
    token" (authenticated as that node; ``IsNodeSelf`` then answers 403 ``node_token_mismatch``)
    from "no such token" (401 ``invalid_token``).

    On a view whose ``node_token_checked_by_write`` is set (the heartbeat, the hottest call:
    every node, every 10 s) the read is skipped: a bearer that is not the fleet token becomes a
    ``NodeTokenClaim`` and the view's UPDATE matches the row on id *and* token hash, so the
    write itself checks the credential on the committed row. (The heartbeat's lean path,
    ``registry/api/heartbeat.py``, also remembers tokens the database accepted, to coalesce
    steady heartbeats; its batched write checks each token hash again, so a rotated token never
    writes: ``registry/heartbeat_flush.py``. This view never uses that memory.) The fleet token
    (LocalAI's workers) needs the node's ``auth_mode``, so it always takes the reading path.
    """

    realm = "node"

    def authenticate(self, request):
        token = bearer_token(request)
        if token is None:
            return None
        context = getattr(request, "parser_context", None) or {}
        node_id = context.get("kwargs", {}).get("node_id")
        if (
            getattr(context.get("view"), "node_token_checked_by_write", False)
            and node_id is not None
            and not secret_matches(token, settings.CONTROLPLANE_REGISTRATION_TOKEN)
        ):
            return Principal("node", str(node_id)), NodeTokenClaim(node_id, hash_token(token))
        return self.authenticate_by_reading(token, node_id)

    def authenticate_by_reading(self, token: str, node_id):
        node = Node.objects.filter(pk=node_id).first() if node_id is not None else None
        if node is not None and token_matches(token, node.token_hash):
            return Principal("node", node.name), node
        if node_id is not None and secret_matches(token, settings.CONTROLPLANE_REGISTRATION_TOKEN):
            return Principal("fleet_token", node.name if node is not None else str(node_id)), FleetTokenCredential(node)
        other = Node.objects.filter(token_hash=hash_token(token)).first()
        if other is not None and token_matches(token, other.token_hash):
            return Principal("node", other.name), other
        raise exceptions.AuthenticationFailed("Invalid node token; register again to get a new one.")


class RegistrationTokenAuthentication(BearerAuthentication):
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
        if isinstance(credential, NodeTokenClaim):
            return str(credential.node_id) == str(view.kwargs.get("node_id"))
        return isinstance(credential, Node) and str(credential.pk) == str(view.kwargs.get("node_id"))


def authenticate_claim_by_reading(view, request) -> None:
    """Replace an unchecked ``NodeTokenClaim`` by what ``NodeTokenAuthentication`` finds by
    reading (raising its 401), then check the view's permissions again (403/404)."""
    authentication = NodeTokenAuthentication().authenticate_by_reading(bearer_token(request), view.kwargs["node_id"])
    request.user, request.auth = authentication
    view.check_permissions(request)


def calling_node(request):
    """The node a request to ``/api/node/<node_id>/...`` acts for, once ``IsNodeSelf`` passed."""
    credential = request.auth
    return credential.node if isinstance(credential, FleetTokenCredential) else credential


class HasRegistrationToken(permissions.BasePermission):
    """``POST /api/node/register``: the registration token (or open registration)."""

    message = "Registration needs the fleet's registration token."

    def has_permission(self, request, view):
        return request.auth is REGISTRATION


def actor(request) -> str:
    """Who made a change, for the revision history (``api_key:<name>`` or a staff username)."""
    user = getattr(request, "user", None)
    return str(user.get_username()) if user is not None and user.is_authenticated else ""
