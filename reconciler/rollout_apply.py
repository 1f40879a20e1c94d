"""Applying the rollout plans (``rollout.py``): stop drained replicas, start draining one, and
report Progressing; the surge itself is a scale-up merged into the model's scaling plan."""

from __future__ import annotations

from registry import operations
from registry.models import NodeModel

from .models import Event, ModelCondition
from .rollout import RolloutPlan, plan_rollouts
from .snapshot import ConditionValue, Snapshot

Type = ModelCondition.Type

# Progressing reasons the rollout writes: a model whose condition says one of these and that
# has no rollout plan any more has just completed its rollout. ``ROLLOUT_CONDITIONS`` adds the
# completed state: the stored Progressing values ``update_conditions`` hands to
# ``progressing_of``.
ROLLOUT_REASONS = frozenset(("rolling_out", "rollout_stalled"))
ROLLOUT_CONDITIONS = ROLLOUT_REASONS | {"rollout_complete"}


def unload(prober, node, replica, *, timeout: float):
    """Remove a replica's row, then ask its worker to stop the backend, best effort
    (``operations.unload_replica``), as the scale-down and the rollout do; the result says
    whether the row went."""
    return operations.unload_replica(
        prober,
        node_id=replica.node_id,
        address=node.address if node is not None else "",
        model_name=replica.model_name,
        replica_index=replica.replica_index,
        timeout=timeout,
    )


class Rollout:
    """The rollout half of ``apply.Pass`` (it provides ``now``, ``cfg``, ``prober``, ``summary``
    and ``event``)."""

    #: ``{model: ConditionValue}``: Progressing as the rollout reports it this pass (set by
    #: ``plan_rollouts``; empty when no model rolls out, the common case).
    rollout_progress: dict = {}  # noqa: RUF012 - replaced, never mutated, per pass
    current_revisions: dict = {}  # noqa: RUF012 - the snapshot's, per pass

    def plan_rollouts(self, snapshot: Snapshot, plans: list) -> tuple[list, dict[str, RolloutPlan]]:
        plans, rollouts = plan_rollouts(snapshot, plans, self.cfg, now=self.now)
        self.current_revisions = snapshot.current_revisions
        self.rollout_progress = {}
        for name, rollout in rollouts.items():
            self.rollout_progress[name] = rollout.progressing()
        for name, rollout in rollouts.items():
            previous = snapshot.conditions.get((name, Type.PROGRESSING))
            if not rollout.complete and (previous is None or previous.reason not in ROLLOUT_REASONS):
                self.event(
                    Event.Kind.ROLLOUT_STARTED,
                    model_name=name,
                    message=f"{rollout.outdated} replica(s) to replace with revision {rollout.revision}",
                    revision=rollout.revision,
                )
        return plans, rollouts

    def progressing_of(self, name: str, value: ConditionValue, known: ConditionValue | None) -> ConditionValue:
        """Progressing for ``name`` (called by ``update_conditions`` for models with a rollout
        plan, or whose stored Progressing is a rollout's): the rollout's value while it rolls
        out (unless a load failed); ``rollout_complete`` (and its event) the first pass after it ended, then kept while
        nothing else would be reported (``stable``)."""
        rollout = self.rollout_progress.get(name)
        if rollout is not None:
            return value if value.reason == "scale_up_failed" else rollout  # a failed surge says why
        if known is not None and known.reason in ROLLOUT_REASONS:
            revision = self.current_revisions.get(name)
            self.event(
                Event.Kind.ROLLOUT_COMPLETE,
                model_name=name,
                message=f"every replica at revision {revision}",
                revision=revision,
            )
            if value.reason == "stable":
                return ConditionValue(False, "rollout_complete", f"every replica at revision {revision}")
            return value
        if known is not None and known.reason == "rollout_complete" and value.reason == "stable":
            return known
        return value

    def apply_rollouts(self, snapshot: Snapshot, rollouts: dict[str, RolloutPlan]) -> None:
        for rollout in rollouts.values():
            for replica in rollout.stop:
                self.stop_drained(snapshot, replica)
            if rollout.drain is not None:
                self.start_draining(snapshot, rollout)
            if rollout.surge:
                self.summary.count("rollout_surges")

    def start_draining(self, snapshot: Snapshot, rollout: RolloutPlan) -> None:
        replica = rollout.drain
        if not NodeModel.objects.start_draining(replica.id, now=self.now):
            return  # gone, or no longer loaded: the next pass re-plans
        self.summary.count("replicas_draining")
        self.event(
            Event.Kind.REPLICA_DRAINING,
            model_name=replica.model_name,
            node=snapshot.nodes.get(replica.node_id),
            message=f"replica {replica.replica_index} (revision {replica.revision}) draining for revision "
            f"{rollout.revision}; {replica.in_flight} request(s) in flight",
            replica_index=replica.replica_index,
            revision=replica.revision,
            to_revision=rollout.revision,
        )

    def stop_drained(self, snapshot: Snapshot, replica) -> None:
        """Row first (its leases end with it), then the backend, best effort (as the
        scale-down)."""
        node = snapshot.nodes.get(replica.node_id)
        unloaded = unload(self.prober, node, replica, timeout=self.cfg.worker_timeout)
        if not unloaded.removed:
            return
        self.summary.count("replicas_rolled")
        timed_out = replica.in_flight > 0
        self.event(
            Event.Kind.REPLICA_REMOVED,
            model_name=replica.model_name,
            node=node,
            message=f"replica {replica.replica_index} (revision {replica.revision}) drained"
            + (f"; drain timeout passed with {replica.in_flight} request(s) in flight" if timed_out else "")
            + "; stopped",
            reason="rollout",
            replica_index=replica.replica_index,
            revision=replica.revision,
            stop_error=unloaded.stop_error,
        )
