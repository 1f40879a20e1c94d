"""The scheduling rules every part reads the same way: which models the reconciler manages
(*autoscaled*) and how many ready replicas a model keeps at least (its *floor*).

Written once, here, as plain functions of ``(min_replicas, max_replicas)`` so that the pure
planners (the reconciler's snapshot, ``placement``) and the model/queryset
(``ModelSchedulingConfig.is_autoscaled``, ``.floor``, ``ModelSchedulingConfig.objects.autoscaled()``,
the status API) all apply one definition. ``AUTOSCALED`` is the same rule as a query filter.
"""

from __future__ import annotations

from django.db.models import Q

AUTOSCALED = Q(min_replicas__gt=0) | Q(max_replicas__gt=0)


def is_autoscaled(min_replicas: int, max_replicas: int) -> bool:
    """A model with a floor or a ceiling (``min > 0 or max > 0``) is kept at its replica counts
    by the reconciler; ``0/0`` (the default) leaves it to on-demand loads alone."""
    return min_replicas > 0 or max_replicas > 0


def replica_floor(min_replicas: int, max_replicas: int) -> int:
    """Ready replicas a scale-down or an eviction must leave: ``max(min, 1)`` for an autoscaled
    model (a managed model never goes to zero by being idle), 0 for any other."""
    return max(min_replicas, 1) if is_autoscaled(min_replicas, max_replicas) else 0


def ready_for_available(min_replicas: int) -> int:
    """Ready replicas for a model's ``Available`` condition to hold: its ``min_replicas``, and
    at least one for every model (one with nothing ready serves nothing, managed or not)."""
    return max(min_replicas, 1)
