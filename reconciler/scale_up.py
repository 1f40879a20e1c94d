"""The scale-up phase of a pass: every replica the scaling plans want, claimed in the pass and
loaded after it.

With the default scheduler (``RouterScheduler``) the phase reads the placement state once
(``registry.bulk_loading.Batch``), claims each replica slot in the database (its ``loading``
row and VRAM reservation: what guarantees one loader per slot) under the pass's reconcile lock,
at most as many as the pass's load pool takes (``load_pool.LoadPool.free``; the rest is skipped
as ``load_concurrency`` and claimed by a later pass), hands the loads to the pool and returns:
the pass, and its lock, do not wait for them. The loads are recorded as they finish, those
that finished together at once (``record_loads``, the pool's ``together``: one
``mark_loaded_many`` and one event INSERT for the batch; each plan's ``Completion`` gives its
loads' ``replica_added`` or ``scale_up_failed`` events); the next
pass's conditions catch up (``loading`` rows count as replicas, so nothing is placed twice; a
failure the pool saw is reported by the next pass's Progressing condition).
A scheduler with only ``schedule_and_load`` (tests, benchmarks) is called once per replica, in
order, inside the pass. Either way one ``replica_added`` event is recorded per replica, one
``scale_up_failed`` per failure state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from functools import partial
from uuid import UUID

from registry.models import ModelLoadInfo

from .load_pool import Task
from .models import Event, ModelCondition
from .planning import ScaleOutcome, ScalePlan
from .snapshot import NodeView, Snapshot

logger = logging.getLogger(__name__)


class SchedulerUnavailable(Exception):
    """No scheduler to call (``registry.router`` is not installed yet)."""


class ScaleUp:
    """The scale-up half of ``apply.Pass`` (it provides ``scheduler``, ``cfg``, ``summary``,
    ``started`` and ``event``; ``reconcile.run_pass`` sets ``loads``)."""

    #: The ``load_pool.LoadPool`` the claimed loads are handed to.
    loads = None

    def scale_up(self, snapshot: Snapshot, plans: list[ScalePlan], outcomes: dict[str, ScaleOutcome]) -> None:
        if not plans:
            return
        if hasattr(self.scheduler, "batch"):
            self.scale_up_together(snapshot, plans, outcomes)
            return
        for plan in plans:
            self.scale_up_one_by_one(snapshot, plan, outcomes[plan.model_name])

    def scale_up_together(self, snapshot: Snapshot, plans: list[ScalePlan], outcomes: dict) -> None:
        """Claim the slots (``Batch.claim``, at most the pool's free threads) and hand their
        loads to the pool (``self.loads``); their outcomes are recorded when they finish."""
        from registry.bulk_loading import Want

        pool = self.loads
        for name, failure in list(pool.failures.items()):
            if name in outcomes:  # a load of an earlier pass failed: the conditions say so now
                outcomes[name].failed = outcomes[name].failed or failure
            pool.failures.pop(name, None)
        waiting = pool.models_in_slow_path()  # no ``loading`` row yet for what they will place
        for plan in [plan for plan in plans if plan.model_name in waiting]:
            outcomes[plan.model_name].skipped = "load_concurrency"
            self.summary.skip("load_concurrency")
        plans = [plan for plan in plans if plan.model_name not in waiting]
        wants = [Want(plan.model_name, plan.scale_up, tuple(plan.candidate_ids)) for plan in plans]
        try:
            batch = self.scheduler.batch(wants)
        except SchedulerUnavailable as exc:
            logger.warning("cannot scale up: %s", exc)
            for plan in plans:
                outcomes[plan.model_name].skipped = "scheduler_unavailable"
                self.summary.skip("scheduler_unavailable")
            return
        deadline = self.started + self.cfg.scale_up_budget
        by_name = {plan.model_name: Completion(self, snapshot, plan, pool) for plan in plans}
        recorder = partial(record_loads, batch)
        for load in batch.claim(pool.free(), deadline=deadline):
            self.summary.count("loads_started")
            outcomes[load.row.model_name].claimed += 1
            pool.submit(
                Task(
                    load.row.model_name,
                    network=partial(load.network, deadline),
                    row_id=load.row.pk,
                    together=recorder,
                    item=(by_name[load.row.model_name], load),
                )
            )
        for name, count in batch.slow.items():
            if count and not batch.results[name].done and pool.free() > 0:
                self.summary.count("loads_started")
                model = batch.models[name]
                pool.submit(Task(name, record=partial(by_name[name].record_slow, model, count, deadline)))
                outcomes[name].claimed += count
                batch.slow[name] = 0
        for plan in plans:
            result, outcome = batch.results[plan.model_name], outcomes[plan.model_name]
            left = plan.model_name in batch.queue or batch.slow.get(plan.model_name)
            if left and not result.done:
                outcome.skipped = "load_concurrency"  # the next pass places the rest
                self.summary.skip("load_concurrency")
            elif result.error is not None:
                if getattr(result.error, "code", "") == "no_load_info":
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


class Completion:
    """Accounts for one plan's loads when they are recorded (``record_loads``, on the pool's
    recorder or the caller draining a one-shot pool; ``record_slow`` for the re-reading path,
    on a pool thread), with their events: ``replica_added``, and ``scale_up_failed`` once per
    failure state. The failure is also left in ``pool.failures`` for the next pass's
    conditions. Returns the action counts."""

    def __init__(self, run, snapshot: Snapshot, plan: ScalePlan, pool):
        self.snapshot, self.plan, self.pool = snapshot, plan, pool
        self.lock = threading.Lock()
        self.added = 0
        self.failed = False

    def record_slow(self, model, count: int, deadline: float, outcome: tuple) -> Counter:
        from registry.bulk_loading import load_one_by_one

        return self.report(load_one_by_one(model, count, deadline=deadline))

    def report(self, result) -> Counter:
        counts, events = self.account(result)
        if events:
            Event.objects.record_many(events)
            counts["events_recorded"] += len(events)
        return counts

    def account(self, result) -> tuple[Counter, list]:
        """The counts and the events (not yet written) of one result."""
        plan, counts, events = self.plan, Counter(), []
        for row in result.loaded:
            with self.lock:
                self.added += 1
                added = self.added
            counts["replicas_added"] += 1
            node = _node_of(self.snapshot, row)
            events.append(
                _event(
                    Event.Kind.REPLICA_ADDED,
                    plan.model_name,
                    node,
                    f"replica added ({plan.scale_up_reason}); {plan.current + added} replica(s), "
                    f"min {plan.config.min_replicas}",
                    reason=plan.scale_up_reason,
                    replica_index=row.replica_index,
                )
            )
        if result.error is not None and getattr(result.error, "code", "") != "no_load_info":
            failure = f"{type(result.error).__name__}: {result.error}"[:1000]
            counts["scale_up_failed"] += 1
            logger.warning("scale-up of %s failed: %s", plan.model_name, failure)
            self.pool.failures[plan.model_name] = failure
            with self.lock:
                first, self.failed = not self.failed, True
            if first and not _same_failure_as_last_pass(self.snapshot, plan.model_name, failure):
                events.append(
                    _event(
                        Event.Kind.SCALE_UP_FAILED,
                        plan.model_name,
                        None,
                        failure,
                        reason=plan.scale_up_reason,
                        error_code=str(getattr(result.error, "code", "") or ""),
                        added_before_failure=self.added,
                    )
                )
        return counts, events


def record_loads(batch, finished: list) -> Counter:
    """The pool's ``together`` for the loads of one pass (``Task.item``: their plan's
    ``Completion`` and the ``Load``): the loads that finished together recorded at once
    (``batch.record_loads``: one ``mark_loaded_many``), their events in one INSERT."""
    results = batch.record_loads([(task.item[1], outcome) for task, outcome in finished])
    counts, events = Counter(), []
    for (task, _), result in zip(finished, results, strict=True):
        more, their_events = task.item[0].account(result)
        counts.update(more)
        events.extend(their_events)
    if events:
        Event.objects.record_many(events)
        counts["events_recorded"] += len(events)
    return counts


def _event(kind: str, model_name: str, node: NodeView | None, message: str, **details) -> Event:
    """An event stamped now (a load's completion, not the pass's clock), like ``Pass.event``."""
    return Event.objects.build(
        kind,
        model_name=model_name,
        node_id=node.id if node else None,
        node_name=node.name if node else "",
        message=message,
        details={k: v for k, v in details.items() if v not in (None, "")},
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
