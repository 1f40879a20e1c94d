"""What the operator sees per model once a pass's plan has been applied: the Available,
Progressing, Unsatisfiable and NoLoadInfo conditions (``model_conditions``), and which of their
transitions are worth an event (``transition_event_kind``). Pure, like ``planning.py``, which
re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from registry import rules

from .managers import ConditionState
from .models import ModelCondition
from .snapshot import ConditionValue, ConfigView, Snapshot

if TYPE_CHECKING:
    from .planning import ScalePlan

Type = ModelCondition.Type


@dataclass
class ScaleOutcome:
    """What applying a ``ScalePlan`` actually did (filled by the apply step)."""

    added: int = 0
    removed: int = 0
    failed: str = ""  # error text of the scale-up call that failed
    tripped: bool = False  # this pass started a cooldown
    cooldown_until: datetime | None = None
    cooldown_cleared: bool = False
    no_load_info: bool = False  # ``for_model`` said so at apply time
    skipped: str = ""  # e.g. scheduler_unavailable, scale_up_budget
    # Loads claimed this pass and handed to the load pool (``scale_up``): recorded when they
    # finish, after the pass; the re-reading path counts the replicas it was asked for.
    claimed: int = 0


def model_conditions(
    snapshot: Snapshot, model_name: str, plan: ScalePlan | None, outcome: ScaleOutcome | None, *, now: datetime
) -> list[ConditionState]:
    """Available, Progressing, Unsatisfiable and NoLoadInfo for one model after this pass.

    ``plan``/``outcome`` are None for models the reconciler does not scale (no config, or
    min = max = 0): their conditions only report what is there.
    """
    return [
        ConditionState(model_name, type_, *value)
        for type_, value in model_condition_values(snapshot, model_name, plan, outcome)
    ]


ConditionValues = tuple[tuple[str, ConditionValue], ...]


def model_condition_values(
    snapshot: Snapshot,
    model_name: str,
    plan: ScalePlan | None,
    outcome: ScaleOutcome | None,
    *,
    memo: dict | None = None,
) -> ConditionValues:
    """``model_conditions`` as ``(type, ConditionValue)`` pairs, compared with the snapshot's
    ``conditions`` as plain tuples.

    The values depend on a handful of counts and flags, not on the model's name: with a
    ``memo`` (one dict per pass), models that did nothing this pass (no ``outcome``) and share
    those facts share one computed tuple, so a steady pass builds no condition per model.
    """
    config, ready, loading, has_load_info = _facts(snapshot, model_name, plan)
    if outcome is not None or memo is None or (plan is not None and plan.load is not None):
        # (A load-aware model's Progressing names its own desire and its start: not shared.)
        return _condition_values(config, ready, loading, has_load_info, plan, outcome or ScaleOutcome())
    key = (
        config.min_replicas,
        config.unsatisfiable_until,
        ready,
        loading,
        has_load_info,
        plan is None,
        plan.skipped if plan is not None else "",
        plan.in_cooldown if plan is not None else False,
        len(plan.candidate_ids) if plan is not None else 0,
    )
    found = memo.get(key)
    if found is None:
        found = memo[key] = _condition_values(config, ready, loading, has_load_info, plan, ScaleOutcome())
    return found


def _facts(snapshot: Snapshot, model_name: str, plan: ScalePlan | None) -> tuple[ConfigView, int, int, bool]:
    """(config, ready, loading, has load info) of a model before this pass acted."""
    if plan is not None:
        return plan.config, plan.ready, plan.loading, plan.has_load_info
    ready_rows, loading_rows = snapshot.routable(model_name)
    return snapshot.config_for(model_name), len(ready_rows), len(loading_rows), snapshot.has_load_info(model_name)


def available_counts(
    snapshot: Snapshot, model_name: str, plan: ScalePlan | None, outcome: ScaleOutcome | None
) -> tuple[int, int]:
    """(ready, floor) after this pass, as the Available condition counts them."""
    config, ready, _, _ = _facts(snapshot, model_name, plan)
    return _ready_and_floor(config, ready, outcome or ScaleOutcome())


def _ready_and_floor(config: ConfigView, ready: int, outcome: ScaleOutcome) -> tuple[int, int]:
    # schedule_and_load returns once the replica is loaded, so added replicas count as ready.
    return ready - outcome.removed + outcome.added, rules.ready_for_available(config.min_replicas)


_PENDING = {"up_pending": "scale_up_pending", "down_pending": "scale_down_pending"}


def _condition_values(
    config: ConfigView, ready: int, loading: int, has_load_info: bool, plan: ScalePlan | None, outcome: ScaleOutcome
) -> ConditionValues:
    ready, floor = _ready_and_floor(config, ready, outcome)
    has_load_info = has_load_info and not outcome.no_load_info

    available = ConditionValue(
        ready >= floor,
        "minimum_replicas_ready" if ready >= floor else "below_minimum",
        f"{ready} of {floor} replica(s) ready",
    )

    skipped = outcome.skipped or ("no_load_info" if outcome.no_load_info else (plan.skipped if plan else ""))
    if outcome.failed:
        added = f"{outcome.added} replica(s) added, then " if outcome.added else ""
        progressing = ConditionValue(False, "scale_up_failed", f"{added}{outcome.failed}")
    elif outcome.added or outcome.claimed:
        why = f"{plan.scale_up_reason}: {plan.load.message}" if plan.load is not None else plan.scale_up_reason
        what = [f"{outcome.added} replica(s) added"] if outcome.added else []
        what += [f"{outcome.claimed} replica(s) loading"] if outcome.claimed else []
        progressing = ConditionValue(True, "scaling_up", f"{', '.join(what)} ({why})")
    elif loading:
        progressing = ConditionValue(True, "replicas_loading", f"{loading} replica(s) loading")
    elif skipped:
        progressing = ConditionValue(False, skipped, _skip_message(skipped, plan))
    elif plan is not None and plan.load is not None and plan.load.reason in _PENDING:
        load = plan.load
        progressing = ConditionValue(
            False,
            _PENDING[load.reason],
            f"the load asks for {load.desired} replica(s) since {load.since.isoformat()}; waiting for the "
            f"{'upscale' if load.reason == 'up_pending' else 'downscale'} delay",
        )
    else:
        progressing = ConditionValue(False, "stable", "")

    until = outcome.cooldown_until or config.unsatisfiable_until
    if (plan is not None and plan.in_cooldown) or outcome.tripped:
        unsatisfiable = ConditionValue(
            True,
            "no_capacity",
            f"no free replica slot on the {len(plan.candidate_ids)} candidate node(s); "
            f"scale-up paused until {until.isoformat() if until else 'the cooldown ends'}",
        )
    else:
        unsatisfiable = ConditionValue(False, "satisfiable", "")

    if has_load_info:
        no_load_info = ConditionValue(False, "load_info_present", "")
    else:
        no_load_info = ConditionValue(
            True,
            "no_load_info",
            "no load recipe for this model (PUT /api/v1/models/{model}/load-info, or load it once "
            "through a frontend); it cannot be scheduled",
        )
    return (
        (Type.AVAILABLE, available),
        (Type.PROGRESSING, progressing),
        (Type.UNSATISFIABLE, unsatisfiable),
        (Type.NO_LOAD_INFO, no_load_info),
    )


def _skip_message(reason: str, plan: ScalePlan | None) -> str:
    if plan is None:
        return ""
    return {
        "cooldown": "unsatisfiable cooldown in progress",
        "no_capacity": f"no free replica slot on the {len(plan.candidate_ids)} candidate node(s)",
        "no_load_info": "no load info: the scheduler was not called",
        "scheduler_unavailable": "no scheduler available (registry.router missing)",
        "scale_up_budget": "pass budget spent; retrying next pass",
    }.get(reason, reason)


# Condition transitions that are worth an event, by (type, new status); others (Progressing,
# Unsatisfiable) are covered by the replica and cooldown events already.
TRANSITION_EVENTS = {
    (Type.NO_LOAD_INFO, True): "no_load_info",
    (Type.NO_LOAD_INFO, False): "load_info_found",
    (Type.REAPING_PAUSED, True): "mass_staleness_guard",
    (Type.REAPING_PAUSED, False): "mass_staleness_cleared",
    (Type.AVAILABLE, True): "model_available",
    (Type.AVAILABLE, False): "model_unavailable",
}
# A condition first created in its normal state is not news.
NORMAL_STATUS = {
    Type.AVAILABLE: True,
    Type.NO_LOAD_INFO: False,
    Type.REAPING_PAUSED: False,
    Type.UNSATISFIABLE: False,
}


def transition_event_kind(type_: str, status: bool, *, is_new: bool) -> str | None:
    """The event kind to record for a condition transition, or None when it is not news."""
    if is_new and NORMAL_STATUS.get(type_) == status:
        return None
    return TRANSITION_EVENTS.get((type_, status))
