"""Pure placement arithmetic over plain data: no database, no network.

The registry's placement queries, the router's scheduler and the reconciler's planner all use
these functions, so there is exactly one capacity formula in the code base.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


def free_slots(slots: int, replica_rows: int) -> int:
    """Replica slots of one node still free for a model.

    Rows in any state (loading or loaded) count against the node's `max_replicas_per_model`;
    a slot count below 1 is treated as 1, as LocalAI does for `0`.
    """
    return max(0, max(1, slots) - replica_rows)


@dataclass(frozen=True)
class SlotUsage:
    """How many replica slots a node has, and how many rows of one model it already holds."""

    node_id: object
    slots: int
    replica_rows: int

    @property
    def free(self) -> int:
        return free_slots(self.slots, self.replica_rows)


def cluster_capacity(usages) -> int:
    """How many more replicas of a model the candidate nodes can take in total."""
    return sum(usage.free for usage in usages)


# --------------------------------------------------------------------------------------------
# Choosing a node for a new replica
# --------------------------------------------------------------------------------------------

SPREAD = "spread"
BINPACK = "binpack"

# ``Node.WorkerApi.AVAILABLE``: the node answered (or declared) the worker gRPC service.
WORKER_API_AVAILABLE = "available"


def serves_worker_api(worker_api: str) -> bool:
    """Whether a node with this ``Node.worker_api`` may take a new replica. Placing means
    sending ``StartBackend`` over the worker gRPC service; a node that does not answer it (a
    LocalAI worker takes backend commands over NATS) or has not been checked yet would only
    fail that call, every time it is chosen."""
    return worker_api == WORKER_API_AVAILABLE


STRATEGIES = (SPREAD, BINPACK)

# Why no node was chosen; the router maps these to its typed errors.
NO_CANDIDATES = "no_candidates"  # the selector/candidate list left nothing
NO_WORKER_SERVICE = "no_worker_service"  # candidates exist, but none answers the worker gRPC service
NO_FREE_SLOT = "no_free_slot"  # every candidate holds max_replicas_per_model rows: eviction cannot help
NOT_ENOUGH_VRAM = "not_enough_vram"  # some node has a slot but none has the VRAM: eviction may help


@dataclass(frozen=True)
class NodeCandidate:
    """One schedulable node as the scheduler sees it for one model (one snapshot row).

    ``model_rows`` counts the model's replica rows on the node in any state; ``free_vram`` is
    ``available - reserved``; ``failure_backoff_until`` is when a recent failed load of this
    model on this node stops counting against it (None: no recent failure); ``worker_api`` is
    ``Node.worker_api`` (only ``available`` nodes take new replicas: see ``serves_worker_api``).
    """

    node_id: object
    name: str
    slots: int
    model_rows: int = 0
    free_vram: int = 0
    in_flight_total: int = 0
    failure_backoff_until: datetime | None = None
    replica_count: int = 0  # replica rows of every model on the node
    worker_api: str = WORKER_API_AVAILABLE

    @property
    def serves_worker_api(self) -> bool:
        return serves_worker_api(self.worker_api)

    @property
    def free_slots(self) -> int:
        return free_slots(self.slots, self.model_rows)

    @property
    def has_model(self) -> bool:
        return self.model_rows > 0

    @property
    def idle(self) -> bool:
        return self.in_flight_total == 0

    def in_backoff(self, now: datetime) -> bool:
        return self.failure_backoff_until is not None and self.failure_backoff_until > now


@dataclass(frozen=True)
class PlacementDecision:
    """The chosen node, or None with ``reason`` (one of NO_CANDIDATES, NO_FREE_SLOT,
    NOT_ENOUGH_VRAM). ``slotted`` lists the nodes that had a free slot (eviction targets)."""

    node: NodeCandidate | None
    reason: str = ""
    slotted: tuple[NodeCandidate, ...] = ()

    def __bool__(self) -> bool:
        return self.node is not None


def _rank(strategy: str):
    """Sort key: lower is better.

    Both strategies prefer idle nodes, then the least loaded (in-flight sum), as LocalAI
    does. ``spread`` first prefers nodes that do not hold the model yet (a node failure then
    takes fewer replicas of it), then the fewest replicas of any model (VRAM reports lag behind
    loads, so without this every model of unknown size would land on the same idle node), then
    the most free VRAM; ``binpack`` prefers nodes that already hold it and the tightest VRAM fit,
    keeping other nodes empty for big models.
    """
    if strategy == BINPACK:
        return lambda c: (not c.has_model, not c.idle, c.in_flight_total, c.free_vram, c.name)
    return lambda c: (c.has_model, not c.idle, c.in_flight_total, c.replica_count, -c.free_vram, c.name)


def choose_node(
    candidates: Iterable[NodeCandidate],
    *,
    needed_vram: int = 0,
    now: datetime,
    strategy: str = SPREAD,
) -> PlacementDecision:
    """Pick the node for one new replica.

    Filters: the worker gRPC service (``serves_worker_api``), a free replica slot, then
    ``free_vram >= needed_vram`` (0 = unknown: every node fits). Nodes whose last load of this
    model failed recently (``in_backoff``) are used only when no other node fits, so a failing
    node is not retried in a loop while others exist. Among the rest, ``_rank(strategy)``
    decides.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}")
    candidates = list(candidates)
    if not candidates:
        return PlacementDecision(None, NO_CANDIDATES)
    candidates = [c for c in candidates if c.serves_worker_api]
    if not candidates:
        return PlacementDecision(None, NO_WORKER_SERVICE)
    slotted = tuple(c for c in candidates if c.free_slots > 0)
    if not slotted:
        return PlacementDecision(None, NO_FREE_SLOT)
    fitting = [c for c in slotted if needed_vram <= 0 or c.free_vram >= needed_vram]
    if not fitting:
        return PlacementDecision(None, NOT_ENOUGH_VRAM, slotted)
    preferred = [c for c in fitting if not c.in_backoff(now)] or fitting
    if preferred is fitting and len(fitting) > 1:
        # Everything is in backoff: the one whose backoff ends first is the least bad.
        preferred = sorted(fitting, key=lambda c: c.failure_backoff_until)[:1]
    return PlacementDecision(min(preferred, key=_rank(strategy)), "", slotted)


# --------------------------------------------------------------------------------------------
# Eviction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica row as the eviction planner sees it.

    ``vram`` is what its load reserved (0 = unknown); ``node_healthy`` says whether its node is
    routable; ``floor`` is the fewest replicas its model may keep (``max(min_replicas, 1)`` for
    an autoscaled model, 0 otherwise).
    """

    replica_id: object
    node_id: object
    model_name: str
    replica_index: int = 0
    in_flight: int = 0
    last_used: datetime | None = None
    loaded: bool = True
    node_healthy: bool = True
    vram: int = 0
    floor: int = 0


def choose_victim(
    replicas: Iterable[ReplicaInfo],
    *,
    node_ids: Iterable | None = None,
    exclude_model: str | None = None,
) -> ReplicaInfo | None:
    """The replica to evict to make room, or None when nothing may go.

    Eligible: loaded, zero in-flight, on a healthy node, on one of ``node_ids`` (the nodes
    where room helps; None = any), not of ``exclude_model`` (the model being placed), and its
    model keeps at least its ``floor`` of ready replicas afterwards. ``replicas`` must list
    every ready replica of the models involved (not only those on ``node_ids``) so that the
    floor is counted fleet-wide. Among the eligible: least recently used first (never used
    counts as oldest), then the highest replica index, then the id for a stable answer.
    """
    replicas = list(replicas)
    ready = Counter(r.model_name for r in replicas if r.loaded and r.node_healthy)
    allowed = None if node_ids is None else set(node_ids)
    eligible = [
        r
        for r in replicas
        if r.loaded
        and r.node_healthy
        and r.in_flight == 0
        and (allowed is None or r.node_id in allowed)
        and r.model_name != exclude_model
        and ready[r.model_name] - 1 >= r.floor
    ]
    if not eligible:
        return None
    oldest = datetime.min.replace(tzinfo=UTC)
    return min(eligible, key=lambda r: (r.last_used or oldest, -r.replica_index, str(r.replica_id)))


# --------------------------------------------------------------------------------------------
# Failed-load backoff
# --------------------------------------------------------------------------------------------

BACKOFF_BASE = timedelta(seconds=10)
BACKOFF_CAP = timedelta(minutes=5)


def failure_backoff(failures: int, *, base: timedelta = BACKOFF_BASE, cap: timedelta = BACKOFF_CAP) -> timedelta:
    """How long a node is avoided for a model after ``failures`` consecutive failed loads:
    ``base`` doubling per failure, at most ``cap`` (10 s, 20 s, 40 s ... 5 min)."""
    if failures <= 0:
        return timedelta(0)
    return min(cap, base * (2 ** min(failures - 1, 32)))
