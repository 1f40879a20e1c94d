"""Node capacity verbs: replica slots and VRAM reservations, mixed into ``NodeManager``.

VRAM admission happens in the database (``reserved += n WHERE available - reserved >= n``),
so concurrent loads on every process can never over-commit a node.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import BigIntegerField, Case, ExpressionWrapper, F, Value, When
from django.db.models.functions import Least

from ..clock import resolve_now
from .shared import capacity_changed, free_vram, registry_model


class NodeCapacityVerbs:
    """The part of ``Node.objects`` that changes what a node can take."""

    def set_max_replicas_per_model(self, node_id, slots: int, *, now: datetime | None = None) -> bool:
        """Operator override of a node's replica slots; re-registration keeps it. Clears
        cooldowns (capacity changed) and refreshes the `node.replica-slots` label. Idiom:
        conditional update by id, then the label upsert and the cooldown clear, in one short
        ``atomic()``. False: unknown node."""
        if int(slots) < 1:
            raise ValueError("max_replicas_per_model must be at least 1")
        with transaction.atomic():
            updated = self.filter(pk=node_id).update(
                max_replicas_per_model=int(slots), max_replicas_per_model_manual=True, updated_at=resolve_now(now)
            )
            if updated:
                registry_model("NodeLabel").objects.merge(
                    node_id, {"node.replica-slots": str(int(slots))}, clear_cooldowns=False, source="auto"
                )
                capacity_changed()
        return updated == 1

    def set_vram_budget(self, node_id, budget: int | None, *, now: datetime | None = None) -> bool:
        """Operator cap on the VRAM our replicas may reserve on a node (None: no cap). Clears
        cooldowns (capacity changed). Idiom: conditional update by id (last writer wins), then
        the cooldown clear, in one short ``atomic()``. False: unknown node."""
        if budget is not None and (isinstance(budget, bool) or int(budget) < 0):
            raise ValueError("vram_budget must be a non-negative byte count or None")
        with transaction.atomic():
            updated = self.filter(pk=node_id).update(
                vram_budget=None if budget is None else int(budget), updated_at=resolve_now(now)
            )
            if updated:
                capacity_changed()
        return updated == 1

    def reset_max_replicas_per_model(self, node_id, *, now: datetime | None = None) -> bool:
        """Drop the operator override: back to what the worker reported at registration. Idiom:
        conditional update by id, then the label upsert and the cooldown clear, in one short
        ``atomic()``. False: unknown node."""
        with transaction.atomic():
            updated = self.filter(pk=node_id).update(
                max_replicas_per_model=F("reported_max_replicas_per_model"),
                max_replicas_per_model_manual=False,
                updated_at=resolve_now(now),
            )
            if updated:
                slots = self.filter(pk=node_id).values_list("max_replicas_per_model", flat=True).get()
                registry_model("NodeLabel").objects.merge(
                    node_id, {"node.replica-slots": str(slots)}, clear_cooldowns=False, source="auto"
                )
                capacity_changed()
        return updated == 1

    def reserve_vram(self, node_id, amount: int) -> bool:
        """Soft-reserve ``amount`` bytes for an in-progress load.

        Admission happens in the database: ``reserved += n WHERE available - reserved >= n``,
        so concurrent loads can never over-commit a node. False: not enough free VRAM.
        Idiom: conditional update (admission in the ``WHERE``).
        """
        if amount <= 0:
            return True
        return (
            self.filter(pk=node_id)
            .annotate(free=free_vram())
            .filter(free__gte=amount)
            .update(reserved_vram=F("reserved_vram") + amount)
            == 1
        )

    def reserve_vram_many(self, amounts: dict) -> bool:
        """Soft-reserve ``amounts[node_id]`` bytes on each node, all or none: True when every
        node had the room (the caller, inside its transaction, rolls back on False). Idiom:
        conditional update (admission per node in the ``WHERE``: ``available - reserved >=
        amount``), one statement for every node."""
        amounts = {node_id: int(n) for node_id, n in amounts.items() if int(n) > 0}
        if not amounts:
            return True
        amount = Case(
            *(When(pk=node_id, then=Value(n)) for node_id, n in amounts.items()), output_field=BigIntegerField()
        )
        updated = (
            self.filter(pk__in=list(amounts))
            .annotate(free=free_vram(), wanted=amount)
            .filter(free__gte=F("wanted"))
            .update(reserved_vram=F("reserved_vram") + amount)
        )
        return updated == len(amounts)

    def release_vram(self, node_id, amount: int) -> bool:
        """Return a reservation: ``reserved -= n WHERE reserved >= n`` (never underflows).

        False when a heartbeat already reset the reservation (nothing left to return).
        Idiom: conditional update ``WHERE reserved_vram >= n``.
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
        Idiom: conditional updates (``release_vram``, else a capped increment of
        ``available_vram``).
        """
        if amount <= 0:
            return True
        if self.release_vram(node_id, amount):
            return True
        grown = ExpressionWrapper(F("available_vram") + Value(int(amount)), output_field=BigIntegerField())
        return self.filter(pk=node_id).update(available_vram=Least(grown, F("total_vram"))) == 1
