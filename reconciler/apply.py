"""The apply half of a reconcile pass: each phase plans (``planning.py``, pure) from the
snapshot, then writes what the plan says through the manager verbs, in order:

- observation and node health: heartbeats observed, stale nodes offline, offline nodes back;
- checks: replica probes, worker listings (``probes.py``) and what they show: probe failures,
  rows whose backend is gone, orphan backends, nodes without the worker service, nodes whose
  worker stays silent (``unhealthy``) or answers again;
- housekeeping: stale ``loading`` rows, the router's leases and load jobs, old events;
- scaling per autoscaled model;
- conditions per model, with an event per change.

``reconcile.py`` drives it (the lock, the pass's clock, storing the summary).
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from datetime import datetime
from operator import itemgetter

from registry import operations
from registry.models import ModelSchedulingConfig, Node, NodeModel

from . import housekeeping
from .conf import ReconcileConfig
from .managers import ConditionState
from .models import Event, ModelCondition, ReconcilePass, ReplicaSample, UnansweredListing
from .planning import (
    WORKER_API_RECHECK_AFTER,
    NodeHealthPlan,
    ObservationPlan,
    ScaleOutcome,
    ScalePlan,
    WorkerHealthPlan,
    alive_keys,
    available_counts,
    model_condition_values,
    plan_checks,
    plan_node_health,
    plan_observation,
    plan_scaling,
    plan_worker_health,
    plan_worker_reconciliation,
    transition_event_kind,
)
from .probes import ALIVE, BUSY, UNREACHABLE, run_checks
from .rollout_apply import ROLLOUT_CONDITIONS as _ROLLING
from .rollout_apply import Rollout, unload
from .scale_up import ScaleUp
from .snapshot import NodeView, Snapshot, rows_now, take_snapshot
from .summary import PassSummary

logger = logging.getLogger(__name__)


@contextmanager
def cyclic_gc_paused():
    """Pause Python's cyclic garbage collector while a pass runs; it resumes (and catches up)
    when the pass ends.

    A pass over a large fleet allocates a few hundred thousand short-lived, acyclic objects
    (row tuples, views, plans, conditions) that reference counting frees; their allocation
    alone triggers hundreds of collections, the full ones walking every live object: about a
    third of a steady pass at 10,000 models. The pause is process-wide (another thread of the
    process allocates without cyclic collection meanwhile), for one pass's duration.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


class Pass(ScaleUp, Rollout):
    """One pass's phases (``run``), their events and their summary."""

    def __init__(self, *, now, cfg: ReconcileConfig, scheduler, prober, summary: PassSummary, started: float):
        self.now = now
        self.cfg = cfg
        self.scheduler = scheduler
        self.prober = prober
        self.summary = summary
        self.started = started
        self.events: list[Event] = []

    # -- helpers -------------------------------------------------------------------------------

    def event(self, kind: str, *, model_name: str = "", node: NodeView | None = None, message: str = "", **details):
        """Queue an event (written by ``flush_events`` after each phase); ``details`` with
        empty values are dropped."""
        self.events.append(
            Event.objects.build(
                kind,
                model_name=model_name,
                node_id=node.id if node else None,
                node_name=node.name if node else "",
                message=message,
                details={k: v for k, v in details.items() if v not in (None, "")},
                now=self.now,
            )
        )

    def flush_events(self) -> None:
        events, self.events = self.events, []
        if events:
            Event.objects.record_many(events)
            self.summary.count("events_recorded", len(events))

    # -- phases --------------------------------------------------------------------------------

    def run(self) -> None:
        with cyclic_gc_paused():
            self.run_phases()

    def run_phases(self) -> None:
        snapshot = take_snapshot(now=self.now)
        observation = plan_observation(
            snapshot, self.cfg, now=self.now, previous_pass_at=ReconcilePass.objects.last_ok_finished_at()
        )
        self.apply_observation(observation)
        health = plan_node_health(snapshot, self.cfg, now=self.now, observation=observation)
        if self.apply_node_health(snapshot, health):
            snapshot = take_snapshot(now=self.now)
        self.flush_events()

        if self.run_checks(snapshot, guard=health.reaping_paused):
            snapshot = take_snapshot(now=self.now)
        self.flush_events()

        self.housekeeping(snapshot)

        plans = plan_scaling(snapshot, self.cfg, now=self.now)
        plans, rollouts = self.plan_rollouts(snapshot, plans)  # a surge becomes a scale-up
        self.summary.nodes = len(snapshot.nodes)
        self.summary.models = len(plans)
        self.summary.known_models = len(snapshot.model_names)
        outcomes = {plan.model_name: self.apply_scaling(snapshot, plan) for plan in plans if plan.acts}
        self.apply_rollouts(snapshot, rollouts)
        self.scale_up(snapshot, [plan for plan in plans if plan.acts and plan.scale_up], outcomes)
        self.record_load(plans, outcomes)
        self.flush_events()

        self.update_conditions(snapshot, health, {plan.model_name: plan for plan in plans}, outcomes)
        self.flush_events()

    def apply_observation(self, plan: ObservationPlan) -> None:
        """Record this pass's view of the heartbeats (one UPDATE, whatever the fleet size)."""
        Node.objects.observe_heartbeats(now=self.now, restart=plan.restart)
        self.summary.count("heartbeats_observed", len(plan.changed))
        if plan.restart:
            self.summary.count("observation_restarted")
            logger.warning(
                "heartbeat observation resumed after a gap (last pass ended %s, last heartbeat change seen %s): "
                "every node's staleness is counted from now",
                _when(plan.previous_pass_at),
                _when(plan.quiet_since),
            )

    def apply_node_health(self, snapshot: Snapshot, plan: NodeHealthPlan) -> bool:
        """Returns True when a node changed status (its rows may be gone)."""
        changed = False
        for node in plan.mark_offline:
            # Only while its heartbeat is still the value observed: one that landed since wins.
            if Node.objects.mark_offline(node.id, expected_heartbeat=node.last_heartbeat, now=self.now):
                changed = True
                if node.unanswered_listings:
                    UnansweredListing.objects.clear(node.id)
                rows = len(snapshot.replicas_by_node.get(node.id, ()))
                self.summary.count("nodes_marked_offline")
                self.event(
                    Event.Kind.NODE_OFFLINE,
                    node=node,
                    message=f"no heartbeat since {_when(node.last_heartbeat)}; {rows} replica row(s) removed",
                    last_heartbeat=_when(node.last_heartbeat),
                    replica_rows=rows,
                )
        for node in plan.mark_healthy:
            if Node.objects.mark_healthy(node.id, now=self.now):
                changed = True
                self.node_back(node, f"{node.status} node heartbeating again (last {_when(node.last_heartbeat)})")
        if plan.silent:
            self.summary.skip("heartbeat_ingestion_silent", max(1, len(plan.stale)))
            logger.warning(
                "no heartbeat arrived from any of %d healthy nodes for longer than the observation gap; reaping none",
                plan.swept,
            )
        elif plan.guard:
            self.summary.skip("mass_staleness", len(plan.stale))
            logger.warning(
                "mass-staleness guard: %d of %d healthy nodes stale at once; reaping none (%s)",
                len(plan.stale),
                plan.swept,
                ", ".join(node.name for node in plan.stale),
            )
        return changed

    def node_back(self, node: NodeView, why: str) -> None:
        """After ``mark_healthy`` took ``node`` out of offline/unhealthy: a node an operator
        drained comes back ``draining`` (the drain is kept), which is no recovery: it gets a
        log line, not a ``node_recovered`` event."""
        if node.drained_by == Node.DrainedBy.OPERATOR:
            self.summary.count("nodes_back_draining")
            logger.info("node %s is back (%s) and stays drained by an operator", node.name, why)
            return
        self.summary.count("nodes_recovered")
        self.event(Event.Kind.NODE_RECOVERED, node=node, message=why, previous_status=node.status)

    def run_checks(self, snapshot: Snapshot, *, guard: bool) -> bool:
        """Probe and list (network), then apply. Returns True when a replica row was removed."""
        plan = plan_checks(snapshot, self.cfg, now=self.now)
        # The snapshot was read before any worker is asked: a row it held loaded, in the same
        # state change, was loaded before the listing (see plan_worker_reconciliation).
        loaded = NodeModel.State.LOADED
        loaded_before_listing = {row.id: row.state_changed_at for row in snapshot.replicas if row.state == loaded}
        results = run_checks(
            plan,
            self.prober,
            probe_timeout=self.cfg.probe_timeout,
            worker_timeout=self.cfg.worker_timeout,
            concurrency=self.cfg.probe_concurrency,
        )
        changed = False
        self.summary.count("replicas_probed", len(plan.probes))
        self.summary.skip("probe_error", len(results.probe_errors))
        for replica in plan.probes:
            outcome = results.probes.get(replica.id)
            if outcome in (ALIVE, BUSY):
                if NodeModel.objects.record_probe_ok(replica.id, now=self.now):
                    self.summary.count("probes_ok")
            elif outcome == UNREACHABLE:
                failures = NodeModel.objects.record_probe_unreachable(replica.id)
                self.summary.count("probes_unreachable")
                if failures is None or failures < self.cfg.probe_failures_before_removal:
                    continue
                if guard:
                    self.summary.skip("mass_staleness")
                    continue
                if NodeModel.objects.remove_replica(replica.node_id, replica.model_name, replica.replica_index):
                    changed = True
                    self.summary.count("replicas_removed_unreachable")
                    self.event(
                        Event.Kind.REPLICA_REMOVED,
                        model_name=replica.model_name,
                        node=snapshot.nodes.get(replica.node_id),
                        message=f"replica {replica.replica_index} unreachable at {replica.address} "
                        f"for {failures} consecutive probes",
                        reason="probe_unreachable",
                        replica_index=replica.replica_index,
                        address=replica.address,
                    )

        self.summary.count("workers_listed", len(results.listings))
        self.summary.skip("list_failed", len(results.listing_errors))
        self.record_worker_api(plan, results)
        changed |= self.apply_worker_health(
            snapshot,
            plan_worker_health(
                plan.listings,
                answered=results.listings,
                failed=results.unanswered,
                mass_silence_fraction=self.cfg.mass_stale_fraction,
            ),
            results,
        )
        if results.listings:
            # Re-read after the listings: a row must be judged by what existed once the worker
            # answered, never by the older snapshot (a loader may have written it meanwhile).
            # The rows the snapshot holds loaded whose backend the worker does not report alive
            # may be removed, so they are re-read in full (their state may have changed).
            maybe_removed = set()
            alive_by_node = {node_id: alive_keys(backends) for node_id, backends in results.listings.items()}
            for node_id, alive in alive_by_node.items():
                maybe_removed.update(
                    row.id
                    for row in snapshot.replicas_by_node.get(node_id, ())
                    if row.state == loaded and (row.model_name, row.replica_index) not in alive
                )
            rows_by_node = rows_now(snapshot, list(results.listings), refresh=maybe_removed)
            for node_id, backends in results.listings.items():
                plan_ = plan_worker_reconciliation(
                    rows_by_node.get(node_id, ()),
                    backends,
                    loaded_before_listing=loaded_before_listing,
                    alive=alive_by_node[node_id],
                )
                if plan_.remove or plan_.stop:
                    node = snapshot.nodes[node_id]
                    changed |= self.remove_gone_backends(node, plan_.remove, backends, guard=guard)
                    self.stop_orphans(node, plan_.stop)
        return changed

    def record_worker_api(self, plan, results) -> None:
        """Whether each listed node answers the worker gRPC service: only those that do are
        placed on (a LocalAI worker never is, so it is never sent a StartBackend that can only
        fail). A failure that proves nothing (a deadline) leaves the node's state as it was.
        The nodes that answered are written in one statement; each missing one on its own
        (rare: a node found missing is asked again only every ``WORKER_API_RECHECK_AFTER``).
        A node already known to answer is written again only once its check is older than
        ``WORKER_API_RECHECK_AFTER``: rewriting every node row on every pass would cost a
        thousand-row UPDATE (and as many dead row versions) per pass for nothing new."""
        stale = self.now - WORKER_API_RECHECK_AFTER
        Node.objects.record_workers_answering(
            {
                node.id: node.address
                for node in plan.listings
                if node.id in results.listings
                and (
                    node.worker_api != Node.WorkerApi.AVAILABLE
                    or node.worker_api_checked_at is None
                    or node.worker_api_checked_at <= stale
                )
            },
            now=self.now,
        )
        for node in plan.listings:
            if node.id in results.listings or node.id not in results.worker_api_missing:
                continue
            detail = results.worker_api_missing[node.id]
            recorded = Node.objects.record_worker_api(
                node.id, available=False, detail=detail, address=node.address, now=self.now
            )
            if recorded and node.worker_api != Node.WorkerApi.MISSING:
                self.summary.count("nodes_without_worker_service")
                logger.warning("node %s is not placed on: %s", node.name, detail)

    def apply_worker_health(self, snapshot: Snapshot, plan: WorkerHealthPlan, results) -> bool:
        """Count unanswered listings; a heartbeating node whose worker stays silent for
        ``worker_failures_before_unhealthy`` passes (each after a new heartbeat) becomes
        ``unhealthy`` (not routed to, not placed on, its rows kept), unless most workers are
        silent at once (``plan.guard``); the first answer ends the streak and brings an
        unhealthy node back. Returns True when a node changed status."""
        changed = False
        for node in plan.unanswered:
            error = results.unanswered[node.id]
            failures = UnansweredListing.objects.record_unanswered(
                node.id, heartbeat=node.last_heartbeat, error=error, now=self.now
            )
            self.summary.count("worker_listings_unanswered")
            if failures < self.cfg.worker_failures_before_unhealthy or node.status != Node.Status.HEALTHY:
                continue
            if plan.guard:
                self.summary.skip("mass_worker_silence")
                continue
            if Node.objects.mark_unhealthy(node.id, now=self.now):
                changed = True
                self.summary.count("nodes_marked_unhealthy")
                rows = len(snapshot.replicas_by_node.get(node.id, ()))
                logger.warning(
                    "node %s marked unhealthy: its worker did not answer ListBackends for %d passes (%s)",
                    node.name,
                    failures,
                    error,
                )
                self.event(
                    Event.Kind.NODE_UNHEALTHY,
                    node=node,
                    message=f"heartbeating, but its worker did not answer ListBackends for {failures} passes "
                    f"({error}); not routed to or placed on, {rows} replica row(s) kept",
                    unanswered_listings=failures,
                    error=error,
                    replica_rows=rows,
                )
        for node in plan.answered:
            UnansweredListing.objects.clear(node.id)
            if node.status == Node.Status.UNHEALTHY and Node.objects.mark_healthy(node.id, now=self.now):
                changed = True
                logger.info("node %s is healthy again: its worker answers ListBackends", node.name)
                self.node_back(node, "its worker answers ListBackends again")
        return changed

    def remove_gone_backends(self, node: NodeView, rows, backends, *, guard: bool) -> bool:
        changed = False
        states = {b.key: b.state for b in backends}
        for row in rows:
            if guard:
                self.summary.skip("mass_staleness")
                continue
            if NodeModel.objects.remove_replica(row.node_id, row.model_name, row.replica_index):
                changed = True
                state = states.get(row.key, "absent")
                self.summary.count("replicas_removed_exited")
                self.event(
                    Event.Kind.REPLICA_REMOVED,
                    model_name=row.model_name,
                    node=node,
                    message=f"worker reports replica {row.replica_index}'s backend as {state.lower()}",
                    reason="backend_exited" if state == "EXITED" else "backend_absent",
                    replica_index=row.replica_index,
                )
        return changed

    def stop_backend(self, node: NodeView, model_name: str, replica_index: int) -> str:
        """Ask the node's worker to stop one backend (best effort, short deadline); returns the
        error as text, or "" when it worked."""
        return operations.stop_backend(
            self.prober, node.address, node.id, model_name, replica_index, timeout=self.cfg.worker_timeout
        )

    def stop_orphans(self, node: NodeView, backends) -> None:
        for backend in backends:
            error = self.stop_backend(node, backend.model_name, backend.replica_index)
            if error:
                logger.warning(
                    "could not stop orphan %s#%s on %s: %s", backend.model_name, backend.replica_index, node.name, error
                )
                self.summary.skip("stop_failed")
                continue
            self.summary.count("orphans_stopped")
            self.event(
                Event.Kind.ORPHAN_BACKEND_STOPPED,
                model_name=backend.model_name,
                node=node,
                message=f"running backend {backend.model_name}#{backend.replica_index} had no replica row",
                replica_index=backend.replica_index,
                address=backend.address,
            )

    def housekeeping(self, snapshot: Snapshot) -> None:
        for replica in housekeeping.stale_loading_rows(snapshot, older_than=self.cfg.stale_loading_after, now=self.now):
            if housekeeping.discard_stale_loading_row(replica.id):
                self.summary.count("stale_loading_rows_discarded")
                self.event(
                    Event.Kind.VRAM_RESERVATION_RELEASED,
                    model_name=replica.model_name,
                    node=snapshot.nodes.get(replica.node_id),
                    message=(
                        f"replica {replica.model_name}#{replica.replica_index} was still loading after "
                        f"{self.cfg.stale_loading_after.total_seconds():.0f}s: row removed, "
                        f"{replica.reserved_vram} bytes of VRAM released"
                    ),
                    replica_index=replica.replica_index,
                    amount=replica.reserved_vram,
                )
        for action, n in housekeeping.expire_leases_and_dead_load_jobs(now=self.now).items():
            self.summary.count(action, n)
        self.summary.count(
            "events_pruned", housekeeping.prune_events(keep_days=self.cfg.events_kept_days, now=self.now)
        )

    # -- scaling -------------------------------------------------------------------------------

    def apply_scaling(self, snapshot: Snapshot, plan: ScalePlan) -> ScaleOutcome:
        outcome = ScaleOutcome()
        name = plan.model_name
        if plan.cooldown_over and ModelSchedulingConfig.objects.clear_cooldown(name):
            outcome.cooldown_cleared = True
            self.summary.count("cooldowns_left")
            self.event(Event.Kind.COOLDOWN_LEFT, model_name=name, message="cooldown over; scheduling again")
        if plan.record_unsatisfiable:
            tripped = ModelSchedulingConfig.objects.record_unsatisfiable(
                name, threshold=self.cfg.unsatisfiable_ticks, cooldown=self.cfg.unsatisfiable_cooldown, now=self.now
            )
            if tripped:
                outcome.tripped = True
                outcome.cooldown_until = self.now + self.cfg.unsatisfiable_cooldown
                self.summary.count("cooldowns_entered")
                self.event(
                    Event.Kind.COOLDOWN_ENTERED,
                    model_name=name,
                    message=f"below min_replicas ({plan.current}/{plan.config.min_replicas}) with no free slot on "
                    f"{len(plan.candidate_ids)} candidate node(s) for {self.cfg.unsatisfiable_ticks} passes; "
                    f"paused until {outcome.cooldown_until.isoformat()}",
                    until=outcome.cooldown_until.isoformat(),
                    candidates=len(plan.candidate_ids),
                )
        if plan.record_satisfiable:
            ModelSchedulingConfig.objects.record_satisfiable(name)
        if plan.skipped:
            self.summary.skip(plan.skipped)
        if plan.remove:
            self.scale_down(snapshot, plan, outcome)
        return outcome

    def record_load(self, plans: list[ScalePlan], outcomes: dict) -> None:
        """Store every load-aware model's reading (one statement for the pass, none when no
        model has a target) and say why a replica count changes (event ``autoscaled``).

        The event is written here, when the pass takes the decision: the replicas it claimed
        are loaded by the load pool after the pass (their ``replica_added`` events come when
        each load finishes), the ones it removed are gone already."""
        states = []
        for plan in plans:
            load = plan.load
            if load is None:
                continue
            outcome = outcomes.get(plan.model_name)
            # The routes counted at zero sized this decision: consumed, unless the pool was
            # full and the next pass claims the rest of the wake-up (it needs the count again).
            deferred = outcome is not None and outcome.skipped == "load_concurrency"
            consumed = 0 if deferred else load.waiting
            states.append((plan.model_name, load.average, self.now, load.desired, load.since, consumed, load.busy_at))
            if outcome is None or load.reason not in ("scale_up", "scale_down"):
                continue
            started = outcome.added + outcome.claimed
            if not (started or outcome.removed):
                continue
            self.summary.count("autoscaled")
            self.event(
                Event.Kind.AUTOSCALED,
                model_name=plan.model_name,
                message=f"{load.message} ({plan.current} -> {plan.current + started - outcome.removed})",
                in_flight=load.in_flight,
                average=round(load.average, 3),
                desired=load.desired,
                since=load.since.isoformat(),
                waiting=load.waiting,
                added=outcome.added,
                loading=outcome.claimed,
                removed=outcome.removed,
            )
        if states:
            ModelSchedulingConfig.objects.record_autoscale(states)

    def scale_down(self, snapshot: Snapshot, plan: ScalePlan, outcome: ScaleOutcome) -> None:
        """Row first (so nothing routes to it any more), then ask the worker to stop the
        backend, best effort: a failed stop leaves an orphan the next pass stops."""
        for replica in plan.remove:
            node = snapshot.nodes.get(replica.node_id)
            unloaded = unload(self.prober, node, replica, timeout=self.cfg.worker_timeout)
            if not unloaded.removed:
                continue
            outcome.removed += 1
            self.summary.count("replicas_scaled_down")
            stop_error = unloaded.stop_error
            self.event(
                Event.Kind.REPLICA_REMOVED,
                model_name=replica.model_name,
                node=node,
                message=(
                    f"replica {replica.replica_index} idle; scaled down by load ({plan.load.message})"
                    if plan.load is not None
                    else f"replica {replica.replica_index} idle since {_when(replica.last_used)}; scaled down"
                ),
                reason="scale_down",
                replica_index=replica.replica_index,
                stop_error=stop_error,
            )

    # -- conditions ----------------------------------------------------------------------------

    def update_conditions(self, snapshot: Snapshot, health: NodeHealthPlan, plans: dict, outcomes: dict) -> None:
        # Desired values are compared with the snapshot's as tuples; only those that differ
        # become ``ConditionState``s for ``set_conditions`` (which re-reads them under lock).
        known = snapshot.conditions
        guard = health.guard_condition()
        states = [] if known.get((guard.model_name, guard.type)) == guard[2:] else [guard]
        memo: dict = {}
        samples = []  # (model, ready, floor) of the models whose Available changed: their history
        for name in snapshot.model_names:
            for type_, value in model_condition_values(snapshot, name, plans.get(name), outcomes.get(name), memo=memo):
                if type_ == PROGRESSING and (self.rollout_progress or _reason(known.get((name, type_))) in _ROLLING):
                    value = self.progressing_of(name, value, known.get((name, type_)))
                if known.get((name, type_)) != value:
                    states.append(ConditionState(name, type_, *value))
                    if type_ == ModelCondition.Type.AVAILABLE:
                        samples.append((name, *available_counts(snapshot, name, plans.get(name), outcomes.get(name))))
        ReplicaSample.objects.record_changes(samples, now=self.now)
        for transition in ModelCondition.objects.set_conditions(states, now=self.now):
            state = transition.state
            self.summary.count("conditions_changed")
            kind = transition_event_kind(state.type, state.status, is_new=transition.is_new)
            if kind is None:
                continue
            self.event(
                kind,
                model_name=state.model_name,
                message=state.message or f"{state.type} is now {state.status} ({state.reason})",
                condition=state.type,
                status=state.status,
                reason=state.reason,
                previous_reason=transition.previous_reason,
            )
        forgotten = set(map(itemgetter(0), known)) - set(snapshot.model_names) - {ModelCondition.CLUSTER}
        if forgotten:
            ModelCondition.objects.forget(forgotten)


PROGRESSING = ModelCondition.Type.PROGRESSING


def _reason(value) -> str:
    return value.reason if value is not None else ""


def _when(moment: datetime | None) -> str:
    return moment.isoformat() if moment else "never"
