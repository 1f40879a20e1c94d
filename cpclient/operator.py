"""The operator side of ``/api/v1/`` (an ``operator`` API key), mixed into
:class:`cpclient.ControlPlaneClient`: nodes (list, get, approve, drain, resume), models and
their scheduling configs, replica rows, events and a reconcile pass.

Lists are read page by page (``?limit=&offset=``) until the server's ``next`` is empty, so a
``list_*`` call answers every row that matches its filters.
"""

from __future__ import annotations

import urllib.parse
import uuid
from typing import Any

from .errors import NotFoundError

PAGE = 500  # rows per page of a full list (the server allows up to 1000)


def _query(params: dict[str, Any]) -> str:
    pairs = [(key, str(value).lower() if isinstance(value, bool) else value) for key, value in params.items()]
    pairs = [(key, value) for key, value in pairs if value is not None]
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


def _model_path(model: str) -> str:
    if not model:
        raise ValueError("a model name is required")
    return urllib.parse.quote(model, safe="/")


def is_node_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class OperatorCalls:
    """Operator calls; needs ``self._request`` (``ControlPlaneClient``)."""

    # --- lists ----------------------------------------------------------------------------

    def _list_all(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._request("GET", path + _query({**params, "limit": PAGE, "offset": offset})).body
            rows.extend(page.get("results") or [])
            if not page.get("next") or not page.get("results"):
                return rows
            offset += len(page["results"])

    def _page(self, path: str, params: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        return list(self._request("GET", path + _query({**params, "limit": limit})).body.get("results") or [])

    # --- nodes ----------------------------------------------------------------------------

    def list_nodes(
        self, *, status: str | None = None, name: str | None = None, label: str | None = None
    ) -> list[dict[str, Any]]:
        """``GET /api/v1/nodes`` (every page), by name; ``label`` is ``key`` or ``key=value``."""
        return self._list_all("/api/v1/nodes", {"status": status, "name": name, "label": label})

    def get_node(self, node_id: str) -> dict[str, Any]:
        """One node by id; :class:`NotFoundError` when there is none."""
        return self._request("GET", f"/api/v1/nodes/{urllib.parse.quote(str(node_id))}").body

    def find_node(self, ref: str) -> dict[str, Any]:
        """A node by id (a UUID) or by its name; :class:`NotFoundError` when neither matches."""
        if is_node_id(ref):
            try:
                return self.get_node(ref)
            except NotFoundError:
                pass  # a node may be named like a UUID
        found = self.list_nodes(name=ref) if ref else []
        if not found:
            raise NotFoundError(404, "not_found", f"No node named {ref!r}.", problem={"title": "Not found"})
        return found[0]

    def _node_action(self, node_id: str, action: str) -> dict[str, Any]:
        return self._request("POST", f"/api/v1/nodes/{urllib.parse.quote(str(node_id))}/{action}", None).body

    def drain_node(self, node_id: str) -> dict[str, Any]:
        """An operator's drain (no new work; only an operator lifts it); answers the node.
        Draining a draining node is harmless; a pending or offline one is a 409."""
        return self._node_action(node_id, "drain")

    def resume_node(self, node_id: str) -> dict[str, Any]:
        """Lift a drain, whoever set it; answers the node."""
        return self._node_action(node_id, "resume")

    def approve_node(self, node_id: str) -> dict[str, Any]:
        """Approve a pending node; answers the node."""
        return self._node_action(node_id, "approve")

    # --- models, scheduling, replicas -----------------------------------------------------

    def list_models(
        self, *, name: str | None = None, configured: bool | None = None, autoscaled: bool | None = None
    ) -> list[dict[str, Any]]:
        """``GET /api/v1/models`` (every page): each model's counts and conditions; ``name`` is
        part of the name."""
        return self._list_all("/api/v1/models", {"name": name, "configured": configured, "autoscaled": autoscaled})

    def get_scheduling(self, model: str) -> dict[str, Any]:
        """The model's scheduling config; :class:`NotFoundError` when it has none."""
        return self._request("GET", f"/api/v1/models/{_model_path(model)}/scheduling").body

    def put_scheduling(
        self,
        model: str,
        *,
        min_replicas: int = 0,
        max_replicas: int = 0,
        node_selector: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace the model's scheduling config (``max_replicas`` 0 = unlimited)."""
        body = {"min_replicas": min_replicas, "max_replicas": max_replicas, "node_selector": node_selector or {}}
        return self._request("PUT", f"/api/v1/models/{_model_path(model)}/scheduling", body).body

    def scale(self, model: str, *, min_replicas: int, max_replicas: int | None = None) -> dict[str, Any]:
        """Set the model's replica counts, keeping its node selector (and ``max_replicas`` when
        not given). Read, then replace: a concurrent change of the selector in between is lost."""
        try:
            current = self.get_scheduling(model)
        except NotFoundError:
            current = {}
        return self.put_scheduling(
            model,
            min_replicas=min_replicas,
            max_replicas=current.get("max_replicas", 0) if max_replicas is None else max_replicas,
            node_selector=current.get("node_selector") or {},
        )

    def list_replicas(
        self, *, node: str | None = None, model: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """``GET /api/v1/replicas`` (every page); ``node`` is a node id."""
        return self._list_all("/api/v1/replicas", {"node": node, "model": model, "state": state})

    # --- events, reconcile ----------------------------------------------------------------

    def list_events(
        self,
        *,
        model: str | None = None,
        node: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        oldest_first: bool = False,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """One page of ``GET /api/v1/events``: the newest ``limit`` (or, ``oldest_first``, the
        oldest ``limit`` created at or after ``since``, an ISO 8601 instant)."""
        params = {
            "model": model,
            "node": node,
            "kind": kind,
            "since": since,
            "ordering": "created_at" if oldest_first else "-created_at",
        }
        return self._page("/api/v1/events", params, limit)

    def reconcile(self) -> dict[str, Any]:
        """Run one reconcile pass now; answers its summary (``outcome`` ``skipped`` when another
        pass held the lock)."""
        return self._request("POST", "/api/v1/reconcile", None).body
