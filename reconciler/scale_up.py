"""The scale-up phase of a pass: every replica the scaling plans want, placed and loaded.

With the default scheduler (``RouterScheduler``) the whole phase is one call of
``registry.bulk_loading.load_many``: placement state read once, each replica slot claimed in
the database (its ``loading`` row and VRAM reservation) before any network call, then at most
``CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY`` loads (StartBackend + LoadModel) at once on a pool
of threads that hold no transaction and no row lock, their outcomes recorded through the
verbs as they come in. A pass so takes about the longest load, not the sum of its loads. The
pass holds its reconcile lock (a session advisory lock, not a transaction) until the pool has
drained: passes stay one at a time, and the scale-up budget bounds when the last load starts.
A scheduler with only ``schedule_and_load`` (tests, benchmarks) is called once per replica, in
order. Either way the pass records one ``replica_added`` event per replica, one
``scale_up_failed`` per failure state, and the outcome per model that conditions report.
"""

from __future__ import annotations

import logging
import time
from uuid import UUID

from registry.models import ModelLoadInfo

from .models import Event, ModelCondition
from .planning import ScaleOutcome, ScalePlan
from .snapshot import NodeView, Snapshot

logger = logging.getLogger(__name__)


class SchedulerUnavailable(Exception):
    """No scheduler to call (``registry.router`` is not installed yet)."""


class ScaleUp:
    """The scale-up half of ``apply.Pass`` (it provides ``scheduler``, ``cfg``, ``summary``,
    ``started`` and ``event``)."""

    def scale_up(self, snapshot: Snapshot, plans: list[ScalePlan], outcomes: dict[str, ScaleOutcome]) -> None:
        if not plans:
            return
        if hasattr(self.scheduler, "load_many"):
            self.scale_up_together(snapshot, plans, outcomes)
            return
        for plan in plans:
            self.scale_up_one_by_one(snapshot, plan, outcomes[plan.model_name])

    def scale_up_together(self, snapshot: Snapshot, plans: list[ScalePlan], outcomes: dict) -> None:
        """One ``load_many`` call for every plan (the default scheduler)."""
        from registry.bulk_loading import Want

        wants = [Want(plan.model_name, plan.scale_up, tuple(plan.candidate_ids)) for plan in plans]
        try:
            results = self.scheduler.load_many(
                wants, concurrency=self.cfg.load_concurrency, deadline=self.started + self.cfg.scale_up_budget
            )
        except SchedulerUnavailable as exc:
            logger.warning("cannot scale up: %s", exc)
            for plan in plans:
                outcomes[plan.model_name].skipped = "scheduler_unavailable"
                self.summary.skip("scheduler_unavailable")
            return
        for plan in plans:
            result, outcome = results[plan.model_name], outcomes[plan.model_name]
            for row in result.loaded:
                self.replica_added(snapshot, plan, outcome, row)
            if result.error is not None:
                if getattr(result.error, "code", "") == "no_load_info" and not result.loaded:
                    outcome.no_load_info = True
                    self.summary.skip("no_load_info")
                else:
                    self.scale_up_failed(snapshot, plan, outcome, result.error)
            elif result.skipped:
                outcome.skipped = result.skipped
                self.summary.skip(result.skipped)

    def scale_up_one_by_one(self, snapshot: Snapshot, plan: ScalePlan, outcome: ScaleOutcome) -> None:
        """``schedule_and_load`` per replica, stopping at the first failure or the budget."""
        try:
            ModelLoadInfo.objects.for_model(plan.model_name)
        except ModelLoadInfo.DoesNotExist:
            outcome.no_load_info = True
            self.summary.skip("no_load_info")
            return
        for _ in range(plan.scale_up):
            if time.monotonic() - self.started > self.cfg.scale_up_budget:
                outcome.skipped = "scale_up_budget"
                self.summary.skip("scale_up_budget")
                return
            try:
                result = self.scheduler.schedule_and_load(plan.model_name, list(plan.candidate_ids))
            except SchedulerUnavailable as exc:
                logger.warning("cannot scale %s up: %s", plan.model_name, exc)
                outcome.skipped = "scheduler_unavailable"
                self.summary.skip("scheduler_unavailable")
                return
            except Exception as exc:
                self.scale_up_failed(snapshot, plan, outcome, exc)
                return
            self.replica_added(snapshot, plan, outcome, result)

    def replica_added(self, snapshot: Snapshot, plan: ScalePlan, outcome: ScaleOutcome, result) -> None:
        outcome.added += 1
        self.summary.count("replicas_added")
        self.event(
            Event.Kind.REPLICA_ADDED,
            model_name=plan.model_name,
            node=_node_of(snapshot, result),
            message=f"replica added ({plan.scale_up_reason}); {plan.current + outcome.added} "
            f"replica(s), min {plan.config.min_replicas}",
            reason=plan.scale_up_reason,
            replica_index=getattr(result, "replica_index", None),
        )

    def scale_up_failed(self, snapshot: Snapshot, plan: ScalePlan, outcome: ScaleOutcome, exc: Exception) -> None:
        outcome.failed = f"{type(exc).__name__}: {exc}"[:1000]
        self.summary.count("scale_up_failed")
        logger.warning("scale-up of %s failed: %s", plan.model_name, outcome.failed)
        if _same_failure_as_last_pass(snapshot, plan.model_name, outcome.failed):
            return  # one event per failure state, not one per pass while it persists
        self.event(
            Event.Kind.SCALE_UP_FAILED,
            model_name=plan.model_name,
            message=outcome.failed,
            reason=plan.scale_up_reason,
            error_code=str(getattr(exc, "code", "") or ""),
            added_before_failure=outcome.added,
        )


def _same_failure_as_last_pass(snapshot: Snapshot, model_name: str, failure: str) -> bool:
    """True when the model's Progressing condition already reports this scale-up failure."""
    previous = snapshot.conditions.get((model_name, ModelCondition.Type.PROGRESSING))
    return bool(previous) and previous.reason == "scale_up_failed" and previous.message.endswith(failure)


def _node_of(snapshot: Snapshot, result) -> NodeView | None:
    """The node a scheduler result names (``result.node_id``), if the result says."""
    node_id = getattr(result, "node_id", None)
    if node_id is None:
        return None
    try:
        return snapshot.nodes.get(node_id if isinstance(node_id, UUID) else UUID(str(node_id)))
    except ValueError:
        return None
