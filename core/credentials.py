"""The credentials the control plane derives per node (it stores none of them in plain).

* ``node_token(node_id)`` (``cpn_...``): the node's own REST credential (heartbeat, drain,
  deregister, models, and ``X-Node-Token`` on re-registration), for ``node_token`` nodes. Its
  sha256 is stored (``Node.token_hash``) for authentication by lookup. Derived rather than
  random so that it survives a database restore: a worker that registered after the backup
  presents the same token the restored row's hash was made from (the restore drill,
  docs/resilience.md).

* ``backend_token(node_id)`` (``cpb_...``), the **data-plane credential**: the bearer token a
  node's backends require (the worker starts them with it as ``LOCALAI_GRPC_AUTH_TOKEN``). The
  control plane's own probes and loads (Health, Status, LoadModel, TokenizeString, Free) carry
  it, and a frontend receives it with every lease of that node (``backend_token`` of the route
  answer). It opens only that node's backends: it cannot register a node, call a node
  endpoint, or command a worker.
* ``worker_command_token(node_id)`` (``cpw_...``): what the control plane presents to a
  worker's gRPC service (StartBackend, StopBackend, UnloadModel, ListBackends). Only the
  worker and the control plane know it; frontends never see it.

Both reach the worker once, in the registration answer (``Cache-Control: no-store``). They are
HMAC-SHA256 of the node id under ``settings.CONTROLPLANE_CREDENTIAL_KEY`` (default: Django's
``SECRET_KEY``, which every web and qcluster process of one deployment shares), each with its
own salt, so every process can recompute them for any node without a database column, one
leaked token opens one node only, and neither can be turned into the other or into the fleet
registration token. Rotation: change the key and restart the workers (their backends stop with
them; re-registration hands over the new tokens), or delete a node to give its name a new id
and so new tokens.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.crypto import salted_hmac

_BACKEND_SALT = "core.credentials.backend"
_WORKER_COMMAND_SALT = "core.credentials.worker-command"
_NODE_SALT = "core.credentials.node"


def _derive(prefix: str, salt: str, node_id, key: str | None) -> str:
    if key is None:
        key = settings.CONTROLPLANE_CREDENTIAL_KEY or settings.SECRET_KEY
    return prefix + salted_hmac(salt, str(node_id), secret=key, algorithm="sha256").hexdigest()


def backend_token(node_id, *, key: str | None = None) -> str:
    """The data-plane credential of ``node_id``'s backends (``key``: another deployment's
    credential key, for tools that drive a control plane running elsewhere)."""
    return _derive("cpb_", _BACKEND_SALT, node_id, key)


def worker_command_token(node_id, *, key: str | None = None) -> str:
    """The credential the control plane presents to ``node_id``'s worker gRPC service."""
    return _derive("cpw_", _WORKER_COMMAND_SALT, node_id, key)


def node_token(node_id, *, key: str | None = None) -> str:
    """The REST credential of ``node_id`` (a ``node_token`` node); handed over in every
    registration answer, authenticated by its stored sha256."""
    return _derive("cpn_", _NODE_SALT, node_id, key)
