"""Helpers the registry verbs share (lazy model lookup, clock, common expressions)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from django.apps import apps
from django.db.models import (
    BigIntegerField,
    Count,
    ExpressionWrapper,
    F,
    OuterRef,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

if TYPE_CHECKING:  # pragma: no cover
    pass


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
