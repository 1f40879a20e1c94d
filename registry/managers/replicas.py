"""Replica-row verbs: upsert, removal, in-flight accounting, warm pick, probes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import models, transaction
from django.db.models import (
    F,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..models import NodeModel

from ._common import _free_vram, _model, _now

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Replica rows
# --------------------------------------------------------------------------------------------


class NodeModelQuerySet(models.QuerySet):
    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def loaded(self):
        return self.filter(state=self.model.State.LOADED)

    def loading(self):
        return self.filter(state=self.model.State.LOADING)

    def on_schedulable_nodes(self):
        """Rows on healthy backend nodes: the only replicas that are routable ("ready")."""
        Node = _model("Node")
        return self.filter(node__status=Node.Status.HEALTHY, node__node_type=Node.NodeType.BACKEND)

    def ready(self):
        return self.loaded().on_schedulable_nodes()


class NodeModelManager(models.Manager.from_queryset(NodeModelQuerySet)):
    def set_replica(
        self,
        node_id,
        model_name: str,
        replica_index: int,
        *,
        address: str = "",
        state: str | None = None,
        backend_type: str | None = None,
        opts_blob: bytes | None = None,
        now: datetime | None = None,
    ) -> NodeModel:
        """Insert or update the replica row of ``(node, model, replica_index)`` keeping its id.

        Idiom: upsert on the unique triple. ``backend_type``/``opts_blob`` are only written when
        given, so a plain state update does not erase the per-replica load info. Every call is a
        (re-)recording of the row's state: ``state_changed_at`` is set to ``now``.
        """
        if not model_name:
            raise ValueError("model name must not be empty")
        now = _now(now)
        row = self.model(
            node_id=node_id,
            model_name=model_name,
            replica_index=replica_index,
            address=address,
            state=state or self.model.State.LOADED,
            last_used=now,
            last_probe_at=now,
            state_changed_at=now,
            backend_type=backend_type or "",
            model_opts_blob=bytes(opts_blob) if opts_blob is not None else None,
        )
        update_fields = ["address", "state", "updated_at", "last_probe_at", "probe_failures", "state_changed_at"]
        if backend_type is not None:
            update_fields.append("backend_type")
        if opts_blob is not None:
            update_fields.append("model_opts_blob")
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["node", "model_name", "replica_index"],
            update_fields=update_fields,
        )
        return row

    def set_replica_load_info(self, node_id, model_name: str, replica_index: int, backend_type: str, opts_blob: bytes) -> bool:
        """Stamp the per-replica copy of the load recipe. False when the row is gone."""
        return (
            self.filter(node_id=node_id, model_name=model_name, replica_index=replica_index).update(
                backend_type=backend_type, model_opts_blob=bytes(opts_blob)
            )
            == 1
        )

    def remove_replica(self, node_id, model_name: str, replica_index: int) -> bool:
        """Delete one replica row; False when it was already gone."""
        deleted, _ = self.filter(node_id=node_id, model_name=model_name, replica_index=replica_index).delete()
        return deleted > 0

    def remove_all_replicas(self, node, model_name: str) -> int:
        """Delete every replica of ``model_name`` on ``node`` (a node or its id); returns how
        many rows went. Load info is untouched."""
        node_id = getattr(node, "pk", node)
        deleted, _ = self.filter(node_id=node_id, model_name=model_name).delete()
        return deleted

    def count_loaded(self, model_name: str) -> int:
        """Loaded replicas of a model on any node (LocalAI's count)."""
        return self.for_model(model_name).loaded().count()

    def next_free_index(self, node, model_name: str) -> int | None:
        """Lowest replica index of ``model_name`` not used on ``node`` and below its slot
        count, or None when every slot is taken. The unique constraint, not this read, is
        what stops two loaders from taking the same index."""
        used = set(self.filter(node_id=node.pk, model_name=model_name).values_list("replica_index", flat=True))
        for index in range(max(1, node.max_replicas_per_model)):
            if index not in used:
                return index
        return None

    def touch(self, replica_id, *, now: datetime | None = None) -> bool:
        """Record use of a replica (``last_used``); drives round robin and idle scale-down."""
        return self.filter(pk=replica_id).update(last_used=_now(now)) == 1

    def increment_in_flight(self, replica_id, *, now: datetime | None = None) -> bool:
        """One more request on this replica (conditional update; False when the row is gone)."""
        return self.filter(pk=replica_id).update(in_flight=F("in_flight") + 1, last_used=_now(now)) == 1

    def decrement_in_flight(self, replica_id) -> bool:
        """One request fewer, never below zero (``WHERE in_flight > 0``). A miss means a double
        release or a removed row: logged as a warning, never an error."""
        changed = self.filter(pk=replica_id, in_flight__gt=0).update(in_flight=F("in_flight") - 1) == 1
        if not changed:
            logger.warning("in-flight decrement missed for replica %s (already zero or removed)", replica_id)
        return changed

    def record_probe_ok(self, replica_id, now: datetime | None = None) -> bool:
        """A probe found the replica's backend alive or busy: refresh ``last_probe_at`` and
        reset the consecutive ``probe_failures``. Idiom: one conditional UPDATE by id. False
        when the row is gone (removed since the probe was sent)."""
        return self.filter(pk=replica_id).update(last_probe_at=_now(now), probe_failures=0) == 1

    def record_probe_unreachable(self, replica_id) -> int | None:
        """A probe found nothing at the replica's address: count one more consecutive failure.

        Returns the new ``probe_failures``, or None when the row is gone. ``last_probe_at`` is
        left alone (the replica was not confirmed). Idiom: ``UPDATE ... SET probe_failures =
        probe_failures + 1`` then a read of that row inside one short transaction; the UPDATE's
        row lock keeps the read consistent with it. The caller decides removal (e.g. after
        ``PROBE_FAILURES_BEFORE_REMOVAL``) with ``remove_replica``.
        """
        with transaction.atomic():
            if self.filter(pk=replica_id).update(probe_failures=F("probe_failures") + 1) != 1:
                return None
            return self.filter(pk=replica_id).values_list("probe_failures", flat=True).first()

    def warm_pick(self, model_name: str, *, node_ids: Iterable | None = None, now: datetime | None = None) -> NodeModel | None:
        """Reserve the best loaded replica of ``model_name`` on a healthy backend node.

        Best = least ``in_flight``, then least recently used (round robin), then the node with
        the most free VRAM. Idiom: row lock. In one short transaction the replica row (only it,
        not its node) is locked with ``FOR UPDATE SKIP LOCKED`` so concurrent pickers spread
        over replicas; if every candidate is locked, a blocking ``FOR UPDATE`` waits for the
        best one. Its ``in_flight`` is then incremented; the caller must release it with
        ``decrement_in_flight``. Returns None when no replica is loaded on a candidate node.
        """
        now = _now(now)
        candidates = (
            self.for_model(model_name)
            .ready()
            .annotate(node_free_vram=_free_vram("node__"), node_last_heartbeat=F("node__last_heartbeat"))
            .order_by("in_flight", F("last_used").asc(nulls_first=True), F("node_free_vram").desc(), "pk")
        )
        if node_ids is not None:
            candidates = candidates.filter(node_id__in=list(node_ids))
        with transaction.atomic():
            replica = candidates.select_for_update(skip_locked=True, of=("self",)).first()
            if replica is None:
                replica = candidates.select_for_update(of=("self",)).first()
            if replica is None:
                return None
            self.filter(pk=replica.pk).update(in_flight=F("in_flight") + 1, last_used=now)
        replica.in_flight += 1
        replica.last_used = now
        return replica

    # --- verbs of the router's load and eviction paths ----------------------------------------

    def mark_loaded(self, replica_id, *, address: str, now: datetime | None = None) -> bool:
        """``loading`` -> ``loaded`` at ``address`` once LoadModel succeeded (conditional
        update). False: the row was removed during the load (node restarted or went offline,
        or the load job was taken over); the caller must not treat the load as recorded.
        ``state_changed_at`` is set to ``now``: ``.update()`` skips ``auto_now``, so
        ``updated_at`` would still say when the ``loading`` row was inserted."""
        now = _now(now)
        return (
            self.filter(pk=replica_id, state=self.model.State.LOADING).update(
                state=self.model.State.LOADED,
                address=address,
                last_used=now,
                last_probe_at=now,
                probe_failures=0,
                state_changed_at=now,
                updated_at=now,
            )
            == 1
        )

    def discard_loading(self, replica_id) -> bool:
        """Delete a ``loading`` row left by a failed or dead load and return the VRAM its load
        reserved to its node. A row that reached ``loaded`` is left alone. Conditional delete
        (``WHERE state = 'loading'``); only the call that deleted releases the reservation."""
        if replica_id is None:
            return False
        row = self.filter(pk=replica_id, state=self.model.State.LOADING).values("node_id", "reserved_vram").first()
        if row is None:
            return False
        deleted, _ = self.filter(pk=replica_id, state=self.model.State.LOADING).delete()
        if deleted:
            _model("Node").objects.release_vram(row["node_id"], row["reserved_vram"])
        return deleted > 0

    def remove_if_idle(self, replica_id) -> bool:
        """Delete a loaded replica row only while nothing is in flight on it (eviction).
        Conditional delete (``WHERE in_flight = 0``): a pick that committed first wins and the
        row stays. False: busy, or already gone."""
        deleted, _ = self.filter(pk=replica_id, state=self.model.State.LOADED, in_flight=0).delete()
        return deleted > 0

    def report_loaded(
        self,
        node_id,
        model_name: str,
        replica_index: int,
        *,
        address: str,
        backend_type: str,
        opts_blob: bytes,
        now: datetime | None = None,
    ) -> NodeModel | None:
        """Record a replica a frontend loaded itself: its row as loaded at ``address`` with its
        per-replica load recipe, and the recipe as the model's load info. None when the node is
        gone (nothing stored).

        Idiom: row lock inside a short atomic(): the node row is locked first (``SELECT ... FOR
        UPDATE``), so a deletion of the node not yet committed makes this wait and then answer
        None (instead of failing on the foreign key), and a deletion that comes later waits for
        this commit; then the two upserts (``set_replica`` on the replica's unique triple,
        ``ModelLoadInfo.objects.upsert`` on the model) commit together.
        """
        with transaction.atomic():
            locked = _model("Node").objects.select_for_update().filter(pk=node_id).values_list("pk", flat=True)
            if not list(locked):
                return None
            self.set_replica(
                node_id,
                model_name,
                replica_index,
                address=address,
                state=self.model.State.LOADED,
                backend_type=backend_type,
                opts_blob=opts_blob,
                now=now,
            )
            _model("ModelLoadInfo").objects.upsert(model_name, backend_type, opts_blob, now=now)
            return self.get(node_id=node_id, model_name=model_name, replica_index=replica_index)
