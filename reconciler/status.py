"""Read side for the operator API: what each model wants, has, and why (fixed query counts).

``known_model_names`` is one UNION query; ``model_statuses`` answers for any number of names in
seven queries. "Ready" is the registry's own definition (``NodeModel.objects.ready()``: loaded rows
on healthy backend nodes), so the API and the reconciler count the same replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count
from django.db.models.functions import Length
from django.utils import timezone

from registry import floor_schedule, rules
from registry.models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, NodeModel

from .models import ModelCondition


@dataclass(frozen=True)
class ModelStatus:
    model_name: str
    configured: bool = False  # has a scheduling config
    min_replicas: int = 0
    max_replicas: int = 0
    node_selector: dict = field(default_factory=dict)
    autoscaled: bool = False
    unsatisfiable_until: datetime | None = None
    target_in_flight_per_replica: int | None = None
    desired_replicas: int | None = None  # ``desired_replicas()``
    effective_min_replicas: int = 0  # min_replicas, raised by an open floor-schedule window
    load_info: str | None = None  # "model" (per-model row), "replica" (legacy row) or None
    ready_replicas: int = 0
    loading_replicas: int = 0
    replicas: int = 0  # rows in any state on any node
    revision: int | None = None  # the current config revision (None: no change recorded yet)
    conditions: list[dict] = field(default_factory=list)


def known_model_names(
    *, configured: bool | None = None, autoscaled: bool | None = None, name_contains: str = ""
) -> list[str]:
    """Every model named by a scheduling config, load info or a replica row, sorted (one query):
    the UNION of the three tables' names. The filters narrow each part before the union (a
    UNION cannot be filtered afterwards): ``configured`` (has a scheduling config or not),
    ``autoscaled`` (``registry.rules.AUTOSCALED``; a model without a config is not),
    ``name_contains`` (case-insensitive)."""
    configs = ModelSchedulingConfig.objects.order_by()
    others = [ModelLoadInfo.objects.order_by(), NodeModel.objects.order_by()]
    if name_contains:
        configs = configs.filter(model_name__icontains=name_contains)
        others = [part.filter(model_name__icontains=name_contains) for part in others]
    if autoscaled is True:
        configs, others = configs.filter(rules.AUTOSCALED), []
    elif autoscaled is False:
        managed = ModelSchedulingConfig.objects.filter(rules.AUTOSCALED).values("model_name")
        configs = configs.exclude(rules.AUTOSCALED)
        others = [part.exclude(model_name__in=managed) for part in others]
    if configured is True:
        others = []
    elif configured is False:
        every_config = ModelSchedulingConfig.objects.values("model_name")
        configs, others = None, [part.exclude(model_name__in=every_config) for part in others]
    parts = [part.values_list("model_name") for part in ([configs] if configs is not None else []) + others]
    if not parts:
        return []
    first, *rest = parts
    names = first.union(*rest) if rest else first.distinct()
    return [name for (name,) in names.order_by("model_name")]


def _counts(queryset, names) -> dict[str, int]:
    rows = queryset.filter(model_name__in=names).order_by().values("model_name").annotate(n=Count("pk"))
    return {row["model_name"]: row["n"] for row in rows}


def model_statuses(names: list[str]) -> list[ModelStatus]:
    """The status of each named model (unknown names included, with zero counts), in order."""
    if not names:
        return []
    configs = {row["model_name"]: row for row in ModelSchedulingConfig.objects.filter(model_name__in=names).values()}
    per_model = set(ModelLoadInfo.objects.filter(model_name__in=names).values_list("model_name", flat=True))
    legacy = set(
        NodeModel.objects.filter(model_name__in=names)
        .loaded()
        .annotate(blob_length=Length("model_opts_blob"))
        .filter(blob_length__gt=0)
        .values_list("model_name", flat=True)
        .distinct()
    )
    ready = _counts(NodeModel.objects.ready(), names)
    loading = _counts(NodeModel.objects.loading(), names)
    total = _counts(NodeModel.objects.all(), names)
    revisions = ModelRevision.objects.head_numbers(names)
    conditions: dict[str, list[dict]] = {}
    for row in (
        ModelCondition.objects.filter(model_name__in=names)
        .order_by("model_name", "type")
        .values("model_name", "type", "status", "reason", "message", "since", "updated_at")
    ):
        conditions.setdefault(row.pop("model_name"), []).append(row)
    statuses = []
    now = timezone.now()
    for name in names:
        config = configs.get(name, {})
        min_replicas, max_replicas = config.get("min_replicas", 0), config.get("max_replicas", 0)
        target = config.get("target_in_flight_per_replica")
        floor = effective_min_replicas(config, now)
        statuses.append(
            ModelStatus(
                model_name=name,
                configured=name in configs,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                node_selector=config.get("node_selector") or {},
                autoscaled=rules.is_autoscaled(floor, max_replicas, target),
                unsatisfiable_until=config.get("unsatisfiable_until"),
                target_in_flight_per_replica=target,
                desired_replicas=desired_replicas(config, floor),
                effective_min_replicas=floor,
                load_info="model" if name in per_model else ("replica" if name in legacy else None),
                ready_replicas=ready.get(name, 0),
                loading_replicas=loading.get(name, 0),
                replicas=total.get(name, 0),
                revision=revisions.get(name),
                conditions=conditions.get(name, []),
            )
        )
    return statuses


def effective_min_replicas(config: dict, now) -> int:
    """The floor in force at ``now``: ``min_replicas``, raised by an open window of the
    model's floor schedule (``registry.floor_schedule``), as the reconciler's snapshot reads it."""
    min_replicas = config.get("min_replicas", 0)
    try:
        windows = floor_schedule.parse(config.get("floor_schedule") or [])
    except floor_schedule.ScheduleError:  # stored, then its time zone left the system: as the pass
        windows = ()
    return floor_schedule.effective_floor(min_replicas, windows, now, max_replicas=config.get("max_replicas", 0))


def desired_replicas(config: dict, min_replicas: int | None = None) -> int | None:
    """The replica count the reconciler aims at: with a load target, the count the load asked
    for at the last pass (None before the first); for another autoscaled model its floor
    (``rules.replica_floor``, from ``min_replicas``: the floor in force, stored one by
    default); None for a model the reconciler does not manage."""
    if not config:
        return None
    target = config.get("target_in_flight_per_replica")
    if target is not None:
        return config.get("desired_replicas")
    max_replicas = config.get("max_replicas", 0)
    if min_replicas is None:
        min_replicas = config.get("min_replicas", 0)
    if not rules.is_autoscaled(min_replicas, max_replicas):
        return None
    return rules.replica_floor(min_replicas, max_replicas)


def model_status(name: str) -> ModelStatus | None:
    """One model's status, or None when no config, load info or replica row names it."""
    status = model_statuses([name])[0]
    return status if status.configured or status.load_info or status.replicas or status.revision else None
