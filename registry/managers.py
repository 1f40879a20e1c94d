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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import (
    BigIntegerField,
    Case,
    Count,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Greatest, Least, Length
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

    def for_placement(self, model_name: str):
        """Annotate what the scheduler needs for one model, for one snapshot query:
        ``model_rows`` (rows of the model here, any state), ``in_flight_total``,
        ``free_vram_bytes`` (``available - reserved``; not filtered, so a node whose
        reservations exceed a stale report stays a candidate for models of unknown size) and
        ``failure_backoff_until`` (``LoadFailure.retry_after`` of the model here, or None)."""
        backoff = _model("LoadFailure").objects.filter(node=OuterRef("pk"), model_name=model_name).values("retry_after")
        return (
            self.with_model_rows(model_name)
            .with_load()
            .annotate(free_vram_bytes=_free_vram(), failure_backoff_until=Subquery(backoff[:1]))
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

    def credit_vram(self, node_id, amount: int) -> bool:
        """Give back the VRAM of a replica that was removed (eviction), before the worker's
        next heartbeat reports it.

        If the replica's load reservation is still pending (no heartbeat since the load), it is
        released; otherwise the heartbeat already counted the replica in ``available_vram``, so
        ``amount`` is added back there, capped at ``total_vram``. The next heartbeat replaces
        both with the real figure. Conditional updates; False: unknown node.
        """
        if amount <= 0:
            return True
        if self.release_vram(node_id, amount):
            return True
        grown = ExpressionWrapper(F("available_vram") + Value(int(amount)), output_field=BigIntegerField())
        return self.filter(pk=node_id).update(available_vram=Least(grown, F("total_vram"))) == 1

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

    # --- verbs of the router's load and eviction paths ----------------------------------------

    def mark_loaded(self, replica_id, *, address: str, now: datetime | None = None) -> bool:
        """``loading`` -> ``loaded`` at ``address`` once LoadModel succeeded (conditional
        update). False: the row was removed during the load (node restarted or went offline,
        or the load job was taken over); the caller must not treat the load as recorded."""
        now = _now(now)
        return (
            self.filter(pk=replica_id, state=self.model.State.LOADING).update(
                state=self.model.State.LOADED, address=address, last_used=now, last_probe_at=now, probe_failures=0
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
        placement: str | None = None,
    ) -> ModelSchedulingConfig:
        """Create or replace a model's scheduling config (upsert on ``model_name``).

        Validated first (``ValidationError``); the circuit-breaker columns are not overwritten.
        ``placement`` (``spread``/``binpack``) is only written when given.
        """
        if not model_name or not model_name.strip():
            raise ValidationError({"model_name": "must not be empty"})
        min_replicas, max_replicas, selector = validate_scheduling(min_replicas, max_replicas, node_selector)
        if placement is not None and placement not in self.model.Placement.values:
            raise ValidationError({"placement": f"must be one of {', '.join(self.model.Placement.values)}"})
        row = self.model(model_name=model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=selector)
        update_fields = ["min_replicas", "max_replicas", "node_selector", "updated_at"]
        if placement is not None:
            row.placement = placement
            update_fields.append("placement")
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["model_name"],
            update_fields=update_fields,
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

    def remove(self, model_name: str) -> bool:
        """Forget a model's scheduling config: the reconciler stops managing it (its replicas
        and load info stay). False when there was none."""
        deleted, _ = self.filter(model_name=model_name).delete()
        return deleted > 0

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


# --------------------------------------------------------------------------------------------
# Load jobs: one durable cold load per model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReapResult:
    """What ``LoadJob.objects.reap_dead`` did. ``requeued``: ids of jobs now ``pending`` that
    the caller must enqueue again (``registry.tasks.enqueue_load_job``); ``failed``: ids of jobs
    that ran out of attempts; ``cleaned``: leftover ``loading`` rows removed."""

    requeued: tuple = ()
    failed: tuple = ()
    cleaned: int = 0


def _discard_loading_row(replica_id) -> bool:
    return _model("NodeModel").objects.discard_loading(replica_id)


class LoadJobQuerySet(models.QuerySet):
    def active(self):
        """Pending or running: the partial unique index allows one of these per model."""
        return self.filter(state__in=self.model.ACTIVE_STATES)

    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def stale(self, *, stale_before: datetime):
        """Running jobs whose runner has not heartbeated since ``stale_before``."""
        return self.filter(state=self.model.State.RUNNING).filter(
            Q(heartbeat_at__lt=stale_before) | Q(heartbeat_at__isnull=True)
        )


class LoadJobManager(models.Manager.from_queryset(LoadJobQuerySet)):
    def claim_or_attach(
        self,
        model_name: str,
        *,
        backend_type: str = "",
        opts_blob: bytes | None = None,
        candidate_node_ids: Iterable | None = None,
        now: datetime | None = None,
    ) -> tuple:
        """Create the model's load job, or attach to the one already active. Returns
        ``(job, created)``; only the creator enqueues it.

        Idiom: insert and let the partial unique index (one pending/running job per model)
        decide; the loser of a race gets ``IntegrityError`` and reads the active job. If that
        job finished between the failed insert and the read, the caller attaches to it anyway
        (its outcome answers the caller's question) instead of starting a second load. Never
        holds a lock; on PostgreSQL a racing insert waits only for the winner's autocommit.
        """
        if not model_name or not model_name.strip():
            raise ValueError("model name must not be empty")
        now = _now(now)
        node_ids = None if candidate_node_ids is None else [str(pk) for pk in candidate_node_ids]
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    job = self.create(
                        model_name=model_name,
                        backend_type=backend_type or "",
                        opts_blob=bytes(opts_blob) if opts_blob is not None else None,
                        candidate_node_ids=node_ids,
                        created_at=now,
                    )
                return job, True
            except IntegrityError:
                pass
            job = self.active().for_model(model_name).first()
            if job is None:
                job = self.for_model(model_name).order_by("-created_at").first()
            if job is not None:
                return job, False
        raise IntegrityError(f"could not claim or attach a load job for {model_name!r}")

    def start(self, job_id, runner: str, *, now: datetime | None = None) -> bool:
        """``pending`` -> ``running`` owned by ``runner`` (conditional update; counts an
        attempt). False: someone else started it, or it finished."""
        now = _now(now)
        return (
            self.filter(pk=job_id, state=self.model.State.PENDING).update(
                state=self.model.State.RUNNING,
                runner=runner,
                heartbeat_at=now,
                attempts=F("attempts") + 1,
                progress="started",
            )
            == 1
        )

    def heartbeat(self, job_id, runner: str, *, progress: str | None = None, now: datetime | None = None) -> bool:
        """The runner is alive (and optionally says how far it got). Conditional on the job
        still running under ``runner``: False means it was taken over or reaped; stop."""
        changes = {"heartbeat_at": _now(now)}
        if progress is not None:
            changes["progress"] = progress[:255]
        return self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(**changes) == 1

    def record_replica(self, job_id, runner: str, replica_id, *, now: datetime | None = None) -> bool:
        """Note the ``loading`` row the job just inserted, so a takeover can clean it up."""
        return (
            self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(
                replica_id=replica_id, heartbeat_at=_now(now)
            )
            == 1
        )

    def take_over(
        self, job_id, runner: str, stale_before: datetime, *, max_attempts: int = 3, now: datetime | None = None
    ) -> bool:
        """Adopt a running job whose runner went quiet (heartbeat older than ``stale_before``).

        Conditional update on (running, stale heartbeat, attempts left); the winner then removes
        the dead runner's ``loading`` row and its VRAM reservation in the same transaction and
        runs the load from scratch. False: the runner is alive, the job finished, someone else
        took it over, or it has no attempts left (``reap_dead`` fails it).
        """
        now = _now(now)
        with transaction.atomic():
            taken = (
                self.stale(stale_before=stale_before)
                .filter(pk=job_id, attempts__lt=max_attempts)
                .update(runner=runner, heartbeat_at=now, attempts=F("attempts") + 1, progress="taken over")
                == 1
            )
            if taken:
                replica_id = self.filter(pk=job_id).values_list("replica_id", flat=True).get()
                _discard_loading_row(replica_id)
                self.filter(pk=job_id).update(replica=None)
        return taken

    def succeed(self, job_id, runner: str, replica, *, now: datetime | None = None) -> bool:
        """``running`` -> ``succeeded`` with the replica's coordinates (conditional on
        ``runner`` still owning it). False: the job was taken over or reaped meanwhile."""
        now = _now(now)
        return (
            self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(
                state=self.model.State.SUCCEEDED,
                replica_id=replica.pk,
                node_id=replica.node_id,
                replica_index=replica.replica_index,
                address=replica.address,
                heartbeat_at=now,
                finished_at=now,
                progress="loaded",
                error_code="",
                error_message="",
            )
            == 1
        )

    def fail(
        self, job_id, *, code: str, message: str, runner: str | None = None, now: datetime | None = None
    ) -> bool:
        """An active job -> ``failed`` with a stable error ``code`` (conditional; with ``runner``
        only while that runner owns it). A ``loading`` row the job recorded is removed and its
        VRAM returned. False: the job had already finished or changed hands."""
        now = _now(now)
        queryset = self.active().filter(pk=job_id)
        if runner is not None:
            queryset = queryset.filter(runner=runner)
        with transaction.atomic():
            replica_id = queryset.values_list("replica_id", flat=True).first()
            failed = (
                queryset.update(
                    state=self.model.State.FAILED,
                    error_code=code[:64],
                    error_message=message,
                    heartbeat_at=now,
                    finished_at=now,
                )
                == 1
            )
            if failed:
                _discard_loading_row(replica_id)
        return failed

    def reap_dead(
        self, *, now: datetime | None = None, stale_after: timedelta = timedelta(seconds=60), max_attempts: int = 3
    ) -> ReapResult:
        """Housekeeping for load jobs whose runner died (the reconciler calls this).

        - ``running`` with no heartbeat for ``stale_after``: the dead runner's ``loading`` row
          and VRAM reservation are removed; the job goes back to ``pending`` (requeued) or, after
          ``max_attempts`` runs, to ``failed`` with code ``load_failed``.
        - ``pending`` for ``stale_after`` without a runner (its queue message was lost): requeued
          again; its ``heartbeat_at`` is bumped so it is requeued at most once per window.

        Idiom: each transition is a conditional update on the state and heartbeat read, so a
        runner that heartbeats in between wins, and two reapers never both act on one job.
        The caller enqueues ``requeued`` (``registry.tasks.reap_load_jobs`` does both).
        """
        now = _now(now)
        cutoff = now - stale_after
        State = self.model.State
        requeued, failed, cleaned = [], [], 0
        for job in self.stale(stale_before=cutoff).values("pk", "heartbeat_at", "attempts", "replica_id", "runner"):
            same = self.filter(pk=job["pk"], state=State.RUNNING, runner=job["runner"], heartbeat_at=job["heartbeat_at"])
            with transaction.atomic():
                if job["attempts"] >= max_attempts:
                    changed = same.update(
                        state=State.FAILED,
                        error_code="load_failed",
                        error_message=f"load runner {job['runner'] or '?'} stopped responding "
                        f"({job['attempts']} attempt(s))",
                        finished_at=now,
                        heartbeat_at=now,
                    )
                    target = failed
                else:
                    changed = same.update(state=State.PENDING, runner="", heartbeat_at=now, replica=None, progress="requeued")
                    target = requeued
                if changed:
                    cleaned += _discard_loading_row(job["replica_id"])
                    target.append(job["pk"])
        lost = self.filter(state=State.PENDING).filter(
            Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, created_at__lt=cutoff)
        )
        for job_id, heartbeat_at in lost.values_list("pk", "heartbeat_at"):
            if self.filter(pk=job_id, state=State.PENDING, heartbeat_at=heartbeat_at).update(heartbeat_at=now):
                requeued.append(job_id)
        return ReapResult(requeued=tuple(requeued), failed=tuple(failed), cleaned=cleaned)

    def purge(self, *, finished_before: datetime) -> int:
        """Delete finished jobs older than ``finished_before``; returns how many went."""
        deleted, _ = self.filter(state__in=self.model.FINISHED_STATES, finished_at__lt=finished_before).delete()
        return deleted


# --------------------------------------------------------------------------------------------
# Leases: a frontend's hold on a replica for one request
# --------------------------------------------------------------------------------------------


def _live_leases_of_replica():
    """Live leases of the outer replica row, as a correlated count."""
    Lease = _model("Lease")
    live = Lease.objects.filter(replica=OuterRef("pk"), released_at__isnull=True).order_by().values("replica")
    return Coalesce(Subquery(live.annotate(count=Count("pk")).values("count")[:1]), Value(0))


class LeaseQuerySet(models.QuerySet):
    def live(self):
        return self.filter(released_at__isnull=True)

    def expired(self, *, now: datetime | None = None):
        """Live leases whose TTL has passed (``expires_at <= now``)."""
        return self.live().filter(expires_at__lte=_now(now))


class LeaseManager(models.Manager.from_queryset(LeaseQuerySet)):
    def grant(self, replica, *, ttl: float, now: datetime | None = None):
        """Record a lease on ``replica`` whose ``in_flight`` was just incremented.

        Must run inside the transaction that made the increment (``pick_and_grant`` does), so a
        crash can never leave an increment without its lease or the reverse: ``in_flight`` then
        always equals the replica's live leases. Raises RuntimeError outside a transaction.
        """
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError("Lease.objects.grant must run in the transaction of the in-flight increment")
        now = _now(now)
        return self.create(
            replica=replica,
            model_name=replica.model_name,
            node_id=replica.node_id,
            replica_index=replica.replica_index,
            address=replica.address,
            expires_at=now + timedelta(seconds=float(ttl)),
            created_at=now,
        )

    def pick_and_grant(self, model_name: str, *, ttl: float, node_ids: Iterable | None = None, now: datetime | None = None):
        """Warm pick + lease in one short transaction (``NodeModel.objects.warm_pick``'s row
        lock is held until the lease row is written). Returns the lease (its ``replica`` is the
        picked row, already in memory) or None when no loaded replica is routable."""
        now = _now(now)
        with transaction.atomic():
            replica = _model("NodeModel").objects.warm_pick(model_name, node_ids=node_ids, now=now)
            if replica is None:
                return None
            lease = self.grant(replica, ttl=ttl, now=now)
        lease.replica = replica
        return lease

    def release(self, lease_id, *, now: datetime | None = None) -> bool:
        """End a lease and give its replica's in-flight slot back; idempotent.

        Idiom: conditional update ``released_at IS NULL`` first, and only the call that made
        that transition decrements ``in_flight`` (never below zero), in the same transaction.
        False: unknown lease or already released (by the caller or by ``expire``).
        """
        now = _now(now)
        replica_id = self.filter(pk=lease_id).values_list("replica_id", flat=True).first()
        with transaction.atomic():
            released = self.filter(pk=lease_id, released_at__isnull=True).update(released_at=now) == 1
            if released and replica_id is not None:
                _model("NodeModel").objects.filter(pk=replica_id, in_flight__gt=0).update(in_flight=F("in_flight") - 1)
        return released

    def renew(self, lease_id, *, ttl: float, now: datetime | None = None):
        """Extend a live lease to ``now + ttl``; returns the new ``expires_at``, or None when the
        lease is unknown or already released (conditional update on ``released_at IS NULL``).
        A lease past its TTL that ``expire`` has not swept yet can still be renewed: its
        in-flight slot is still held."""
        now = _now(now)
        expires_at = now + timedelta(seconds=float(ttl))
        renewed = self.filter(pk=lease_id, released_at__isnull=True).update(expires_at=expires_at) == 1
        return expires_at if renewed else None

    def expire(self, now: datetime | None = None, *, batch: int = 1000) -> int:
        """Release every live lease past its TTL (a frontend that never released: crashed, or
        lost the answer). Returns how many leases were released.

        Idiom: in batches, lock expired leases with ``FOR UPDATE SKIP LOCKED`` (a concurrent
        ``release`` of the same lease is skipped, not waited for), mark them released and
        decrement each replica once per lease (never below zero), all in one transaction.
        """
        now = _now(now)
        NodeModel = _model("NodeModel")
        total = 0
        while True:
            with transaction.atomic():
                rows = list(self.expired(now=now).select_for_update(skip_locked=True).values_list("pk", "replica_id")[:batch])
                if not rows:
                    break
                count = self.filter(pk__in=[pk for pk, _ in rows], released_at__isnull=True).update(released_at=now)
                for replica_id, leases in Counter(replica_id for _, replica_id in rows if replica_id).items():
                    NodeModel.objects.filter(pk=replica_id).update(in_flight=Greatest(F("in_flight") - leases, Value(0)))
            total += count
            if len(rows) < batch:
                break
        return total

    def sweep_in_flight(self) -> int:
        """Set every replica's ``in_flight`` to its live lease count; returns rows corrected.

        Repairs leaks (a frontend that crashed between pick and release, a decrement that hit
        a removed row, picks made without a lease). Idiom: lock the drifting rows with
        ``FOR UPDATE SKIP LOCKED`` (rows being picked right now are skipped until the next
        sweep), then recount in a second statement: holding the row lock, every pick on that
        row has either committed its lease (counted) or not yet incremented, so the count is
        exact at commit.
        """
        NodeModel = _model("NodeModel")
        with transaction.atomic():
            drifting = list(
                NodeModel.objects.annotate(live=_live_leases_of_replica())
                .exclude(in_flight=F("live"))
                .select_for_update(skip_locked=True, of=("self",))
                .values_list("pk", flat=True)
            )
            if drifting:
                NodeModel.objects.filter(pk__in=drifting).update(in_flight=_live_leases_of_replica())
        if drifting:
            logger.warning("in-flight sweep corrected %d replica row(s)", len(drifting))
        return len(drifting)

    def purge(self, *, released_before: datetime) -> int:
        """Delete leases released before ``released_before`` (the table grows by one row per
        routed request); returns how many went."""
        deleted, _ = self.filter(released_at__lt=released_before).delete()
        return deleted


# --------------------------------------------------------------------------------------------
# Failed-load backoff
# --------------------------------------------------------------------------------------------


class LoadFailureQuerySet(models.QuerySet):
    def active(self, *, now: datetime | None = None):
        """Failures still in their backoff window."""
        return self.filter(retry_after__gt=_now(now))


class LoadFailureManager(models.Manager.from_queryset(LoadFailureQuerySet)):
    def record(self, model_name: str, node_id, error: str, *, now: datetime | None = None):
        """Count one more failed load of ``model_name`` on ``node_id`` and push its
        ``retry_after`` to ``now + placement.failure_backoff(failures)``. Returns the row.

        Idiom: row lock on the pair inside one transaction; two first failures race on the
        unique constraint and the loser retries into the row lock.
        """
        now = _now(now)
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    row = self.select_for_update().filter(model_name=model_name, node_id=node_id).first()
                    if row is None:
                        row = self.model(model_name=model_name, node_id=node_id, failures=0)
                    row.failures += 1
                    row.last_error = (error or "")[:2000]
                    row.retry_after = now + placement.failure_backoff(row.failures)
                    row.updated_at = now
                    row.save()
                return row
            except IntegrityError:
                continue
        raise IntegrityError(f"could not record a load failure of {model_name!r} on {node_id}")

    def clear(self, model_name: str, node_id) -> bool:
        """A load succeeded there: forget the failures. False when there were none."""
        deleted, _ = self.filter(model_name=model_name, node_id=node_id).delete()
        return deleted > 0
