"""What the registry verbs of several tables share: lazy model lookup, the capacity event, and
the free-VRAM and per-node replica-row expressions."""

from __future__ import annotations

from django.apps import apps
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
