"""Pure planning: snapshot in, decisions out. No database, no network, no settings.

Each function answers one question of a pass, in LocalAI's order:

- ``plan_observation``: which heartbeats changed since the reconciler last looked, and whether
  its observation was interrupted (staleness is counted on the reconciler's clock only);
- ``plan_node_health``: which nodes go offline (stale) or healthy (fresh again), unless the
  mass-staleness guard holds or heartbeat ingestion is silent;
- ``plan_checks``: which replicas to probe and which workers to ask what they run;
- ``plan_worker_health``: whose worker stopped (or resumed) answering what it runs;
- ``plan_worker_reconciliation``: rows whose backend is gone, backends nobody has a row for;
- ``plan_scaling``: per autoscaled model, the cooldown gate, scale-up to the floor, busy +1,
  idle scale-down;
- ``model_conditions`` (``conditions.py``, re-exported here): what the operator sees per
  model once the plan has been applied.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from registry import placement, rules
from registry.models import Node, NodeModel

from .conditions import (  # noqa: F401  (the per-model conditions, re-exported)
    NORMAL_STATUS,
    TRANSITION_EVENTS,
    ScaleOutcome,
    available_counts,
    model_condition_values,
    model_conditions,
    transition_event_kind,
)
from .conf import ReconcileConfig
from .load import LoadDecision, plan_load
from .managers import ConditionState
from .models import ModelCondition
from .snapshot import ConfigView, NodeView, ReplicaView, Snapshot

Type = ModelCondition.Type

# --------------------------------------------------------------------------------------------
# Node health
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservationPlan:
    """How this pass observes heartbeats (applied by ``Node.objects.observe_heartbeats``).

    ``changed``: nodes whose ``last_heartbeat`` differs from the value last observed.
    ``restart``: observation resumed after a gap (no pass, or no heartbeat change, for longer
    than ``observation_gap``): every node is stamped ``now``, so no node is reaped for a
    heartbeat it could not have delivered. ``silent``: nothing changed for that long while at
    least two nodes should be heartbeating: the web tier or the database is not ingesting
    heartbeats, and no node is reaped until they flow again.
    """

    changed: frozenset = frozenset()
    restart: bool = False
    silent: bool = False
    quiet_since: datetime | None = None  # the last heartbeat change observed before this pass
    previous_pass_at: datetime | None = None


def plan_observation(
    snapshot: Snapshot, config: ReconcileConfig, *, now: datetime, previous_pass_at: datetime | None
) -> ObservationPlan:
    """Which heartbeats changed since the last pass, and whether observation was interrupted.

    The reconciler never ages a heartbeat by the web process's timestamp: it records when it
    saw each value change, on its own clock (``heartbeat_seen_at``), as the Kubernetes node
    lifecycle controller does with its own observed times. Two gaps break observation:

    - no ``ok`` pass ended within ``observation_gap`` (database down, no qcluster): whatever
      was or was not delivered meanwhile, counting restarts now (``restart``);
    - no heartbeat of any node changed within ``observation_gap``: while it lasts and at least
      two swept nodes exist, the pass reaps nothing (``silent``); the first pass that sees
      heartbeats again restarts counting for the nodes that have not delivered yet.
    """
    changed = frozenset(node.id for node in snapshot.nodes.values() if node.last_heartbeat != node.heartbeat_seen)
    seen = [node.heartbeat_seen_at for node in snapshot.nodes.values() if node.heartbeat_seen_at is not None]
    quiet_since = max(seen) if seen else None
    gap = config.observation_gap
    observer_gap = previous_pass_at is None or now - previous_pass_at > gap
    ingestion_quiet = quiet_since is None or now - quiet_since > gap
    swept = sum(1 for node in snapshot.nodes.values() if _sweepable(node))
    return ObservationPlan(
        changed=changed,
        restart=observer_gap or (bool(changed) and ingestion_quiet),
        silent=not changed and ingestion_quiet and swept >= 2,
        quiet_since=quiet_since,
        previous_pass_at=previous_pass_at,
    )


@dataclass(frozen=True)
class NodeHealthPlan:
    stale: tuple[NodeView, ...] = ()  # swept nodes not seen heartbeating for stale_after
    mark_offline: tuple[NodeView, ...] = ()  # empty while the guard holds
    mark_healthy: tuple[NodeView, ...] = ()
    guard: bool = False  # mass staleness: reap nothing this pass
    silent: bool = False  # heartbeat ingestion silent: reap nothing this pass
    swept: int = 0  # healthy nodes considered

    @property
    def reaping_paused(self) -> bool:
        return self.guard or self.silent

    def guard_condition(self) -> ConditionState:
        if self.silent:
            message = (
                f"no heartbeat of any of the {self.swept} healthy nodes arrived for longer than the observation gap; "
                "suspecting the web tier or the database, no node is reaped"
            )
            return ConditionState(
                ModelCondition.CLUSTER, Type.REAPING_PAUSED, True, "heartbeat_ingestion_silent", message
            )
        if self.guard:
            message = (
                f"{len(self.stale)} of {self.swept} healthy nodes missed heartbeats at once; "
                "suspecting the control plane or its network, no node is reaped"
            )
            return ConditionState(ModelCondition.CLUSTER, Type.REAPING_PAUSED, True, "mass_staleness", message)
        return ConditionState(ModelCondition.CLUSTER, Type.REAPING_PAUSED, False, "reaping_allowed", "")


def _sweepable(node: NodeView) -> bool:
    """Nodes whose stale heartbeat is news (``Node.NOT_SWEPT_STATUSES``: healthy ones, and
    unhealthy ones whose heartbeat stops as well), except draining ones (an operator's
    choice; the worker deregisters itself when done)."""
    return node.status not in Node.NOT_SWEPT_STATUSES and node.status != Node.Status.DRAINING


def _seen_at(node: NodeView, observation: ObservationPlan, now: datetime) -> datetime | None:
    """When the reconciler last saw this node's heartbeat change, after this pass's observation."""
    if observation.restart or node.id in observation.changed:
        return now
    return node.heartbeat_seen_at


def _is_stale(node: NodeView, observation: ObservationPlan, config: ReconcileConfig, now: datetime) -> bool:
    seen_at = _seen_at(node, observation, now)
    return node.last_heartbeat is None or seen_at is None or now - seen_at > config.stale_after


def plan_node_health(
    snapshot: Snapshot, config: ReconcileConfig, *, now: datetime, observation: ObservationPlan | None = None
) -> NodeHealthPlan:
    """Stale healthy (or unhealthy) nodes go offline; offline nodes heartbeating again recover.

    A node is stale when the reconciler has not seen its heartbeat change for ``stale_after``
    (``observation``; see ``plan_observation``). An offline node recovers when its heartbeat
    changed since it was last observed (a new heartbeat, whatever its timestamp). An
    unhealthy node heartbeats all along: it recovers when its worker answers again
    (``plan_worker_health``), not on a heartbeat.

    Mass-staleness guard: when at least two nodes and more than ``mass_stale_fraction`` of the
    healthy nodes are stale in the same pass, none is reaped (the likelier story is that the
    control plane stopped receiving heartbeats, e.g. it just restarted). Nothing is reaped
    either while heartbeat ingestion is silent (``observation.silent``).
    """
    observation = observation or ObservationPlan()
    swept = [node for node in snapshot.nodes.values() if _sweepable(node)]
    stale = tuple(node for node in swept if _is_stale(node, observation, config, now))
    guard = len(stale) >= 2 and len(stale) > config.mass_stale_fraction * len(swept)
    recovering = tuple(
        node
        for node in snapshot.nodes.values()
        if node.status == Node.Status.OFFLINE
        and node.last_heartbeat is not None
        and node.id in observation.changed
        and node.heartbeat_seen_at is not None  # a first sight is no news; the next heartbeat is
    )
    paused = guard or observation.silent
    return NodeHealthPlan(
        stale=stale,
        mark_offline=() if paused else stale,
        mark_healthy=recovering,
        guard=guard,
        silent=observation.silent,
        swept=len(swept),
    )


# --------------------------------------------------------------------------------------------
# Probes and worker listings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckPlan:
    probes: tuple[ReplicaView, ...] = ()  # loaded replicas not confirmed recently
    listings: tuple[NodeView, ...] = ()  # workers asked what they run


# A node found without the worker gRPC service (a LocalAI worker) is asked again this rarely,
# not every pass: the answer only changes if something else starts listening at its address.
WORKER_API_RECHECK_AFTER = timedelta(seconds=60)


def due_for_listing(node: NodeView, now: datetime) -> bool:
    """Whether to ask ``node``'s worker what it runs this pass: always, unless its address was
    found without the worker service less than ``WORKER_API_RECHECK_AFTER`` ago and it is not
    in a streak of unanswered listings (each pass of a streak counts)."""
    if node.worker_api != Node.WorkerApi.MISSING or node.worker_api_checked_at is None:
        return True
    if node.unanswered_listings:
        return True
    return node.worker_api_checked_at <= now - WORKER_API_RECHECK_AFTER


def listed(node: NodeView) -> bool:
    """Nodes whose worker a pass asks what it runs: schedulable ones, and unhealthy backend
    nodes (their first answer makes them healthy again)."""
    unhealthy_backend = node.status == Node.Status.UNHEALTHY and node.node_type == Node.NodeType.BACKEND
    return (node.schedulable or unhealthy_backend) and bool(node.address)


def plan_checks(snapshot: Snapshot, config: ReconcileConfig, *, now: datetime) -> CheckPlan:
    """Probe loaded rows on healthy nodes whose last confirmation is older than
    ``probe_after``; list the backends of every node ``listed`` (a node without the worker
    service only every ``WORKER_API_RECHECK_AFTER``)."""
    confirmed_after = now - config.probe_after
    healthy = {node_id for node_id, node in snapshot.nodes.items() if node.healthy}
    loaded = NodeModel.State.LOADED
    probes = tuple(
        replica
        for replica in snapshot.replicas
        if (replica.last_probe_at is None or replica.last_probe_at < confirmed_after)
        and replica.state == loaded
        and replica.address
        and replica.node_id in healthy
    )
    listings = tuple(node for node in snapshot.nodes.values() if listed(node) and due_for_listing(node, now))
    return CheckPlan(probes=probes, listings=listings)


@dataclass(frozen=True)
class WorkerHealthPlan:
    unanswered: tuple[NodeView, ...] = ()  # one more pass in their streak of unanswered listings
    answered: tuple[NodeView, ...] = ()  # streak over: the worker answered (unhealthy ones recover)
    # Most watched workers silent at once: the control plane's own network is the likelier
    # culprit, so no node is marked unhealthy this pass (streaks still count).
    guard: bool = False


def plan_worker_health(
    listings: tuple[NodeView, ...],
    *,
    answered: Collection[UUID],
    failed: Collection[UUID],
    mass_silence_fraction: float = 1.0,
) -> WorkerHealthPlan:
    """Whose worker stopped, or resumed, answering ``ListBackends`` this pass (``failed``: the
    listings nothing answered, no connection or no answer within the deadline; an answer that
    refuses the call is the worker-API check's business, not a silence).

    Only a node whose worker is known to serve the worker gRPC service (``worker_api``
    available), or is already in a streak, counts a failed listing: a LocalAI worker never
    answers it and is not sick for that. After the first, a failed listing counts only when
    the node heartbeated since the streak last counted: a node that keeps heartbeating while
    its worker is silent is sick; one whose heartbeats stopped too (a stopped or partitioned
    machine) is left to the stale sweep, healthy until then. A node in a streak, or
    unhealthy, whose worker answered ends its streak. How long a streak makes a node
    unhealthy is the apply step's ``worker_failures_before_unhealthy``, compared with the
    count the database returns.

    Mass-silence guard, as for stale heartbeats: when at least two and more than
    ``mass_silence_fraction`` of the healthy workers known to serve the worker service are
    silent in the same pass, none is marked unhealthy (an outage of the control plane's own
    outbound network must not take every node out of routing).
    """
    watched = [
        node
        for node in listings
        if node.status == Node.Status.HEALTHY
        and (placement.serves_worker_api(node.worker_api) or node.unanswered_listings)
    ]
    silent = [node for node in watched if node.id in failed]
    guard = len(silent) >= 2 and len(silent) > mass_silence_fraction * len(watched)
    unanswered = tuple(
        node
        for node in listings
        if node.id in failed
        and (placement.serves_worker_api(node.worker_api) or node.unanswered_listings)
        and (not node.unanswered_listings or node.last_heartbeat != node.unanswered_heartbeat)
    )
    back = tuple(
        node
        for node in listings
        if node.id in answered and (node.unanswered_listings or node.status == Node.Status.UNHEALTHY)
    )
    return WorkerHealthPlan(unanswered=unanswered, answered=back, guard=guard)


class WorkerBackend(NamedTuple):
    """One backend process as a worker reports it (``state``: STARTING, RUNNING, EXITED)."""

    model_name: str
    replica_index: int
    state: str
    address: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.model_name, self.replica_index)


@dataclass(frozen=True)
class WorkerPlan:
    remove: tuple[ReplicaView, ...] = ()  # loaded rows whose backend is absent or exited
    stop: tuple[WorkerBackend, ...] = ()  # running backends without any row


def alive_keys(reported: list[WorkerBackend]) -> set[tuple[str, int]]:
    """The ``(model, replica index)`` of the backends a worker reports starting or running."""
    return {(b.model_name, b.replica_index) for b in reported if b.state in _ALIVE_STATES}


_ALIVE_STATES = frozenset(("STARTING", "RUNNING"))


def plan_worker_reconciliation(
    rows: list[ReplicaView] | tuple[ReplicaView, ...],
    reported: list[WorkerBackend],
    *,
    loaded_before_listing: Mapping[int, datetime | None],
    alive: Collection[tuple[str, int]] | None = None,
) -> WorkerPlan:
    """Compare one worker's rows (read after its listing) with what it says it runs.

    - a *loaded* row whose backend is absent or EXITED is removed only if it was already
      loaded, in the same state change, before the worker was asked: ``loaded_before_listing``
      maps the ids of the rows the pass's snapshot (read before the listing) held ``loaded`` to
      their ``state_changed_at``. A row loaded or re-recorded since (a load whose
      ``mark_loaded`` committed while the worker answered) is judged by the next pass. No
      clock is compared with another process's clock: the value either changed or not.
      ``loading`` rows are left to their loader, whose backend may not exist yet;
    - a RUNNING backend with no row at all (not even ``loading``) is an orphan and is stopped.
      Loaders write the ``loading`` row before starting the backend, so a running backend
      without a row is one nobody will ever route to.

    ``alive``: ``alive_keys(reported)`` when the caller has it already.
    """
    if alive is None:
        alive = alive_keys(reported)
    loaded = NodeModel.State.LOADED
    remove = tuple(
        row
        for row in rows
        if row.state == loaded
        and (row.model_name, row.replica_index) not in alive
        and row.id in loaded_before_listing
        and loaded_before_listing[row.id] == row.state_changed_at
    )
    running = [b for b in reported if b.state == "RUNNING"]
    if not running:
        return WorkerPlan(remove=remove)
    keys = {(row.model_name, row.replica_index) for row in rows}
    stop = tuple(b for b in running if (b.model_name, b.replica_index) not in keys)
    return WorkerPlan(remove=remove, stop=stop)


# --------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------


class ScalePlan(NamedTuple):
    """What one autoscaled model needs this pass, and the facts behind it (one per model)."""

    model_name: str
    config: ConfigView
    ready: int = 0
    loading: int = 0
    capacity: int | None = None  # None: not computed (the model did not want to grow)
    candidate_ids: tuple = ()
    has_load_info: bool = True
    in_cooldown: bool = False  # gate: nothing else happens this pass
    cooldown_over: bool = False  # the cooldown has passed: clear it (emits cooldown_left)
    record_unsatisfiable: bool = False  # below the floor with zero capacity
    record_satisfiable: bool = False
    scale_up: int = 0
    scale_up_reason: str = ""  # below_min | all_busy
    remove: tuple[ReplicaView, ...] = ()
    skipped: str = ""  # why nothing was done although something was wanted
    load: LoadDecision | None = None  # load-aware autoscaling (a model with a target)

    @property
    def current(self) -> int:
        return self.ready + self.loading

    @property
    def acts(self) -> bool:
        """Whether applying the plan writes, calls or counts anything (a steady model: no)."""
        return bool(
            self.cooldown_over
            or self.record_unsatisfiable
            or self.record_satisfiable
            or self.skipped
            or self.scale_up
            or self.remove
        )


def _capacity(snapshot: Snapshot, config: ConfigView, candidates) -> int:
    """The cluster capacity for a model over its candidates, with the one formula
    (``placement.cluster_capacity``; rows in any state count). Only computed for models that
    want to grow: it is O(candidates)."""
    rows_on = {}
    for replica in snapshot.replicas_by_model.get(config.model_name, ()):
        rows_on[replica.node_id] = rows_on.get(replica.node_id, 0) + 1
    usages = [placement.SlotUsage(node.id, node.slots, rows_on.get(node.id, 0)) for node in candidates]
    return placement.cluster_capacity(usages)


def _removal_order(replica: ReplicaView, snapshot: Snapshot):
    """Highest replica index first, then least recently used, then node name (stable)."""
    node = snapshot.nodes.get(replica.node_id)
    last_used = replica.last_used.timestamp() if replica.last_used else float("-inf")
    return (-replica.replica_index, last_used, node.name if node else "")


def _all_busy(ready: tuple[ReplicaView, ...]) -> bool:
    for replica in ready:
        if replica.in_flight <= 0:
            return False
    return True


def plan_model(snapshot: Snapshot, config: ConfigView, cfg: ReconcileConfig, *, now: datetime) -> ScalePlan:
    """One autoscaled model, in LocalAI's order (see module docstring).

    Called once per autoscaled model per pass: the facts are read with one lookup each from
    the snapshot's per-pass indexes, and a model with nothing to do (the common case) returns
    after a handful of comparisons."""
    name, min_replicas, max_replicas, selector, until, ticks = config[:6]
    # The count of unsatisfiable passes is reset only when the snapshot saw one: only passes
    # (under the reconcile lock) raise it, so a zero read in this pass is still zero.
    satisfiable = ticks > 0
    ready, loading = snapshot.routable(name)
    candidate_ids = snapshot.candidates_and_ids(selector)[1]
    has_load_info = snapshot.has_load_info(name)
    n_ready, n_loading = len(ready), len(loading)

    # 1. Cooldown gate.
    if until is not None and until > now:
        return ScalePlan(
            name, config, n_ready, n_loading, None, candidate_ids, has_load_info, in_cooldown=True, skipped="cooldown"
        )
    cooldown_over = until is not None

    current = n_ready + n_loading
    ceiling = max_replicas if max_replicas > 0 else None
    load = plan_load(config, ready, current, cfg, now=now) if config.target is not None else None

    # 2. Below the floor: scale up by min(needed, capacity).
    if current < min_replicas:
        capacity = _capacity(snapshot, config, snapshot.candidates(selector))
        facts = (name, config, n_ready, n_loading, capacity, candidate_ids, has_load_info)
        needed = min_replicas - current
        if ceiling is not None:
            needed = min(needed, ceiling - current)
        if capacity == 0:
            return ScalePlan(
                *facts, cooldown_over=cooldown_over, record_unsatisfiable=True, skipped="no_capacity", load=load
            )
        if not has_load_info:
            return ScalePlan(
                *facts, cooldown_over=cooldown_over, record_satisfiable=satisfiable, skipped="no_load_info", load=load
            )
        return ScalePlan(
            *facts,
            cooldown_over=cooldown_over,
            record_satisfiable=satisfiable,
            scale_up=min(needed, capacity),
            scale_up_reason="below_min",
            load=load,
        )

    if load is not None:
        return _plan_by_load(snapshot, config, cfg, load, ready, n_loading, candidate_ids, has_load_info, cooldown_over)

    # 3. Every ready replica busy, nothing already loading, below the ceiling: add one.
    if n_ready and not n_loading and (ceiling is None or current < ceiling) and _all_busy(ready):
        capacity = _capacity(snapshot, config, snapshot.candidates(selector))
        facts = (name, config, n_ready, n_loading, capacity, candidate_ids, has_load_info)
        if capacity == 0:
            return ScalePlan(*facts, cooldown_over=cooldown_over, skipped="no_capacity")
        if not has_load_info:
            return ScalePlan(*facts, cooldown_over=cooldown_over, skipped="no_load_info")
        return ScalePlan(*facts, cooldown_over=cooldown_over, scale_up=1, scale_up_reason="all_busy")

    # 4. Above max(min, 1): remove idle replicas, never below the floor. Replicas above a
    #    ceiling go as soon as they have nothing in flight; the rest after idling long enough.
    # (``n_ready <= min_replicas`` is the common case, and implies nothing is removable.)
    removable = 0 if n_ready <= min_replicas else n_ready - rules.replica_floor(min_replicas, max_replicas)
    if removable <= 0:
        return ScalePlan(name, config, n_ready, n_loading, None, candidate_ids, has_load_info, False, cooldown_over)
    remove: list[ReplicaView] = []
    # While the model rolls out, only outdated replicas go (``rollout.py``): a surge stays.
    protected = snapshot.rollout_protected(name)
    unused = sorted(
        (r for r in ready if r.in_flight == 0 and r.id not in protected), key=lambda r: _removal_order(r, snapshot)
    )
    over_ceiling = max(0, n_ready - ceiling) if ceiling is not None else 0
    remove.extend(unused[:over_ceiling])
    idle_before = now - cfg.scale_down_idle_after
    for replica in unused[over_ceiling:]:
        if len(remove) >= removable:
            break
        if replica.last_used is None or replica.last_used <= idle_before:
            remove.append(replica)
    remove = remove[:removable]
    return ScalePlan(
        name,
        config,
        n_ready,
        n_loading,
        None,
        candidate_ids,
        has_load_info,
        cooldown_over=cooldown_over,
        remove=tuple(remove),
    )


def _plan_by_load(
    snapshot: Snapshot,
    config: ConfigView,
    cfg: ReconcileConfig,
    load: LoadDecision,
    ready,
    n_loading: int,
    candidate_ids,
    has_load_info: bool,
    cooldown_over: bool,
) -> ScalePlan:
    """Steps 3-4 for a model with a load target: grow to, or shrink (idle replicas only, never
    below ``min_replicas``) toward, the count ``plan_load`` settled on."""
    name, n_ready = config.model_name, len(ready)
    current = n_ready + n_loading
    if load.target > current:
        capacity = _capacity(snapshot, config, snapshot.candidates(config.node_selector))
        facts = (name, config, n_ready, n_loading, capacity, candidate_ids, has_load_info)
        if capacity == 0:
            return ScalePlan(*facts, cooldown_over=cooldown_over, skipped="no_capacity", load=load)
        if not has_load_info:
            return ScalePlan(*facts, cooldown_over=cooldown_over, skipped="no_load_info", load=load)
        return ScalePlan(
            *facts,
            cooldown_over=cooldown_over,
            scale_up=min(load.target - current, capacity),
            scale_up_reason="load",
            load=load,
        )
    remove: tuple[ReplicaView, ...] = ()
    if load.target < current:
        removable = min(current - load.target, n_ready - config.min_replicas)
        if removable > 0:
            unused = sorted((r for r in ready if r.in_flight == 0), key=lambda r: _removal_order(r, snapshot))
            remove = tuple(unused[:removable])
    return ScalePlan(
        name,
        config,
        n_ready,
        n_loading,
        None,
        candidate_ids,
        has_load_info,
        cooldown_over=cooldown_over,
        remove=remove,
        load=load,
    )


def plan_scaling(snapshot: Snapshot, cfg: ReconcileConfig, *, now: datetime) -> list[ScalePlan]:
    """A plan for every autoscaled model, in model-name order."""
    configs = snapshot.configs
    return [
        plan_model(snapshot, config, cfg, now=now)
        for config in map(configs.__getitem__, sorted(configs))
        if config.autoscaled
    ]
