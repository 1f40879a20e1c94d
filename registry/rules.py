"""The scheduling rules every part reads the same way: which models the reconciler manages
(*autoscaled*) and how many ready replicas a model keeps at least (its *floor*).

Written once, here, as plain functions of ``(min_replicas, max_replicas)`` so that the pure
planners (the reconciler's snapshot, ``placement``) and the model/queryset
(``ModelSchedulingConfig.is_autoscaled``, ``.floor``, ``ModelSchedulingConfig.objects.autoscaled()``,
the status API) all apply one definition. ``AUTOSCALED`` is the same rule as a query filter.
"""

from __future__ import annotations

from django.db.models import Q

AUTOSCALED = Q(min_replicas__gt=0) | Q(max_replicas__gt=0) | Q(target_in_flight_per_replica__isnull=False)


def is_autoscaled(min_replicas: int, max_replicas: int, target: int | None = None) -> bool:
    """A model with a floor, a ceiling or a load target (``min > 0 or max > 0 or target``) is
    kept at its replica counts by the reconciler; ``0/0`` without a target (the default)
    leaves it to on-demand loads alone."""
    return min_replicas > 0 or max_replicas > 0 or target is not None


def replica_floor(min_replicas: int, max_replicas: int, target: int | None = None) -> int:
    """Ready replicas a scale-down or an eviction must leave: ``max(min, 1)`` for an autoscaled
    model (a managed model never goes to zero by being idle), 0 for any other. A model with a
    load target (``target_in_flight_per_replica``) keeps exactly ``min_replicas``: with
    ``min_replicas = 0`` it scales to zero (docs/autoscaling.md)."""
    if target is not None:
        return min_replicas
    return max(min_replicas, 1) if is_autoscaled(min_replicas, max_replicas) else 0


def ready_for_available(min_replicas: int) -> int:
    """Ready replicas for a model's ``Available`` condition to hold: its ``min_replicas``, and
    at least one for every model (one with nothing ready serves nothing, managed or not)."""
    return max(min_replicas, 1)
