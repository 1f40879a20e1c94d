"""Scheduling config verbs and the circuit breaker."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import (
    Case,
    F,
    Q,
    Value,
    When,
)
from django.db.models.functions import Greatest

from .. import floor_schedule as floor_schedule_module
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


def validate_autoscaling(target, upscale_delay_s, downscale_delay_s) -> None:
    """Check the autoscaling settings (None: off / the default); raise ``ValidationError``."""
    errors = {}
    for field, value, low in (
        ("target_in_flight_per_replica", target, 1),
        ("upscale_delay_s", upscale_delay_s, 0),
        ("downscale_delay_s", downscale_delay_s, 0),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            errors[field] = "must be an integer"
        elif value < low:
            errors[field] = f"must be >= {low}"
    if errors:
        raise ValidationError(errors)


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
        target_in_flight_per_replica: int | None = None,
        upscale_delay_s: int | None = None,
        downscale_delay_s: int | None = None,
        floor_schedule: list | None = None,
        created_by: str = "",
    ) -> ModelSchedulingConfig:
        """Create or replace a model's scheduling config (upsert on ``model_name``).

        Validated first (``ValidationError``); the circuit-breaker columns are not overwritten.
        ``placement`` (``spread``/``binpack``), ``disk_bytes`` (the model's size on disk, 0 =
        unknown) and ``spread_by`` (a node label key, "" = off) are only written when given. The
        autoscaling settings are always written (``target_in_flight_per_replica`` None = off; a
        delay left None takes its default; ``floor_schedule`` None = no window, see
        ``registry.floor_schedule``); the autoscaler's state columns never are.
        A change makes the model's next revision (``ModelRevision.objects.change``).
        Idiom: upsert on ``model_name``, under the row lock of the model's current revision.
        Returns the stored row (read back).
        """
        if not model_name or not model_name.strip():
            raise ValidationError({"model_name": "must not be empty"})
        min_replicas, max_replicas, selector = validate_scheduling(min_replicas, max_replicas, node_selector)
        if placement is not None and placement not in self.model.Placement.values:
            raise ValidationError({"placement": f"must be one of {', '.join(self.model.Placement.values)}"})
        validate_autoscaling(target_in_flight_per_replica, upscale_delay_s, downscale_delay_s)
        try:
            floor_schedule_module.parse(floor_schedule, max_replicas=max_replicas)
        except floor_schedule_module.ScheduleError as exc:
            raise ValidationError({"floor_schedule": exc.args[0]}) from None
        row = self.model(
            model_name=model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=selector
        )
        row.target_in_flight_per_replica = target_in_flight_per_replica
        row.floor_schedule = list(floor_schedule or [])
        if upscale_delay_s is not None:
            row.upscale_delay_s = upscale_delay_s
        if downscale_delay_s is not None:
            row.downscale_delay_s = downscale_delay_s
        update_fields = [
            "min_replicas",
            "max_replicas",
            "node_selector",
            "target_in_flight_per_replica",
            "upscale_delay_s",
            "downscale_delay_s",
            "floor_schedule",
            "updated_at",
        ]
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

    def record_autoscale(self, states) -> int:
        """Store this pass's autoscaler state for many models in one statement: ``states`` is
        an iterable of ``(model_name, load_avg, sampled_at, desired_replicas, desired_since,
        consumed_waiting, busy_at)``; ``busy_at`` is the last sample with something in flight;
        ``consumed_waiting`` is the count of routes at zero the pass read
        (and sized a wake-up from), subtracted, not reset, so routes counted by
        ``record_waiting`` since the pass's snapshot are kept. Idiom: one set-based
        ``UPDATE ... CASE`` keyed by ``model_name``; last writer wins on the state columns
        (only the leader's pass writes them), relative decrement on the waiting count.
        Returns rows written."""
        states = list(states)
        if not states:
            return 0

        def case(values, output_field):
            return Case(
                *(When(model_name=name, then=Value(value, output_field=output_field)) for name, value in values),
                output_field=output_field,
            )

        names = [state[0] for state in states]
        consumed = [(state[0], state[5]) for state in states if state[5]]
        return self.filter(model_name__in=names).update(
            load_avg=case([(s[0], s[1]) for s in states], models.FloatField()),
            load_sampled_at=case([(s[0], s[2]) for s in states], models.DateTimeField()),
            desired_replicas=case([(s[0], s[3]) for s in states], models.PositiveIntegerField()),
            desired_since=case([(s[0], s[4]) for s in states], models.DateTimeField()),
            load_busy_at=case([(s[0], s[6]) for s in states], models.DateTimeField()),
            waiting_at_zero=Case(
                *(When(model_name=name, then=Greatest(F("waiting_at_zero") - seen, 0)) for name, seen in consumed),
                default=F("waiting_at_zero"),
                output_field=models.PositiveIntegerField(),
            ),
        )

    def record_waiting(self, model_name: str, count: int = 1) -> bool:
        """Count ``count`` routes that found no replica of an autoscaled model (its demand at
        zero, which sizes the wake-up). Idiom: atomic increment ``F() + n`` on a conditional
        update (only configs with a target); True when counted."""
        return (
            self.filter(model_name=model_name, target_in_flight_per_replica__isnull=False).update(
                waiting_at_zero=F("waiting_at_zero") + count
            )
            == 1
        )

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
