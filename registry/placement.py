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
NOT_ENOUGH_DISK = "not_enough_disk"  # nodes have slots but none has the disk for the model

# Per-node verdicts of ``explain`` ("why here / why not there").
CHOSEN = "chosen"
NOT_WORKER_SERVICE = "no_worker_service"
SLOT_FULL = "no_free_slot"
DISK = "disk"
VRAM = "vram"
BUDGET = "budget"
BACKOFF = "backoff"
SPREAD_LABEL_MISSING = "spread_label_missing"
SPREAD_SKEW = "spread"
RANKED_LOWER = "ranked_lower"


@dataclass(frozen=True)
class NodeCandidate:
    """One schedulable node as the scheduler sees it for one model (one snapshot row).

    ``model_rows`` counts the model's replica rows on the node in any state; ``free_vram`` is
    ``available - reserved``; ``failure_backoff_until`` is when a recent failed load of this
    model on this node stops counting against it (None: no recent failure); ``worker_api`` is
    ``Node.worker_api`` (only ``available`` nodes take new replicas: see ``serves_worker_api``).

    ``vram_budget`` is the operator's cap on the VRAM our replicas may reserve on the node (None:
    no cap) and ``budget_used`` what the node's replica rows reserve now; ``available_disk`` /
    ``total_disk`` are the heartbeat's disk figures (``total_disk`` 0: never reported, every
    model fits); ``labels`` are the node's ``(key, value)`` pairs (for topology spread).
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
    vram_budget: int | None = None
    budget_used: int = 0
    available_disk: int = 0
    total_disk: int = 0
    labels: tuple = ()

    @property
    def budget_free(self) -> int | None:
        """VRAM the budget still allows (None: no budget)."""
        if self.vram_budget is None:
            return None
        return self.vram_budget - self.budget_used

    @property
    def placeable_vram(self) -> int:
        """Free VRAM for placement: ``min(available - reserved, budget - used by our replicas)``."""
        budget = self.budget_free
        return self.free_vram if budget is None else min(self.free_vram, budget)

    def fits_disk(self, needed_disk: int) -> bool:
        """Whether a model of ``needed_disk`` bytes on disk fits (unknown size or unreported
        disk: yes)."""
        return needed_disk <= 0 or self.total_disk <= 0 or self.available_disk >= needed_disk

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)

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


@dataclass(frozen=True)
class Verdict:
    """Why one candidate node was chosen or not, for one hypothetical new replica."""

    node: NodeCandidate
    reason: str
    detail: str = ""

    @property
    def chosen(self) -> bool:
        return self.reason == CHOSEN


def _vram_verdict(c: NodeCandidate, needed_vram: int) -> tuple[str, str] | None:
    budget = c.budget_free
    if needed_vram <= 0:
        # Unknown size: every node fits, except one whose budget is already used up.
        if budget is not None and budget <= 0:
            return BUDGET, f"budget of {c.vram_budget} B used up"
        return None
    if budget is not None and budget < needed_vram and budget <= c.free_vram:
        return BUDGET, f"budget leaves {max(0, budget)} B of {c.vram_budget} B, needs {needed_vram} B"
    if c.free_vram < needed_vram:
        return VRAM, f"{max(0, c.free_vram)} B free VRAM, needs {needed_vram} B"
    return None


def spread_counts(candidates: Iterable[NodeCandidate], spread_by: str) -> Counter:
    """Replica rows of the model per value of the ``spread_by`` label over the candidates
    (every value present, also at 0)."""
    counts: Counter = Counter()
    for c in candidates:
        value = c.label(spread_by)
        if value is not None:
            counts[value] += c.model_rows
    return counts


def explain(
    candidates: Iterable[NodeCandidate],
    *,
    needed_vram: int = 0,
    needed_disk: int = 0,
    now: datetime,
    strategy: str = SPREAD,
    spread_by: str = "",
) -> tuple[list[Verdict], str]:
    """Every candidate's verdict for one new replica, and the decision's reason ("" when a
    node was chosen). The filters, in order: the worker gRPC service, a free replica slot, disk
    headroom (``needed_disk``), VRAM (``placeable_vram``: the reported free VRAM and the node's
    budget), failed-load backoff (only when another node fits), topology spread (with
    ``spread_by``: nodes without the label are not candidates; among the fitting nodes only
    those in the label value holding the fewest replicas of the model, as Kubernetes' topology
    spread with maxSkew 1 when it can be satisfied); then ``_rank(strategy)`` picks one."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}")
    candidates = list(candidates)
    if not candidates:
        return [], NO_CANDIDATES
    verdicts: dict = {}
    counts = spread_counts(candidates, spread_by) if spread_by else Counter()
    fitting, slotted_ok, worker_ok, disk_short = [], 0, 0, 0
    for c in candidates:
        if not c.serves_worker_api:
            verdicts[c.node_id] = Verdict(c, NOT_WORKER_SERVICE, f"worker API {c.worker_api}")
            continue
        worker_ok += 1
        if spread_by and c.label(spread_by) is None:
            verdicts[c.node_id] = Verdict(c, SPREAD_LABEL_MISSING, f"no {spread_by!r} label")
            continue
        if c.free_slots <= 0:
            verdicts[c.node_id] = Verdict(c, SLOT_FULL, f"{c.model_rows} of {max(1, c.slots)} slots taken")
            continue
        slotted_ok += 1
        if not c.fits_disk(needed_disk):
            disk_short += 1
            verdicts[c.node_id] = Verdict(c, DISK, f"{c.available_disk} B disk free, needs {needed_disk} B")
            continue
        short = _vram_verdict(c, needed_vram)
        if short is not None:
            verdicts[c.node_id] = Verdict(c, *short)
            continue
        fitting.append(c)
    if not fitting:
        if not worker_ok:
            reason = NO_WORKER_SERVICE
        elif not slotted_ok:
            reason = NO_FREE_SLOT
        elif disk_short == slotted_ok:
            reason = NOT_ENOUGH_DISK
        else:
            reason = NOT_ENOUGH_VRAM
        return [verdicts[c.node_id] for c in candidates], reason
    preferred = [c for c in fitting if not c.in_backoff(now)]
    if not preferred:
        # Everything is in backoff: the one whose backoff ends first is the least bad.
        preferred = sorted(fitting, key=lambda c: c.failure_backoff_until)[:1]
    for c in fitting:
        if c not in preferred:
            verdicts[c.node_id] = Verdict(c, BACKOFF, f"failed load, retry after {c.failure_backoff_until}")
    if spread_by:
        low = min(counts[c.label(spread_by)] for c in preferred)
        for c in preferred:
            if counts[c.label(spread_by)] > low:
                value = c.label(spread_by)
                verdicts[c.node_id] = Verdict(
                    c, SPREAD_SKEW, f"{spread_by}={value} holds {counts[value]} replicas, another value {low}"
                )
        preferred = [c for c in preferred if counts[c.label(spread_by)] == low]
    best = min(preferred, key=_rank(strategy))
    for c in preferred:
        verdicts[c.node_id] = (
            Verdict(c, CHOSEN, strategy) if c is best else Verdict(c, RANKED_LOWER, f"{strategy} prefers {best.name}")
        )
    return [verdicts[c.node_id] for c in candidates], ""


def choose_node(
    candidates: Iterable[NodeCandidate],
    *,
    needed_vram: int = 0,
    needed_disk: int = 0,
    now: datetime,
    strategy: str = SPREAD,
    spread_by: str = "",
) -> PlacementDecision:
    """Pick the node for one new replica (the rules: :func:`explain`).

    ``slotted`` lists the nodes with a free slot and the disk for the model: evicting a
    replica there can make VRAM (and budget) room."""
    verdicts, reason = explain(
        candidates, needed_vram=needed_vram, needed_disk=needed_disk, now=now, strategy=strategy, spread_by=spread_by
    )
    slotted = tuple(v.node for v in verdicts if v.reason not in (NOT_WORKER_SERVICE, SLOT_FULL, DISK, SPREAD_LABEL_MISSING))
    chosen = next((v.node for v in verdicts if v.chosen), None)
    return PlacementDecision(chosen, reason, slotted)


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
    now: datetime | None = None,
    shortfall: dict | None = None,
) -> ReplicaInfo | None:
    """The replica to evict to make room, or None when nothing may go.

    Eligible: loaded, zero in-flight, on a healthy node, on one of ``node_ids`` (the nodes
    where room helps; None = any), not of ``exclude_model`` (the model being placed), and its
    model keeps at least its ``floor`` of ready replicas afterwards. ``replicas`` must list
    every ready replica of the models involved (not only those on ``node_ids``) so that the
    floor is counted fleet-wide.

    Without ``now``: least recently used first (never used counts as oldest), then the highest
    replica index, then the id for a stable answer. With ``now`` the choice is size-aware: a
    replica whose VRAM alone covers its node's ``shortfall`` (node id -> bytes missing; absent =
    unknown) comes first, so one eviction makes room instead of several; among those (or among
    all when none covers it) the highest ``idle_seconds * freed_bytes`` (a replica of unknown
    size counts as 1 byte), then the LRU order above as tie-break.
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

    def lru(r):
        return (r.last_used or oldest, -r.replica_index, str(r.replica_id))

    if now is None:
        return min(eligible, key=lru)
    shortfall = shortfall or {}
    covering = [r for r in eligible if r.node_id in shortfall and r.vram >= shortfall[r.node_id] > 0]
    pool = covering or eligible
    return min(pool, key=lambda r: (-eviction_score(r, now), *lru(r)))


def eviction_score(replica: ReplicaInfo, now: datetime) -> float:
    """``idle_seconds * freed_bytes``: the longer idle and the bigger, the better to evict
    (never used: idle since the epoch; unknown size: 1 byte)."""
    since = replica.last_used or datetime(1970, 1, 1, tzinfo=UTC)
    idle = max(0.0, (now - since).total_seconds())
    return idle * max(1, replica.vram)


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
