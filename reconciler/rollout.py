"""Rolling replacement, pure: per model, which one step of the rollout this pass takes.

A model *rolls out* when some of its replicas were loaded from a revision whose template (load
recipe + node selector, ``registry.managers.revisions``) is not the current revision's
(``Snapshot.is_outdated``). Like a Kubernetes Deployment with ``maxSurge = 1`` and
``maxUnavailable = 0``, one replica is replaced at a time and the ready count never drops
below ``keep = max(floor, 1)``:

1. a replica already draining is waited for: it is stopped once nothing is in flight on it,
   or once it has drained for ``rollout_drain_timeout``; nothing else happens meanwhile;
2. nothing happens while the model's scaling plan acts this pass (a scale-up, a scale-down,
   a cooldown) or one of its replicas is loading (the surge in progress);
3. with at least one ready replica at the current template and more than ``keep`` ready, the
   outdated replica with the least in flight starts draining (``S - 1 >= keep``);
4. otherwise one replica of the current revision is surged (loaded on top, as a scale-up
   with reason ``rollout``); with no free slot for it, an outdated replica is drained instead
   if the floor allows (``S - 1 >= keep``), else the rollout waits (``no_capacity``).

The scale-down meanwhile only removes outdated replicas (``Snapshot.rollout_protected``), so
the idle scale-down cannot undo a surge. Only models the reconciler manages (a scaling plan)
roll out; the replicas of unmanaged models are left to on-demand loads. See
``docs/revisions.md`` for a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .conf import ReconcileConfig
from .planning import ScalePlan, _capacity
from .snapshot import ConditionValue, ReplicaView, Snapshot


@dataclass(frozen=True)
class RolloutPlan:
    model_name: str
    revision: int | None  # the model's current revision
    ready: int = 0  # ready replicas (draining ones excluded)
    updated: int = 0  # ready replicas at the current template
    outdated: int = 0  # replica rows of an older template, in any state, draining included
    surge: bool = False  # load one replica of the current revision (merged into the ScalePlan)
    drain: ReplicaView | None = None  # starts draining this pass
    stop: tuple[ReplicaView, ...] = ()  # drained (or timed out): stopped this pass
    draining: tuple[ReplicaView, ...] = ()  # draining, before this pass's stops
    waiting: str = ""  # why no step was taken: draining, scaling, replicas_loading, no_capacity, ...

    @property
    def complete(self) -> bool:
        return self.outdated == 0

    def progressing(self) -> ConditionValue:
        """The model's Progressing condition while (or once) it rolls out."""
        if self.complete:
            return ConditionValue(False, "rollout_complete", f"every replica at revision {self.revision}")
        head = f"{self.updated} of {self.ready} ready replica(s) at revision {self.revision}, {self.outdated} outdated"
        if self.stop:
            step = ", ".join(f"replica {r.replica_index} stopped" for r in self.stop)
        elif self.drain is not None:
            step = f"draining replica {self.drain.replica_index} (revision {self.drain.revision})"
        elif self.surge:
            step = "surging one replica of the current revision"
        else:
            step = {
                "draining": "waiting for a draining replica's requests to finish",
                "scaling": "waiting for this pass's scaling",
                "cooldown": "waiting for the unsatisfiable cooldown",
                "replicas_loading": "waiting for the surge replica to load",
                "no_capacity": "no free slot for a new replica and the floor forbids draining first",
                "no_load_info": "no load info to load the current revision from",
                "not_ready": "waiting for outdated replicas to become ready or be reaped",
            }.get(self.waiting, self.waiting)
        if self.waiting == "no_capacity":
            return ConditionValue(False, "rollout_stalled", f"{head}; {step}")
        return ConditionValue(True, "rolling_out", f"{head}; {step}")


def _drain_order(replica: ReplicaView):
    """Least in flight first (it drains soonest), then the oldest revision, then the highest
    index (as the scale-down)."""
    return (replica.in_flight, replica.revision or 0, -replica.replica_index, str(replica.node_id))


def plan_rollout(snapshot: Snapshot, plan: ScalePlan, cfg: ReconcileConfig, *, now: datetime) -> RolloutPlan | None:
    """The rollout step of one managed model this pass; None when it has nothing outdated
    and nothing draining (the common case, decided with two lookups)."""
    name = plan.model_name
    rows = snapshot.replicas_by_model.get(name, ())
    rolling = snapshot.rolling_out(name)
    draining = tuple(r for r in rows if r.draining_since is not None) if rows else ()
    if not rolling and not draining:
        return None
    ready, loading = snapshot.routable(name)
    stale = [r for r in ready if snapshot.is_outdated(r)]
    facts = {
        "model_name": name,
        "revision": snapshot.current_revision(name),
        "ready": len(ready),
        "updated": len(ready) - len(stale),
        "outdated": sum(1 for r in rows if snapshot.is_outdated(r)),
        "draining": draining,
    }
    # 1. One at a time: a draining replica is finished before anything else.
    if draining:
        stop = tuple(r for r in draining if r.in_flight <= 0 or now - r.draining_since >= cfg.rollout_drain_timeout)
        return RolloutPlan(**facts, stop=stop, waiting="" if len(stop) == len(draining) else "draining")
    # 2. The scaling plan acts, or a replica is loading: wait.
    if plan.in_cooldown:
        return RolloutPlan(**facts, waiting="cooldown")
    if plan.scale_up or plan.remove:
        return RolloutPlan(**facts, waiting="scaling")
    if loading:
        return RolloutPlan(**facts, waiting="replicas_loading")
    if not stale:  # outdated rows exist but none is ready (e.g. on a node going offline)
        return RolloutPlan(**facts, waiting="not_ready")
    keep = max(plan.config.floor, 1)
    drain = min(stale, key=_drain_order)
    # 3. A replica of the current template serves and the floor allows one fewer: drain.
    if facts["updated"] >= 1 and len(ready) > keep:
        return RolloutPlan(**facts, drain=drain)
    # 4. Surge one replica of the current revision; without a slot for it, drain first if the
    #    floor allows, else wait.
    capacity = plan.capacity
    if capacity is None:
        capacity = _capacity(snapshot, plan.config, snapshot.candidates(plan.config.node_selector))
    if capacity > 0 and plan.has_load_info:
        return RolloutPlan(**facts, surge=True)
    if len(ready) > keep:
        return RolloutPlan(**facts, drain=drain)
    return RolloutPlan(**facts, waiting="no_capacity" if capacity <= 0 else "no_load_info")


def plan_rollouts(
    snapshot: Snapshot, plans: list[ScalePlan], cfg: ReconcileConfig, *, now: datetime
) -> tuple[list[ScalePlan], dict[str, RolloutPlan]]:
    """The rollout step of every managed model, and the scaling plans with each surge merged
    in (one more replica, reason ``rollout``) so the pass's scale-up phase loads it."""
    active = snapshot.rollout_models
    if not active:  # the steady case: no model rolls out, the plans are returned as they are
        return plans, {}
    rollouts = {}
    merged = []
    for plan in plans:
        if plan.model_name not in active:
            merged.append(plan)
            continue
        rollout = plan_rollout(snapshot, plan, cfg, now=now)
        if rollout is not None:
            rollouts[plan.model_name] = rollout
            if rollout.surge:
                plan = plan._replace(scale_up=1, scale_up_reason="rollout")
        merged.append(plan)
    return merged, rollouts
