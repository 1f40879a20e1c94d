"""Lease verbs: a frontend's hold on one replica for one request."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import models, transaction
from django.db.models import (
    Count,
    F,
    OuterRef,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce

from ..clock import resolve_now
from .shared import registry_model

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Leases: a frontend's hold on a replica for one request
# --------------------------------------------------------------------------------------------


def _live_leases_of_replica():
    """Live leases of the outer replica row, as a correlated count."""
    Lease = registry_model("Lease")
    live = Lease.objects.filter(replica=OuterRef("pk"), released_at__isnull=True).order_by().values("replica")
    return Coalesce(Subquery(live.annotate(count=Count("pk")).values("count")[:1]), Value(0))


class LeaseQuerySet(models.QuerySet):
    def live(self):
        return self.filter(released_at__isnull=True)

    def expired(self, *, now: datetime | None = None):
        """Live leases whose TTL has passed (``expires_at <= now``)."""
        return self.live().filter(expires_at__lte=resolve_now(now))


class LeaseManager(models.Manager.from_queryset(LeaseQuerySet)):
    def grant(self, replica, *, ttl: float, now: datetime | None = None):
        """Record a lease on ``replica`` whose ``in_flight`` was just incremented.

        Must run inside the transaction that made the increment (``pick_and_grant`` does), so a
        crash can never leave an increment without its lease or the reverse: ``in_flight`` then
        always equals the replica's live leases. Raises RuntimeError outside a transaction.
        Idiom: insert inside the caller's transaction (the one holding the replica's row lock).
        Returns the lease.
        """
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError("Lease.objects.grant must run in the transaction of the in-flight increment")
        now = resolve_now(now)
        return self.create(
            replica=replica,
            model_name=replica.model_name,
            node_id=replica.node_id,
            replica_index=replica.replica_index,
            address=replica.address,
            expires_at=now + timedelta(seconds=float(ttl)),
            created_at=now,
        )

    def pick_and_grant(
        self, model_name: str, *, ttl: float, node_ids: Iterable | None = None, now: datetime | None = None
    ):
        """Warm pick + lease in one short transaction (``NodeModel.objects.warm_pick``'s row
        lock is held until the lease row is written). Returns the lease (its ``replica`` is the
        picked row, already in memory) or None when no loaded replica is routable. Idiom: row
        lock (the warm pick's) inside one short ``atomic()``, with the increment and the lease
        insert."""
        now = resolve_now(now)
        with transaction.atomic():
            replica = registry_model("NodeModel").objects.warm_pick(model_name, node_ids=node_ids, now=now)
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
        now = resolve_now(now)
        replica_id = self.filter(pk=lease_id).values_list("replica_id", flat=True).first()
        with transaction.atomic():
            released = self.filter(pk=lease_id, released_at__isnull=True).update(released_at=now) == 1
            if released and replica_id is not None:
                registry_model("NodeModel").objects.decrement_in_flight(replica_id)
        return released

    def renew(self, lease_id, *, ttl: float, now: datetime | None = None):
        """Extend a live lease to ``now + ttl``; returns the new ``expires_at``, or None when the
        lease is unknown or already released (conditional update on ``released_at IS NULL``).
        A lease past its TTL that ``expire`` has not swept yet can still be renewed: its
        in-flight slot is still held. Idiom: conditional update ``WHERE released_at IS NULL``."""
        now = resolve_now(now)
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
        now = resolve_now(now)
        NodeModel = registry_model("NodeModel")
        total = 0
        while True:
            with transaction.atomic():
                rows = list(
                    self.expired(now=now).select_for_update(skip_locked=True).values_list("pk", "replica_id")[:batch]
                )
                if not rows:
                    break
                count = self.filter(pk__in=[pk for pk, _ in rows], released_at__isnull=True).update(released_at=now)
                for replica_id, leases in Counter(replica_id for _, replica_id in rows if replica_id).items():
                    NodeModel.objects.decrement_in_flight(replica_id, leases)
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
        NodeModel = registry_model("NodeModel")
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
        routed request); returns how many went. Idiom: one set-based DELETE of released rows (no
        live lease matches)."""
        deleted, _ = self.filter(released_at__lt=released_before).delete()
        return deleted
