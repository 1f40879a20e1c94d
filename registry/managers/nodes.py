"""Node verbs: registration, heartbeats, status transitions (replica slots and VRAM
reservations are in ``capacity``, label verbs in ``labels``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import IntegrityError, connections, models, transaction
from django.db.models import (
    Case,
    Exists,
    F,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.expressions import RawSQL

from core.credentials import node_token
from core.tokens import hash_token, token_matches

from ..clock import resolve_now
from ..heartbeat_cache import forget_node
from ..labels import auto_labels, validate_labels
from .capacity import NodeCapacityVerbs
from .heartbeats import NodeHeartbeatVerbs
from .shared import budget_used, capacity_changed, free_vram, registry_model, replica_rows_subquery

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Node


logger = logging.getLogger(__name__)

# ``mark_offline(expected_heartbeat=ANY_HEARTBEAT)``: no condition on the heartbeat (None is a
# value there: "still no heartbeat").
ANY_HEARTBEAT = object()


@dataclass(frozen=True)
class Registration:
    """What ``Node.objects.register`` returns: the node, its fresh token (shown once; "" for a
    node bound to the fleet token), and whether the name was new."""

    node: Node
    node_token: str
    created: bool


class NodeTokenRequired(Exception):
    """A registration without a per-node token for a name whose node holds one: accepting it
    would let anyone with the fleet token take the node over (its token would stop working and
    the fleet token would drive it). The operator deletes the node first if that is intended."""


class DrainedByOperator(Exception):
    """A node asked to lift a drain an operator set; only an operator's resume lifts it."""


class NodeCredentialRequired(Exception):
    """A re-registration of a name whose node holds a per-node token, without that token: the
    fleet token alone must not take a node over (new address, the old token revoked). The
    worker presents its current node token; otherwise an operator deletes the node first."""


class NodeQuerySet(models.QuerySet):
    def schedulable(self):
        """Healthy backend nodes: the only ones routed to (their replicas count as ready)."""
        return self.filter(self.model.schedulable_filter())

    def placeable(self):
        """Schedulable nodes that answer the worker gRPC service: the only ones new replicas
        are placed on. A LocalAI worker takes backend commands over NATS, which the control
        plane does not speak; a StartBackend sent to it could only fail."""
        return self.schedulable().filter(worker_api=self.model.WorkerApi.AVAILABLE)

    def matching_selector(self, selector: dict[str, str] | None):
        """Nodes carrying every ``key=value`` pair of ``selector`` (AND); ``{}`` matches all."""
        NodeLabel = registry_model("NodeLabel")
        queryset = self
        for key, value in (selector or {}).items():
            queryset = queryset.filter(Exists(NodeLabel.objects.filter(node=OuterRef("pk"), key=key, value=value)))
        return queryset

    def candidates(self, selector: dict[str, str] | None = None, node_ids: Iterable | None = None):
        """Placeable nodes matching a selector, optionally restricted to ``node_ids``."""
        queryset = self.placeable().matching_selector(selector)
        if node_ids is not None:
            queryset = queryset.filter(pk__in=list(node_ids))
        return queryset

    def with_load(self):
        """Annotate ``in_flight_total`` (sum over replicas) and ``replica_count`` (all models)."""
        return self.annotate(
            in_flight_total=replica_rows_subquery(aggregate=Sum("in_flight")),
            replica_count=replica_rows_subquery(),
        )

    def with_model_rows(self, model_name: str):
        """Annotate ``model_rows``: replica rows of ``model_name`` (any state) on each node."""
        return self.annotate(model_rows=replica_rows_subquery(model_name))

    def for_placement(self, model_name: str):
        """Annotate what the scheduler needs for one model, for one snapshot query:
        ``model_rows`` (rows of the model here, any state), ``in_flight_total``,
        ``free_vram_bytes`` (``available - reserved``; not filtered, so a node whose
        reservations exceed a stale report stays a candidate for models of unknown size) and
        ``failure_backoff_until`` (``LoadFailure.retry_after`` of the model here, or None) and
        ``budget_used_bytes`` (the replica rows' reservations, for ``vram_budget``)."""
        backoff = (
            registry_model("LoadFailure")
            .objects.filter(node=OuterRef("pk"), model_name=model_name)
            .values("retry_after")
        )
        return (
            self.with_model_rows(model_name)
            .with_load()
            .annotate(
                free_vram_bytes=free_vram(),
                budget_used_bytes=budget_used(),
                failure_backoff_until=Subquery(backoff[:1]),
            )
        )


def _forget_in_this_process(node_id, *, drop_pending: bool = False, using: str = "default") -> None:
    """Drop what this web process remembers of the node for its heartbeats
    (``registry.heartbeat_cache``): now, and again once the transaction commits (a heartbeat
    confirmed in between read the row as it was before the change)."""
    forget_node(node_id, drop_pending=drop_pending)
    transaction.on_commit(lambda: forget_node(node_id, drop_pending=drop_pending), using=using)


class NodeManager(NodeHeartbeatVerbs, NodeCapacityVerbs, models.Manager.from_queryset(NodeQuerySet)):
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
        total_disk: int = 0,
        available_disk: int | None = None,
        auth_mode: str = "node_token",
        serves_worker_api: bool = True,
        auto_approve: bool = True,
        presented_node_token: str | None = None,
        now: datetime | None = None,
    ) -> Registration:
        """Register a worker by name, or re-register a returning one.

        A returning node keeps its id and comes back ``healthy``, except that a node still
        ``pending`` stays pending (only ``approve`` ends it) and a node an operator drained
        comes back ``draining`` (only an operator's resume ends it); its own drain ends with the
        restart. It keeps an operator-set ``max_replicas_per_model``. Its replica rows are
        deleted (it restarted and runs nothing), the labels it sent replace the ones it sent
        last time (operator labels are kept and win on a shared key; auto-labels are
        rewritten), its node token (derived from its id, ``core.credentials``) is handed over
        again, and every model's unsatisfiable
        cooldown is cleared because capacity changed. A registration that would leave the node
        with more than ``CONTROLPLANE_MAX_LABELS_PER_NODE`` labels raises ``TooManyLabels``
        and writes nothing.

        ``auth_mode``: ``node_token`` (the defaults describe this project's reference worker)
        mints a per-node token; ``fleet_token`` (LocalAI's worker) mints none: the node's calls
        are authenticated by the fleet token, and the token hash is cleared. A node that holds a
        per-node token is never switched to ``fleet_token`` here: that raises
        ``NodeTokenRequired`` (nothing is written), and re-registering such a node needs its
        current node token in ``presented_node_token``: without it (or with another) this raises
        ``NodeCredentialRequired`` and nothing changes, so the fleet token alone cannot take the
        node over. A ``fleet_token`` node's credential is the fleet token itself (LocalAI's trust
        model), so it re-registers without one. ``serves_worker_api``: the worker declared
        that it answers the worker gRPC service, so it starts ``worker_api = available``;
        otherwise ``unknown`` until the reconciler's listing says (only ``available`` nodes are
        placed on).

        Idiom: row lock on the name inside one transaction; two first registrations of one name
        race on the unique constraint, and the loser retries into the row lock, so exactly one
        node exists. Returns a ``Registration`` whose ``node_token`` is shown to the worker once.
        """
        if not name or not name.strip():
            raise ValueError("node name must not be empty")
        AuthMode, WorkerApi = self.model.AuthMode, self.model.WorkerApi
        if auth_mode not in AuthMode.values:
            raise ValueError(f"unknown auth mode {auth_mode!r}")
        labels = validate_labels(labels)
        now = resolve_now(now)
        slots = max(1, int(max_replicas_per_model or 1))
        issues_token = auth_mode == AuthMode.NODE_TOKEN
        capacity = {
            "node_type": node_type,
            "address": address,
            "http_address": http_address,
            "total_vram": total_vram,
            "available_vram": total_vram if available_vram is None else available_vram,
            "total_ram": total_ram,
            "available_ram": total_ram if available_ram is None else available_ram,
            "gpu_vendor": gpu_vendor or "unknown",
            "total_disk": total_disk,
            "available_disk": total_disk if available_disk is None else available_disk,
            "reserved_vram": 0,
            "reported_max_replicas_per_model": slots,
            "auth_mode": auth_mode,
            "worker_api": WorkerApi.AVAILABLE if serves_worker_api else WorkerApi.UNKNOWN,
            "worker_api_detail": "declared at registration" if serves_worker_api else "",
            "worker_api_checked_at": now if serves_worker_api else None,
            "last_heartbeat": now,
        }
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    node = self.select_for_update().filter(name=name).first()
                    created = node is None
                    if not created and node.auth_mode == AuthMode.NODE_TOKEN and auth_mode != AuthMode.NODE_TOKEN:
                        raise NodeTokenRequired(
                            f"node {name!r} holds a per-node token; it cannot re-register with the fleet token alone"
                        )
                    if (
                        not created
                        and node.auth_mode == AuthMode.NODE_TOKEN
                        and node.token_hash
                        and not token_matches(presented_node_token or "", node.token_hash)
                    ):
                        raise NodeCredentialRequired(
                            f"node {name!r} exists; re-registering it needs its current node token"
                        )
                    # The node token is derived from the node id (core.credentials), so
                    # the hash a restored database holds still matches the token a worker kept
                    # across registrations made after the backup.
                    node_id = uuid.uuid4() if created else node.pk
                    token = node_token(node_id) if issues_token else ""
                    capacity["token_hash"] = hash_token(token) if token else ""
                    if created:
                        node = self.create(
                            id=node_id,
                            name=name,
                            status=self.model.Status.HEALTHY if auto_approve else self.model.Status.PENDING,
                            max_replicas_per_model=slots,
                            **capacity,
                        )
                    else:
                        for field, value in capacity.items():
                            setattr(node, field, value)
                        node.status, node.drained_by = self._status_after_restart(node)
                        if not node.max_replicas_per_model_manual:
                            node.max_replicas_per_model = slots
                        node.save()
                        registry_model("NodeModel").objects.forget_node_replicas(node.pk)
                    effective_slots = node.max_replicas_per_model
                    registry_model("NodeLabel").objects.apply_registration(
                        node.pk,
                        labels,
                        auto_labels(
                            name=name,
                            gpu_vendor=node.gpu_vendor,
                            total_vram=total_vram,
                            max_replicas_per_model=effective_slots,
                        ),
                    )
                    capacity_changed()
                    _forget_in_this_process(node.pk, drop_pending=True, using=self.db)
                return Registration(node=node, node_token=token, created=created)
            except IntegrityError:
                # Another process inserted this name between our lookup and insert; the next
                # attempt finds its row and waits on the row lock.
                logger.info("node %s registered concurrently; retrying as a re-registration", name)
        raise IntegrityError(f"could not register node {name!r} after concurrent attempts")

    def _status_after_restart(self, node) -> tuple[str, str]:
        """``(status, drained_by)`` of a returning node (read under its row lock): pending stays
        pending, an operator's drain stays, anything else (its own drain included) is healthy."""
        Status, DrainedBy = self.model.Status, self.model.DrainedBy
        if node.status == Status.PENDING:
            return Status.PENDING, DrainedBy.NONE
        if node.drained_by == DrainedBy.OPERATOR:
            return Status.DRAINING, DrainedBy.OPERATOR
        return Status.HEALTHY, DrainedBy.NONE

    def record_worker_api(
        self, node_id, *, available: bool, detail: str = "", address: str | None = None, now: datetime | None = None
    ) -> bool:
        """Record what the reconciler's ``ListBackends`` call found at the node's address:
        ``available`` (the worker gRPC service answered) or ``missing`` (nothing answers, or
        something that is not this node's worker service), with ``detail`` the human reason.

        Idiom: one conditional UPDATE, applied only while the node still has ``address`` (when
        given): an answer about an address the node no longer registers is not about this node.
        A re-registration on the same address racing the call may be overwritten; the next
        pass's listing corrects it. Returns False when nothing was written (unknown node, or
        its address changed).
        """
        now = resolve_now(now)
        WorkerApi = self.model.WorkerApi
        queryset = self.filter(pk=node_id)
        if address is not None:
            queryset = queryset.filter(address=address)
        return (
            queryset.update(
                worker_api=WorkerApi.AVAILABLE if available else WorkerApi.MISSING,
                worker_api_detail=(detail or "")[:255],
                worker_api_checked_at=now,
            )
            == 1
        )

    def record_workers_answering(self, addresses: Mapping, *, now: datetime | None = None) -> int:
        """``record_worker_api(available=True)`` for every node whose worker answered this
        pass's ``ListBackends``: ``addresses`` maps each node id to the address it was asked at.

        Idiom: one conditional UPDATE for all of them (``WHERE (id, address) IN (VALUES ...)``),
        so a steady pass writes the fleet's worker-service state in one statement whatever its
        size; each row keeps ``record_worker_api``'s address condition (an answer about an
        address the node no longer registers is not about this node). A row-value list, not
        an OR of ``Q`` pairs: compiling a thousand ``Q`` objects costs more than the UPDATE.
        Returns the rows written.
        """
        if not addresses:
            return 0
        connection = connections[self.db]
        quote = connection.ops.quote_name
        pk = self.model._meta.pk
        table = quote(self.model._meta.db_table)
        pairs = ", ".join(["(%s, %s)"] * len(addresses))
        answered = RawSQL(
            f"({table}.{quote(pk.column)}, {table}.{quote('address')}) IN (VALUES {pairs})",
            [
                value
                for node_id, address in addresses.items()
                for value in (pk.get_db_prep_value(node_id, connection), address)
            ],
            output_field=models.BooleanField(),
        )
        return self.filter(answered).update(
            worker_api=self.model.WorkerApi.AVAILABLE, worker_api_detail="", worker_api_checked_at=resolve_now(now)
        )

    def _transition(
        self,
        node_id,
        to_status: str,
        *,
        from_statuses=None,
        exclude_statuses=None,
        now: datetime | None = None,
        **extra,
    ) -> bool:
        """Status change of one node. Idiom: conditional update by id and the expected statuses;
        True when the row changed."""
        queryset = self.filter(pk=node_id)
        if from_statuses is not None:
            queryset = queryset.filter(status__in=from_statuses)
        if exclude_statuses is not None:
            queryset = queryset.exclude(status__in=exclude_statuses)
        changed = queryset.update(status=to_status, updated_at=resolve_now(now), **extra) == 1
        if changed:
            _forget_in_this_process(node_id, using=self.db)
        return changed

    def approve(self, node_id, *, now: datetime | None = None) -> bool:
        """``pending`` -> ``healthy`` (conditional update). False: unknown or not pending.
        The only way out of ``pending``: no node-side call, heartbeat, re-registration or
        reconciler pass leaves it. Approval adds capacity, so cooldowns are cleared. Idiom:
        conditional update ``WHERE status = 'pending'``."""
        Status = self.model.Status
        approved = self._transition(node_id, Status.HEALTHY, from_statuses=[Status.PENDING], now=now)
        if approved:
            capacity_changed()
        return approved

    def mark_healthy(self, node_id, *, now: datetime | None = None) -> bool:
        """``unhealthy``/``offline`` -> ``healthy`` when heartbeats are fresh again (conditional
        update); a node an operator drained comes back ``draining`` instead (the drain was kept
        while it was away). Never overrides ``pending`` (needs approval) or ``draining``
        (whoever drained it lifts it). False: unknown node or not in a recoverable status.
        Idiom: conditional update ``WHERE status IN ('unhealthy', 'offline')``."""
        Status, DrainedBy = self.model.Status, self.model.DrainedBy
        back = Case(When(drained_by=DrainedBy.OPERATOR, then=Value(Status.DRAINING)), default=Value(Status.HEALTHY))
        return self._transition(node_id, back, from_statuses=[Status.UNHEALTHY, Status.OFFLINE], now=now)

    def mark_unhealthy(self, node_id, *, now: datetime | None = None) -> bool:
        """``healthy`` -> ``unhealthy``: status only, replica rows kept (a blip must not force
        reloads). Conditional update; False when the node was not healthy. Idiom: conditional
        update ``WHERE status = 'healthy'``."""
        Status = self.model.Status
        return self._transition(node_id, Status.UNHEALTHY, from_statuses=[Status.HEALTHY], now=now)

    def mark_draining(self, node_id, *, by: str, now: datetime | None = None) -> bool:
        """Stop routing and scheduling to a node so its in-flight work can finish; ``by`` is
        ``Node.DrainedBy.NODE`` (the node's own ``/drain``) or ``OPERATOR`` (API, admin) and is
        recorded in ``drained_by``: whoever drained a node lifts the drain (``resume``).

        An operator's drain also takes over a node's own drain (the node can no longer lift
        it); a node's drain of a node an operator drained changes nothing. A pending node
        cannot drain (only approval ends ``pending``), nor an offline one.

        Replica rows are kept on purpose (LocalAI deleted them): the worker polls its
        rows' in-flight sum before deregistering, and leases on them must still be releasable.
        Draining nodes are not schedulable, so their replicas stop counting as ready and the
        reconciler places replacements elsewhere. Idiom: one conditional UPDATE; False: unknown
        node, pending/offline, or already drained by ``by`` (or by an operator).
        """
        Status, DrainedBy = self.model.Status, self.model.DrainedBy
        if by not in (DrainedBy.NODE, DrainedBy.OPERATOR):
            raise ValueError(f"a drain is set by the node or an operator, not {by!r}")
        queryset = self.filter(pk=node_id).exclude(status__in=[Status.OFFLINE, Status.PENDING])
        if by == DrainedBy.OPERATOR:
            queryset = queryset.exclude(status=Status.DRAINING, drained_by=DrainedBy.OPERATOR)
        else:
            queryset = queryset.exclude(status=Status.DRAINING)
        drained = queryset.update(status=Status.DRAINING, drained_by=by, updated_at=resolve_now(now)) == 1
        if drained:
            _forget_in_this_process(node_id, using=self.db)
        return drained

    def resume(self, node_id, *, by: str, now: datetime | None = None) -> bool:
        """``draining`` -> ``healthy``, lifting the drain (conditional update); adds capacity back.

        ``by=Node.DrainedBy.OPERATOR`` lifts any drain; ``by=NODE`` only the node's own: when an
        operator drained the node it raises ``DrainedByOperator`` and changes nothing. The
        owner is part of the UPDATE's condition, so a node's resume racing an operator's drain
        either lands first (and the drain then applies) or matches nothing. False: unknown node
        or not draining.
        Idiom: conditional update on status and drain owner.
        """
        Status, DrainedBy = self.model.Status, self.model.DrainedBy
        if by not in (DrainedBy.NODE, DrainedBy.OPERATOR):
            raise ValueError(f"a drain is lifted by the node or an operator, not {by!r}")
        queryset = self.filter(pk=node_id, status=Status.DRAINING)
        if by == DrainedBy.NODE:
            queryset = queryset.exclude(drained_by=DrainedBy.OPERATOR)
        resumed = queryset.update(status=Status.HEALTHY, drained_by=DrainedBy.NONE, updated_at=resolve_now(now)) == 1
        if resumed:
            _forget_in_this_process(node_id, using=self.db)
            capacity_changed()
        elif (
            by == DrainedBy.NODE
            and self.filter(pk=node_id, status=Status.DRAINING, drained_by=DrainedBy.OPERATOR).exists()
        ):
            raise DrainedByOperator("an operator drained this node; only an operator's resume lifts the drain")
        return resumed

    def mark_offline(
        self,
        node_id,
        *,
        expected_heartbeat=ANY_HEARTBEAT,
        forget_heartbeat: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """Mark a node ``offline`` and delete its replica rows; load info is untouched.

        The row is kept so that re-registration restores its approval; for the same reason a
        ``pending`` node stays ``pending`` (its rows and heartbeat are still dropped: it can
        never come back approved by signing off and registering again), and an operator's
        drain is kept in ``drained_by`` (it comes back draining). With
        ``expected_heartbeat`` (the ``last_heartbeat`` value the reconciler observed, possibly
        None), the transition only happens while ``last_heartbeat`` still is that value: a
        heartbeat that arrives between the reconciler's snapshot and this call wins
        (conditional update). Equality, not a time comparison, so no web process's clock is
        compared with the reconciler's. ``forget_heartbeat`` (a worker signing off) also clears
        ``last_heartbeat``: the worker's last heartbeat is still fresh, and the reconciler would
        otherwise "recover" the node and place replicas on a worker that is exiting; a new
        heartbeat brings it back. Returns False when nothing changed.
        Idiom: conditional update of the node, then ``NodeModel.objects.forget_node_replicas``
        in the same short ``atomic()``: the status and the rows change together.
        """
        Status, DrainedBy = self.model.Status, self.model.DrainedBy
        changes = {
            "status": Case(When(status=Status.PENDING, then=Value(Status.PENDING)), default=Value(Status.OFFLINE)),
            "drained_by": Case(
                When(drained_by=DrainedBy.OPERATOR, then=Value(DrainedBy.OPERATOR)), default=Value(DrainedBy.NONE)
            ),
            "reserved_vram": 0,
            "updated_at": resolve_now(now),
        }
        if forget_heartbeat:
            changes["last_heartbeat"] = None
        with transaction.atomic():
            queryset = self.filter(pk=node_id)
            if expected_heartbeat is None:
                queryset = queryset.filter(last_heartbeat__isnull=True)
            elif expected_heartbeat is not ANY_HEARTBEAT:
                queryset = queryset.filter(last_heartbeat=expected_heartbeat)
            changed = queryset.update(**changes) == 1
            if changed:
                registry_model("NodeModel").objects.forget_node_replicas(node_id)
                _forget_in_this_process(node_id, drop_pending=True, using=self.db)
        return changed

    def observe_heartbeats(self, *, now: datetime | None = None, restart: bool = False) -> int:
        """The reconciler's observation of heartbeats, once per pass; returns the rows written.

        Every node whose ``last_heartbeat`` differs from the value last observed
        (``heartbeat_seen``) gets ``heartbeat_seen = last_heartbeat`` and ``heartbeat_seen_at =
        now`` (the pass's clock). Staleness is then counted on one clock, the reconciler's,
        whatever the clock of the web process that wrote the heartbeat. With ``restart``
        (observation resumed after a gap) every node is stamped ``now``: staleness is counted
        from when observation resumed, never across time the control plane could not receive
        heartbeats. Idiom: one set-based conditional UPDATE (``WHERE heartbeat_seen IS DISTINCT
        FROM last_heartbeat``); a heartbeat landing concurrently is recorded by this statement
        or by the next pass, and ``mark_offline(expected_heartbeat=...)`` keeps it from being
        reaped meanwhile.
        """
        queryset = self.all()
        if not restart:
            queryset = queryset.filter(
                Q(heartbeat_seen__isnull=True, last_heartbeat__isnull=False)
                | Q(heartbeat_seen__isnull=False, last_heartbeat__isnull=True)
                | (
                    Q(heartbeat_seen__isnull=False, last_heartbeat__isnull=False)
                    & ~Q(heartbeat_seen=F("last_heartbeat"))
                )
            )
        return queryset.update(heartbeat_seen=F("last_heartbeat"), heartbeat_seen_at=resolve_now(now))

    def deregister(self, node_id) -> bool:
        """Operator hard delete: the node, its labels and replica rows go in one transaction.
        Returns False for an unknown node. Idiom: row lock, then one DELETE by id (labels,
        replica rows and load failures cascade) in a short ``atomic()``. The lock comes first
        because Django collects the cascaded rows before deleting the node: a replica report
        (``NodeModel.objects.report_loaded`` locks the node too) committing in between would
        otherwise leave a row pointing at a deleted node (a foreign-key error)."""
        with transaction.atomic():
            if not self.select_for_update().filter(pk=node_id).exists():
                return False
            # Its replica rows too: a warm pick does not lock the node (NodeModel._delete_locked).
            list(registry_model("NodeModel").objects.filter(node_id=node_id).select_for_update().values_list("pk"))
            deleted, _ = self.filter(pk=node_id).delete()
            _forget_in_this_process(node_id, drop_pending=True, using=self.db)
        return deleted > 0
