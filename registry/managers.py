"""Registry verbs: every state transition of the fleet's tables, written once.

API views, admin actions, the router and the reconciler all call these. Each verb's docstring
says what it returns, what it locks, and which concurrency idiom keeps it correct when several
web and qcluster processes run against one database:

- *conditional update*: one ``UPDATE ... WHERE <expected state>`` whose row count says whether
  the transition happened (no read-modify-write window);
- *upsert*: one ``INSERT ... ON CONFLICT ... DO UPDATE`` (``bulk_create(update_conflicts=True)``);
- *row lock*: ``select_for_update`` inside a short ``atomic()`` block, never across network I/O.

Every time-dependent verb takes ``now=`` so tests can pass a fixed clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Iterable

from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import BigIntegerField, Case, Count, Exists, ExpressionWrapper, F, OuterRef, Q, Subquery, Sum, Value, When
from django.db.models.functions import Coalesce, Length
from django.utils import timezone

from controlplane.tokens import hash_token, new_token

from . import placement
from .labels import auto_labels, validate_labels

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel

logger = logging.getLogger(__name__)


def _model(name: str):
    # managers.py is imported by models.py, so sibling models are resolved lazily.
    return apps.get_model("registry", name)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else timezone.now()


def _capacity_changed() -> int:
    """A capacity event (register, approve, labels, slots) ends every model's cooldown early."""
    return _model("ModelSchedulingConfig").objects.clear_cooldowns()


def _free_vram(prefix: str = ""):
    """``available_vram - reserved_vram`` as a signed 64-bit expression.

    Declared explicitly: Django would otherwise type the difference of two unsigned columns as a
    32-bit integer on PostgreSQL and drop comparisons with byte counts above 2 GiB.
    """
    return ExpressionWrapper(F(f"{prefix}available_vram") - F(f"{prefix}reserved_vram"), output_field=BigIntegerField())


def _replica_rows_subquery(model_name: str | None = None, aggregate=None):
    """Per-node aggregate over replica rows as a correlated subquery.

    Subqueries (not joins) keep these annotations composable with each other and with label
    filters without multiplying rows.
    """
    NodeModel = _model("NodeModel")
    rows = NodeModel.objects.filter(node=OuterRef("pk"))
    if model_name is not None:
        rows = rows.filter(model_name=model_name)
    aggregate = aggregate or Count("pk")
    return Coalesce(
        Subquery(rows.order_by().values("node").annotate(value=aggregate).values("value")[:1]),
        Value(0),
    )


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What ``Node.objects.register`` returns: the node, its fresh token (shown once), and
    whether the name was new."""

    node: Node
    node_token: str
    created: bool


class NodeQuerySet(models.QuerySet):
    def healthy(self):
        return self.filter(status=self.model.Status.HEALTHY)

    def backends(self):
        return self.filter(node_type=self.model.NodeType.BACKEND)

    def schedulable(self):
        """Healthy backend nodes: the only ones routed to or scheduled on."""
        return self.healthy().backends()

    def stale(self, *, threshold: timedelta, now: datetime | None = None):
        """Nodes whose last heartbeat is older than ``threshold`` and whose status still claims
        liveness (unhealthy, offline and pending nodes are not news)."""
        cutoff = _now(now) - threshold
        return self.exclude(status__in=self.model.NOT_SWEPT_STATUSES).filter(
            Q(last_heartbeat__lt=cutoff) | Q(last_heartbeat__isnull=True)
        )

    def matching_selector(self, selector: dict[str, str] | None):
        """Nodes carrying every ``key=value`` pair of ``selector`` (AND); ``{}`` matches all."""
        NodeLabel = _model("NodeLabel")
        queryset = self
        for key, value in (selector or {}).items():
            queryset = queryset.filter(
                Exists(NodeLabel.objects.filter(node=OuterRef("pk"), key=key, value=value))
            )
        return queryset

    def candidates(self, selector: dict[str, str] | None = None, node_ids: Iterable | None = None):
        """Schedulable nodes matching a selector, optionally restricted to ``node_ids``."""
        queryset = self.schedulable().matching_selector(selector)
        if node_ids is not None:
            queryset = queryset.filter(pk__in=list(node_ids))
        return queryset

    def with_load(self):
        """Annotate ``in_flight_total`` (sum over replicas) and ``replica_count`` (all models)."""
        return self.annotate(
            in_flight_total=_replica_rows_subquery(aggregate=Sum("in_flight")),
            replica_count=_replica_rows_subquery(),
        )

    def with_model_rows(self, model_name: str):
        """Annotate ``model_rows``: replica rows of ``model_name`` (any state) on each node."""
        return self.annotate(model_rows=_replica_rows_subquery(model_name))

    def with_free_slot(self, model_name: str):
        """Nodes that can take one more replica of ``model_name`` (rows in any state count)."""
        return self.with_model_rows(model_name).filter(model_rows__lt=F("max_replicas_per_model"))

    def with_free_vram(self, needed: int):
        """Nodes whose ``available - reserved`` VRAM covers ``needed`` bytes; annotates
        ``free_vram_bytes``."""
        return self.annotate(free_vram_bytes=_free_vram()).filter(
            free_vram_bytes__gte=needed
        )

    def idle(self):
        """Nodes with no request in flight on any replica."""
        return self.with_load().filter(in_flight_total=0)

    def least_loaded(self):
        """Ordered by in-flight sum, then name for a stable tie-break."""
        return self.with_load().order_by("in_flight_total", "name")

    def with_vram_for(self, needed: int):
        """Nodes that fit ``needed`` bytes, idle nodes first, then the most free VRAM."""
        return (
            self.with_free_vram(needed)
            .with_load()
            .order_by(
                Case(When(in_flight_total=0, then=Value(0)), default=Value(1)),
                F("free_vram_bytes").desc(),
                "name",
            )
        )


class NodeManager(models.Manager.from_queryset(NodeQuerySet)):
    def register(
        self,
        *,
        name: str,
        address: str = "",
        node_type: str = "backend",
        http_address: str = "",
        total_vram: int = 0,
        available_vram: int | None = None,
        total_ram: int = 0,
        available_ram: int | None = None,
        gpu_vendor: str = "unknown",
        labels: dict[str, str] | None = None,
        max_replicas_per_model: int = 1,
        auto_approve: bool = True,
        now: datetime | None = None,
    ) -> Registration:
        """Register a worker by name, or re-register a returning one.

        A returning node keeps its id, comes back ``healthy`` unless it was still ``pending``,
        and keeps an operator-set ``max_replicas_per_model``. Its replica rows are deleted (it
        restarted and runs nothing), its labels are merged one key at a time (operator labels
        survive), a new node token replaces the old one, and every model's unsatisfiable
        cooldown is cleared because capacity changed.

        Idiom: row lock on the name inside one transaction; two first registrations of one name
        race on the unique constraint, and the loser retries into the row lock, so exactly one
        node exists. Returns a ``Registration`` whose ``node_token`` is shown to the worker once.
        """
        if not name or not name.strip():
            raise ValueError("node name must not be empty")
        labels = validate_labels(labels)
        now = _now(now)
        slots = max(1, int(max_replicas_per_model or 1))
        token = new_token("cpn_")
        capacity = {
            "node_type": node_type,
            "address": address,
            "http_address": http_address,
            "total_vram": total_vram,
            "available_vram": total_vram if available_vram is None else available_vram,
            "total_ram": total_ram,
            "available_ram": total_ram if available_ram is None else available_ram,
            "gpu_vendor": gpu_vendor or "unknown",
            "reserved_vram": 0,
            "reported_max_replicas_per_model": slots,
            "token_hash": hash_token(token),
            "last_heartbeat": now,
        }
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    node = self.select_for_update().filter(name=name).first()
                    created = node is None
                    if created:
                        node = self.create(
                            name=name,
                            status=self.model.Status.HEALTHY if auto_approve else self.model.Status.PENDING,
                            max_replicas_per_model=slots,
                            **capacity,
                        )
                    else:
                        for field, value in capacity.items():
                            setattr(node, field, value)
                        if node.status != self.model.Status.PENDING:
                            node.status = self.model.Status.HEALTHY
                        if not node.max_replicas_per_model_manual:
                            node.max_replicas_per_model = slots
                        node.save()
                        _model("NodeModel").objects.filter(node=node).delete()
                    effective_slots = node.max_replicas_per_model
                    _model("NodeLabel").objects.merge(
                        node.pk,
                        {
                            **labels,
                            **auto_labels(
                                name=name,
                                gpu_vendor=node.gpu_vendor,
                                total_vram=total_vram,
                                max_replicas_per_model=effective_slots,
                            ),
                        },
                        clear_cooldowns=False,
                    )
                    _capacity_changed()
                return Registration(node=node, node_token=token, created=created)
            except IntegrityError:
                # Another process inserted this name between our lookup and insert; the next
                # attempt finds its row and waits on the row lock.
                logger.info("node %s registered concurrently; retrying as a re-registration", name)
        raise IntegrityError(f"could not register node {name!r} after concurrent attempts")

    def heartbeat(
        self,
        node_id,
        *,
        available_vram: int | None = None,
        available_ram: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record a heartbeat. Returns False when the node does not exist.

        Sets ``last_heartbeat``; a reported ``available_vram`` replaces the stored figure and
        resets ``reserved_vram`` to 0 (the worker now reports what in-progress loads use). It
        never changes status: the reconciler does. Pending and offline nodes only get the
        timestamp. Idiom: one conditional UPDATE (CASE on status), no read.
        """
        now = _now(now)
        timestamp_only = Q(status__in=self.model.HEARTBEAT_TIMESTAMP_ONLY_STATUSES)
        changes = {"last_heartbeat": now}
        if available_vram is not None:
            changes["available_vram"] = Case(When(timestamp_only, then=F("available_vram")), default=Value(available_vram))
            changes["reserved_vram"] = Case(When(timestamp_only, then=F("reserved_vram")), default=Value(0))
        if available_ram is not None:
            changes["available_ram"] = Case(When(timestamp_only, then=F("available_ram")), default=Value(available_ram))
        return self.filter(pk=node_id).update(**changes) == 1

    def _transition(self, node_id, to_status: str, *, from_statuses=None, exclude_statuses=None) -> bool:
        queryset = self.filter(pk=node_id)
        if from_statuses is not None:
            queryset = queryset.filter(status__in=from_statuses)
        if exclude_statuses is not None:
            queryset = queryset.exclude(status__in=exclude_statuses)
        return queryset.update(status=to_status, updated_at=timezone.now()) == 1

    def approve(self, node_id) -> bool:
        """``pending`` -> ``healthy`` (conditional update). False: unknown or not pending.
        Approval adds capacity, so cooldowns are cleared."""
        approved = self._transition(node_id, self.model.Status.HEALTHY, from_statuses=[self.model.Status.PENDING])
        if approved:
            _capacity_changed()
        return approved

    def mark_healthy(self, node_id) -> bool:
        """``unhealthy``/``offline`` -> ``healthy`` when heartbeats are fresh again (conditional
        update). Never overrides ``pending`` (needs approval) or ``draining`` (operator's
        choice). False: unknown node or not in a recoverable status."""
        Status = self.model.Status
        return self._transition(node_id, Status.HEALTHY, from_statuses=[Status.UNHEALTHY, Status.OFFLINE])

    def mark_unhealthy(self, node_id) -> bool:
        """``healthy`` -> ``unhealthy``: status only, replica rows kept (a blip must not force
        reloads). Conditional update; False when the node was not healthy."""
        Status = self.model.Status
        return self._transition(node_id, Status.UNHEALTHY, from_statuses=[Status.HEALTHY])

    def mark_draining(self, node_id) -> bool:
        """Stop routing and scheduling to a node so its in-flight work can finish.

        Replica rows are kept on purpose (the reference deleted them): the worker polls its
        rows' in-flight sum before deregistering, and leases on them must still be releasable.
        Draining nodes are not schedulable, so their replicas stop counting as ready and the
        reconciler places replacements elsewhere. Conditional update; False: unknown node, or
        already offline/draining.
        """
        Status = self.model.Status
        return self._transition(node_id, Status.DRAINING, exclude_statuses=[Status.OFFLINE, Status.DRAINING])

    def resume(self, node_id) -> bool:
        """``draining`` -> ``healthy`` (conditional update); adds capacity back."""
        Status = self.model.Status
        resumed = self._transition(node_id, Status.HEALTHY, from_statuses=[Status.DRAINING])
        if resumed:
            _capacity_changed()
        return resumed

    def mark_offline(self, node_id, *, heartbeat_before: datetime | None = None) -> bool:
        """Mark a node ``offline`` and delete its replica rows; load info is untouched.

        The row is kept so that re-registration restores its approval. With
        ``heartbeat_before``, the transition only happens if the node's heartbeat is still older
        than that instant: a heartbeat that arrives between the reconciler's snapshot and this
        call wins (conditional update). Returns False when nothing changed.
        """
        with transaction.atomic():
            queryset = self.filter(pk=node_id)
            if heartbeat_before is not None:
                queryset = queryset.filter(Q(last_heartbeat__lt=heartbeat_before) | Q(last_heartbeat__isnull=True))
            changed = queryset.update(status=self.model.Status.OFFLINE, reserved_vram=0, updated_at=timezone.now()) == 1
            if changed:
                _model("NodeModel").objects.filter(node_id=node_id).delete()
        return changed

    def deregister(self, node_id) -> bool:
        """Operator hard delete: the node, its labels and replica rows go in one transaction.
        Returns False for an unknown node."""
        with transaction.atomic():
            deleted, _ = self.filter(pk=node_id).delete()
        return deleted > 0

    def set_max_replicas_per_model(self, node_id, slots: int) -> bool:
        """Operator override of a node's replica slots; re-registration keeps it. Clears
        cooldowns (capacity changed) and refreshes the `node.replica-slots` label."""
        if int(slots) < 1:
            raise ValueError("max_replicas_per_model must be at least 1")
        with transaction.atomic():
            updated = self.filter(pk=node_id).update(
                max_replicas_per_model=int(slots), max_replicas_per_model_manual=True, updated_at=timezone.now()
            )
            if updated:
                _model("NodeLabel").objects.merge(node_id, {"node.replica-slots": str(int(slots))}, clear_cooldowns=False)
                _capacity_changed()
        return updated == 1

    def reset_max_replicas_per_model(self, node_id) -> bool:
        """Drop the operator override: back to what the worker reported at registration."""
        with transaction.atomic():
            updated = self.filter(pk=node_id).update(
                max_replicas_per_model=F("reported_max_replicas_per_model"),
                max_replicas_per_model_manual=False,
                updated_at=timezone.now(),
            )
            if updated:
                slots = self.filter(pk=node_id).values_list("max_replicas_per_model", flat=True).get()
                _model("NodeLabel").objects.merge(node_id, {"node.replica-slots": str(slots)}, clear_cooldowns=False)
                _capacity_changed()
        return updated == 1

    def reserve_vram(self, node_id, amount: int) -> bool:
        """Soft-reserve ``amount`` bytes for an in-progress load.

        Admission happens in the database: ``reserved += n WHERE available - reserved >= n``,
        so concurrent loads can never over-commit a node. False: not enough free VRAM.
        """
        if amount <= 0:
            return True
        return (
            self.filter(pk=node_id)
            .annotate(free=_free_vram())
            .filter(free__gte=amount)
            .update(reserved_vram=F("reserved_vram") + amount)
            == 1
        )

    def release_vram(self, node_id, amount: int) -> bool:
        """Return a reservation: ``reserved -= n WHERE reserved >= n`` (never underflows).

        False when a heartbeat already reset the reservation (nothing left to return).
        """
        if amount <= 0:
            return True
        return self.filter(pk=node_id, reserved_vram__gte=amount).update(reserved_vram=F("reserved_vram") - amount) == 1

    def capacity_for(self, model_name: str, *, selector=None, node_ids: Iterable | None = None) -> int:
        """How many more replicas of ``model_name`` the candidate nodes can take (one query;
        the formula is ``placement.cluster_capacity``)."""
        rows = self.candidates(selector, node_ids).with_model_rows(model_name).values_list(
            "pk", "max_replicas_per_model", "model_rows"
        )
        return placement.cluster_capacity(placement.SlotUsage(pk, slots, used) for pk, slots, used in rows)


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


class NodeLabelManager(models.Manager):
    def merge(self, node_id, labels: dict[str, str], *, clear_cooldowns: bool = True) -> int:
        """Set each key of ``labels`` on the node, leaving other keys alone (upsert on
        ``(node, key)``). Returns the number of labels written."""
        labels = validate_labels(labels)
        if not labels:
            return 0
        self.bulk_create(
            [self.model(node_id=node_id, key=key, value=value) for key, value in labels.items()],
            update_conflicts=True,
            unique_fields=["node", "key"],
            update_fields=["value"],
        )
        if clear_cooldowns:
            _capacity_changed()
        return len(labels)

    def set_label(self, node_id, key: str, value: str) -> None:
        """Set one label (upsert)."""
        self.merge(node_id, {key: value})

    def replace(self, node_id, labels: dict[str, str]) -> int:
        """Make the node's labels exactly ``labels`` (one transaction)."""
        labels = validate_labels(labels)
        with transaction.atomic():
            self.filter(node_id=node_id).exclude(key__in=list(labels)).delete()
            self.merge(node_id, labels, clear_cooldowns=False)
            _capacity_changed()
        return len(labels)

    def remove(self, node_id, key: str) -> bool:
        """Delete one label; False when the node had no such key."""
        deleted, _ = self.filter(node_id=node_id, key=key).delete()
        if deleted:
            _capacity_changed()
        return deleted > 0

    def as_dict(self, node_id) -> dict[str, str]:
        return dict(self.filter(node_id=node_id).values_list("key", "value"))


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
        given, so a plain state update does not erase the per-replica load info.
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
            backend_type=backend_type or "",
            model_opts_blob=bytes(opts_blob) if opts_blob is not None else None,
        )
        update_fields = ["address", "state", "updated_at", "last_probe_at", "probe_failures"]
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
        """Loaded replicas of a model on any node (the reference's count)."""
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
            .annotate(node_free_vram=_free_vram("node__"))
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


# --------------------------------------------------------------------------------------------
# Per-model load info (the seed's fix)
# --------------------------------------------------------------------------------------------


class ModelLoadInfoManager(models.Manager):
    def upsert(self, model_name: str, backend_type: str, opts_blob: bytes, *, now: datetime | None = None) -> ModelLoadInfo:
        """Store the load recipe of a model: one ``INSERT ... ON CONFLICT (model_name) DO UPDATE``.

        Last write wins under concurrent frontends (the row converges to whichever statement
        commits last); ``updated_at`` is refreshed. The blob is stored as the exact bytes given.
        Raises ValueError for an empty model name.
        """
        if not model_name or not model_name.strip():
            raise ValueError("model name must not be empty")
        row = self.model(
            model_name=model_name,
            backend_type=backend_type or "",
            model_opts_blob=bytes(opts_blob or b""),
            updated_at=_now(now),
        )
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["model_name"],
            update_fields=["backend_type", "model_opts_blob", "updated_at"],
        )
        return row

    def for_model(self, model_name: str) -> ModelLoadInfo:
        """The load recipe of a model.

        The per-model row first; only if there is none, an unsaved ``ModelLoadInfo`` built from
        the first loaded replica row that carries a blob (rows written before the per-model
        table existed). ``source`` says which. Raises ``ModelLoadInfo.DoesNotExist`` when
        neither exists.
        """
        row = self.filter(model_name=model_name).first()
        if row is not None:
            row.model_opts_blob = bytes(row.model_opts_blob)
            return row
        replica = (
            _model("NodeModel")
            .objects.for_model(model_name)
            .loaded()
            .annotate(blob_length=Length("model_opts_blob"))
            .filter(blob_length__gt=0)
            .order_by("created_at", "pk")
            .first()
        )
        if replica is None:
            raise self.model.DoesNotExist(f"no load info for model {model_name!r}")
        return self.model(
            model_name=model_name,
            backend_type=replica.backend_type,
            model_opts_blob=bytes(replica.model_opts_blob),
            updated_at=replica.updated_at,
            source=self.model.Source.REPLICA,
        )


# --------------------------------------------------------------------------------------------
# Scheduling config and its circuit breaker
# --------------------------------------------------------------------------------------------


def validate_scheduling(min_replicas, max_replicas, node_selector) -> tuple[int, int, dict[str, str]]:
    """Check a scheduling config; raise ``ValidationError`` with per-field messages."""
    errors = {}
    for field, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if isinstance(value, bool) or not isinstance(value, int):
            errors[field] = "must be an integer"
        elif value < 0:
            errors[field] = "must be >= 0"
    if not errors and max_replicas > 0 and min_replicas > max_replicas:
        errors["min_replicas"] = "must not exceed max_replicas (unless max_replicas is 0 = unlimited)"
    try:
        selector = validate_labels(node_selector)
    except ValueError as exc:
        errors["node_selector"] = str(exc)
        selector = {}
    if errors:
        raise ValidationError(errors)
    return min_replicas, max_replicas, selector


class ModelSchedulingConfigQuerySet(models.QuerySet):
    def autoscaled(self):
        """Models the reconciler manages: ``min_replicas > 0 or max_replicas > 0``."""
        return self.filter(Q(min_replicas__gt=0) | Q(max_replicas__gt=0))

    def in_cooldown(self, *, now: datetime | None = None):
        return self.filter(unsatisfiable_until__gt=_now(now))


class ModelSchedulingConfigManager(models.Manager.from_queryset(ModelSchedulingConfigQuerySet)):
    def upsert(
        self,
        model_name: str,
        *,
        min_replicas: int = 0,
        max_replicas: int = 0,
        node_selector: dict[str, str] | None = None,
    ) -> ModelSchedulingConfig:
        """Create or replace a model's scheduling config (upsert on ``model_name``).

        Validated first (``ValidationError``); the circuit-breaker columns are not overwritten.
        """
        if not model_name or not model_name.strip():
            raise ValidationError({"model_name": "must not be empty"})
        min_replicas, max_replicas, selector = validate_scheduling(min_replicas, max_replicas, node_selector)
        row = self.model(model_name=model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=selector)
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["model_name"],
            update_fields=["min_replicas", "max_replicas", "node_selector", "updated_at"],
        )
        return self.get(model_name=model_name)

    def record_unsatisfiable(self, model_name: str, *, threshold: int, cooldown: timedelta, now: datetime | None = None) -> bool:
        """Count a pass in which the model had no capacity; after ``threshold`` consecutive
        passes start a cooldown of ``cooldown`` and reset the count. Returns True when this
        call tripped the breaker. Idiom: two conditional updates in one transaction."""
        now = _now(now)
        with transaction.atomic():
            self.filter(model_name=model_name).update(unsatisfiable_ticks=F("unsatisfiable_ticks") + 1)
            tripped = self.filter(model_name=model_name, unsatisfiable_ticks__gte=threshold).update(
                unsatisfiable_ticks=0, unsatisfiable_until=now + cooldown
            )
        return tripped == 1

    def record_satisfiable(self, model_name: str) -> bool:
        """The model had capacity this pass: reset the consecutive count (conditional)."""
        return self.filter(model_name=model_name, unsatisfiable_ticks__gt=0).update(unsatisfiable_ticks=0) == 1

    def clear_cooldown(self, model_name: str) -> bool:
        return self._clear(self.filter(model_name=model_name)) == 1

    def clear_cooldowns(self) -> int:
        """End every model's cooldown and count (a capacity event happened)."""
        return self._clear(self.all())

    @staticmethod
    def _clear(queryset) -> int:
        return queryset.filter(Q(unsatisfiable_until__isnull=False) | Q(unsatisfiable_ticks__gt=0)).update(
            unsatisfiable_until=None, unsatisfiable_ticks=0
        )
