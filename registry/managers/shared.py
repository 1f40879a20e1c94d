"""What the registry verbs of several tables share: lazy model lookup, the capacity event, and
the free-VRAM and per-node replica-row expressions."""

from __future__ import annotations

from django.apps import apps
from django.db import OperationalError, connections
from django.db.models import (
    BigIntegerField,
    Count,
    ExpressionWrapper,
    F,
    OuterRef,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce

#: How often a short transaction that PostgreSQL chose as a deadlock victim is run again.
DEADLOCK_ATTEMPTS = 3


def retry_deadlock_victim(work, *, using: str = "default"):
    """Run ``work()``; when PostgreSQL aborted it as a deadlock victim, run it again (at most
    ``DEADLOCK_ATTEMPTS`` times). The verbs that call it are short transactions of their own
    whose lock orders cannot all agree (a release locks its lease, then the replica; a replica
    removal locks the replica, then its leases in Django's ``SET NULL``): the victim's
    transaction was rolled back whole, so running it again is safe. Inside a caller's
    transaction nothing can be retried (the caller's work was rolled back too): the error
    goes up."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return work()
        except OperationalError as exc:
            victim = type(exc.__cause__).__name__ == "DeadlockDetected"
            if not victim or attempt == DEADLOCK_ATTEMPTS or connections[using].in_atomic_block:
                raise


def registry_model(name: str):
    """A registry model class by name. The managers are imported by ``registry.models``, so
    sibling models are resolved lazily, at call time."""
    return apps.get_model("registry", name)


def capacity_changed() -> int:
    """A capacity event (register, approve, labels, slots) ends every model's cooldown early;
    returns how many configs were cleared (``ModelSchedulingConfig.objects.clear_cooldowns``)."""
    return registry_model("ModelSchedulingConfig").objects.clear_cooldowns()


def free_vram(prefix: str = ""):
    """``available_vram - reserved_vram`` as a signed 64-bit expression.

    Declared explicitly: Django would otherwise type the difference of two unsigned columns as a
    32-bit integer on PostgreSQL and drop comparisons with byte counts above 2 GiB.
    """
    return ExpressionWrapper(F(f"{prefix}available_vram") - F(f"{prefix}reserved_vram"), output_field=BigIntegerField())


def replica_rows_subquery(model_name: str | None = None, aggregate=None):
    """Per-node aggregate over replica rows as a correlated subquery.

    Subqueries (not joins) keep these annotations composable with each other and with label
    filters without multiplying rows.
    """
    rows = registry_model("NodeModel").objects.filter(node=OuterRef("pk"))
    if model_name is not None:
        rows = rows.filter(model_name=model_name)
    aggregate = aggregate or Count("pk")
    return Coalesce(
        Subquery(rows.order_by().values("node").annotate(value=aggregate).values("value")[:1]),
        Value(0),
    )


def budget_used():
    """Per-node sum of the replica rows' ``reserved_vram`` (what our replicas hold there, for
    the node's ``vram_budget``) as a 64-bit correlated subquery."""
    rows = registry_model("NodeModel").objects.filter(node=OuterRef("pk")).order_by().values("node")
    total = rows.annotate(value=Sum("reserved_vram")).values("value")[:1]
    return Coalesce(
        Subquery(total, output_field=BigIntegerField()), Value(0), output_field=BigIntegerField()
    )
