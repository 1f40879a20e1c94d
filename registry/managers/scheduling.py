"""Scheduling config verbs and the circuit breaker."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import (
    F,
    Q,
)

from .. import rules
from ..clock import resolve_now
from ..labels import validate_labels
from .revisions import SCHEDULING_FIELDS as _REVISION_FIELDS
from .shared import registry_model

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSchedulingConfig


logger = logging.getLogger(__name__)

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
        return self.filter(rules.AUTOSCALED)


class ModelSchedulingConfigManager(models.Manager.from_queryset(ModelSchedulingConfigQuerySet)):
    def upsert(
        self,
        model_name: str,
        *,
        min_replicas: int = 0,
        max_replicas: int = 0,
        node_selector: dict[str, str] | None = None,
        placement: str | None = None,
        disk_bytes: int | None = None,
        spread_by: str | None = None,
        created_by: str = "",
    ) -> ModelSchedulingConfig:
        """Create or replace a model's scheduling config (upsert on ``model_name``).

        Validated first (``ValidationError``); the circuit-breaker columns are not overwritten.
        ``placement`` (``spread``/``binpack``), ``disk_bytes`` (the model's size on disk, 0 =
        unknown) and ``spread_by`` (a node label key, "" = off) are only written when given.
        A change makes the model's next revision (``ModelRevision.objects.change``).
        Idiom: upsert on ``model_name``, under the row lock of the model's current revision.
        Returns the stored row (read back).
        """
        if not model_name or not model_name.strip():
            raise ValidationError({"model_name": "must not be empty"})
        min_replicas, max_replicas, selector = validate_scheduling(min_replicas, max_replicas, node_selector)
        if placement is not None and placement not in self.model.Placement.values:
            raise ValidationError({"placement": f"must be one of {', '.join(self.model.Placement.values)}"})
        row = self.model(
            model_name=model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=selector
        )
        update_fields = ["min_replicas", "max_replicas", "node_selector", "updated_at"]
        if placement is not None:
            row.placement = placement
            update_fields.append("placement")
        if disk_bytes is not None:
            if isinstance(disk_bytes, bool) or not isinstance(disk_bytes, int) or disk_bytes < 0:
                raise ValidationError({"disk_bytes": "must be a non-negative integer"})
            row.disk_bytes = disk_bytes
            update_fields.append("disk_bytes")
        if spread_by is not None:
            if not isinstance(spread_by, str) or len(spread_by) > 63 or spread_by != spread_by.strip():
                raise ValidationError({"spread_by": "must be a label key of at most 63 characters"})
            row.spread_by = spread_by
            update_fields.append("spread_by")
        registry_model("ModelRevision").objects.change(
            model_name,
            lambda: self.bulk_create(
                [row], update_conflicts=True, unique_fields=["model_name"], update_fields=update_fields
            ),
            reason="scheduling config changed",
            created_by=created_by,
        )
        return self.get(model_name=model_name)

    def write_row(self, model_name: str, **fields) -> None:
        """Store a scheduling config as a revision snapshotted it (a rollback; the values were
        validated when first written), without revision bookkeeping. Idiom: upsert on
        ``model_name``; the circuit-breaker columns are not overwritten."""
        fields = {key: value for key, value in fields.items() if key in _REVISION_FIELDS}
        row = self.model(model_name=model_name, **fields)
        self.bulk_create(
            [row], update_conflicts=True, unique_fields=["model_name"], update_fields=[*fields, "updated_at"]
        )

    def record_unsatisfiable(
        self, model_name: str, *, threshold: int, cooldown: timedelta, now: datetime | None = None
    ) -> bool:
        """Count a pass in which the model had no capacity; after ``threshold`` consecutive
        passes start a cooldown of ``cooldown`` and reset the count. Returns True when this
        call tripped the breaker. Idiom: two conditional updates in one transaction."""
        now = resolve_now(now)
        with transaction.atomic():
            self.filter(model_name=model_name).update(unsatisfiable_ticks=F("unsatisfiable_ticks") + 1)
            tripped = self.filter(model_name=model_name, unsatisfiable_ticks__gte=threshold).update(
                unsatisfiable_ticks=0, unsatisfiable_until=now + cooldown
            )
        return tripped == 1

    def record_satisfiable(self, model_name: str) -> bool:
        """The model had capacity this pass: reset the consecutive count (conditional). Idiom:
        conditional update ``WHERE unsatisfiable_ticks > 0``; True when the count was reset."""
        return self.filter(model_name=model_name, unsatisfiable_ticks__gt=0).update(unsatisfiable_ticks=0) == 1

    def remove(self, model_name: str) -> bool:
        """Forget a model's scheduling config: the reconciler stops managing it (its replicas
        and load info stay). False when there was none. The model's next revision records the
        removal (a rollback to an earlier revision brings the config back). Idiom: conditional
        delete by ``model_name``, under the model's revision lock (``ModelRevision.objects.change``)."""
        deleted, _ = registry_model("ModelRevision").objects.change(
            model_name, lambda: self.filter(model_name=model_name).delete()[0], reason="scheduling config removed"
        )
        return deleted > 0

    def clear_cooldown(self, model_name: str) -> bool:
        """End one model's cooldown and reset its count. Idiom: conditional update (only a
        config in cooldown or counting is written); True when it was."""
        return self._clear(self.filter(model_name=model_name)) == 1

    def clear_cooldowns(self) -> int:
        """End every model's cooldown and count (a capacity event happened). Idiom: one
        set-based conditional update (only configs in cooldown or counting are written); returns
        how many."""
        return self._clear(self.all())

    @staticmethod
    def _clear(queryset) -> int:
        """The conditional update behind ``clear_cooldown(s)``; returns rows written."""
        return queryset.filter(Q(unsatisfiable_until__isnull=False) | Q(unsatisfiable_ticks__gt=0)).update(
            unsatisfiable_until=None, unsatisfiable_ticks=0
        )
