"""Load models on demand: place one new replica, claim its ``loading`` row with its VRAM,
start the backend on the worker, ``LoadModel``, record the outcome; evict an idle replica when
VRAM is short. Also the typed failures of routing and loading (:class:`RouterError`).

:func:`schedule_and_load` is called by a load job runner (``registry.tasks.run_load_job``) or
by the reconciler (through ``registry.router``, which re-exports it). The order is always: claim
in the database (one manager verb, a short transaction), network outside any transaction or
lock, record the outcome conditionally. Failures are typed (:class:`RouterError` subclasses with
a stable ``code``) so the API and the reconciler can tell them apart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings

from core.credentials import backend_token, worker_command_token
from proto import client, codec

from . import operations, placement, rules
from .clock import resolve_now
from .models import LoadFailure, ModelLoadInfo, ModelRevision, ModelSchedulingConfig, Node, NodeLabel, NodeModel

logger = logging.getLogger(__name__)

# Bounded retries. Each is a loop over fresh database reads, never a sleep-and-hope.
MAX_EVICTIONS = 3  # replicas evicted for one load before "all replicas busy"
PLACEMENT_RACES = 5  # lost index/VRAM races (another loader won) before giving up


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RouterError(Exception):
    """A routing or scheduling outcome the caller can act on. ``code`` is stable (API problem
    ``code``, load job ``error_code``); ``status`` is the HTTP status the API answers with."""

    code = "router_error"
    status = 503
    title = "Routing failed"

    def __init__(self, message: str = "", **details) -> None:
        self.message = message or self.title
        self.details = details
        super().__init__(self.message)


class NoMatchingNodes(RouterError):
    """No healthy backend node matches the model's node selector (or none is healthy at all)."""

    code = "no_matching_nodes"
    status = 503
    title = "No healthy node matches the model's node selector"


class CapacityExhausted(RouterError):
    """Every candidate node already holds its maximum replicas of this model."""

    code = "capacity_exhausted"
    status = 503
    title = "No replica slot is free for this model"


class AllReplicasBusy(RouterError):
    """Nodes have slots but not the VRAM, and no idle replica may be evicted to make room."""

    code = "all_replicas_busy"
    status = 503
    title = "All replicas are busy; nothing can be evicted"


class NoLoadInfo(RouterError):
    """The model has never been loaded with options and none were given."""

    code = "no_load_info"
    status = 409
    title = "No load info for this model; send backend_type and model options"


class LoadFailed(RouterError):
    """Starting the backend or LoadModel failed (the node is backed off for this model)."""

    code = "load_failed"
    status = 503
    title = "Loading the model failed"


ERRORS = {cls.code: cls for cls in (NoMatchingNodes, CapacityExhausted, AllReplicasBusy, NoLoadInfo, LoadFailed)}


def error_from_code(code: str, message: str = "") -> RouterError:
    """Rebuild the typed error a load job recorded (unknown codes become ``LoadFailed``)."""
    return ERRORS.get(code, LoadFailed)(message)


# --------------------------------------------------------------------------------------------
# schedule_and_load()
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One placement snapshot: the candidates and the worker addresses of their nodes."""

    candidates: list[placement.NodeCandidate]
    addresses: dict


def schedule_and_load(
    model_name: str,
    candidate_node_ids=None,
    *,
    backend_type: str | None = None,
    opts_blob: bytes | None = None,
    now: datetime | None = None,
    on_replica=None,
) -> NodeModel:
    """Place, start and load one new replica of ``model_name``; returns its ``loaded`` row.

    Without ``opts_blob`` the recipe comes from ``ModelLoadInfo.objects.for_model`` (how the
    reconciler calls it); none -> :class:`NoLoadInfo`. Candidates are the model's selector
    matches, restricted to ``candidate_node_ids`` when given.

    Placement comes from one snapshot query (``placement.choose_node``). Before any network
    call, ``NodeModel.objects.claim_loading`` inserts the replica row as ``loading`` and
    reserves its VRAM in the database (admission), both or neither: the unique ``(node, model,
    index)`` constraint stops a duplicate, and a lost race re-plans. The worker starts the backend, ``LoadModel`` gets the stored bytes, and only
    then does a conditional update mark the row ``loaded``; both load-info copies are written
    best effort. Any failure releases the reservation, deletes the ``loading`` row, stops the
    backend (best effort), backs the node off for this model and raises :class:`LoadFailed`.
    ``on_replica(row)`` is called once the ``loading`` row exists (a load job records it so a
    takeover can clean it up).

    The model's scheduling config adds ``disk_bytes`` (nodes reporting less free disk are
    skipped; none left: :class:`CapacityExhausted`) and ``spread_by`` (topology spread); each
    node's ``vram_budget`` caps the VRAM placement sees (``placement.explain``).

    If no node has a free slot: :class:`CapacityExhausted`. If slots exist but not the VRAM:
    evict the least recently used idle replica (never below its model's floor) and re-plan, a
    few times; nothing evictable: :class:`AllReplicasBusy` (also after evicting a replica of
    unknown size, whose freed VRAM only the node's next heartbeat shows). No candidates:
    :class:`NoMatchingNodes`. Never holds a transaction or lock across a gRPC call.
    """
    if not model_name or not model_name.strip():
        raise ValueError("model name must not be empty")
    # Read before the recipe: a change in between stamps the older number, and the rollout
    # replaces the replica once more, rather than never.
    revision = ModelRevision.objects.head_numbers([model_name]).get(model_name)
    if opts_blob is None:
        try:
            info = ModelLoadInfo.objects.for_model(model_name)
        except ModelLoadInfo.DoesNotExist:
            raise NoLoadInfo(f"model {model_name!r} has no load info") from None
        opts_blob = info.model_opts_blob
        backend_type = backend_type or info.backend_type
    opts_blob = bytes(opts_blob)
    backend_type = backend_type or ""
    needed = estimate_vram(model_name, opts_blob)

    rules_ = placement_rules(model_name)

    evictions = races = 0
    while True:
        plan = _snapshot(model_name, rules_.selector, candidate_node_ids, rules_.spread_by)
        decision = placement.choose_node(
            plan.candidates,
            needed_vram=needed,
            needed_disk=rules_.disk_bytes,
            now=resolve_now(now),
            strategy=rules_.strategy,
            spread_by=rules_.spread_by,
        )
        if decision.node is None:
            if decision.reason == placement.NO_CANDIDATES:
                raise NoMatchingNodes(f"no healthy backend node is a candidate for {model_name!r}")
            if decision.reason == placement.NO_WORKER_SERVICE:
                raise NoMatchingNodes(f"no candidate node for {model_name!r} answers the worker gRPC service")
            if decision.reason == placement.NO_FREE_SLOT:
                raise CapacityExhausted(f"every candidate node holds its maximum replicas of {model_name!r}")
            if decision.reason == placement.NOT_ENOUGH_DISK:
                raise CapacityExhausted(
                    f"no candidate node with a free slot reports {rules_.disk_bytes} bytes of free disk for {model_name!r}"
                )
            victim = None if evictions >= MAX_EVICTIONS else _evict_one(model_name, decision.slotted, now, needed)
            if victim is None:
                raise AllReplicasBusy(
                    f"no candidate node has {needed} bytes of free VRAM for {model_name!r} and no idle replica "
                    "may be evicted"
                )
            evictions += 1
            if victim.vram <= 0:
                # Its size was unknown, so the freed VRAM shows only in the node's next heartbeat;
                # evicting more now would empty the node on a guess.
                raise AllReplicasBusy(
                    f"evicted {victim.model_name!r} replica {victim.replica_index} to make room for {model_name!r}; "
                    "its VRAM counts once the node reports it (next heartbeat): retry then"
                )
            continue
        row = NodeModel.objects.claim_loading(
            decision.node.node_id,
            model_name,
            slots=decision.node.slots,
            backend_type=backend_type,
            reserved_vram=needed,
            revision=revision,
            now=now,
        )
        if row is None:
            races += 1
            if races >= PLACEMENT_RACES:
                raise CapacityExhausted(f"lost {races} placement races for {model_name!r}; try again")
            continue
        if on_replica is not None:
            on_replica(row)
        return _load(row, plan.addresses[row.node_id], backend_type, opts_blob, now)


@dataclass(frozen=True)
class PlacementRules:
    """What a model's scheduling config says about where its replicas go."""

    selector: dict
    strategy: str
    disk_bytes: int
    spread_by: str


def placement_rules(model_name: str) -> PlacementRules:
    """The model's selector, strategy, size on disk and spread label (defaults without config)."""
    config = (
        ModelSchedulingConfig.objects.filter(model_name=model_name)
        .values("node_selector", "placement", "disk_bytes", "spread_by")
        .first()
    ) or {}
    return PlacementRules(
        selector=config.get("node_selector") or {},
        strategy=config.get("placement") or placement.SPREAD,
        disk_bytes=config.get("disk_bytes") or 0,
        spread_by=config.get("spread_by") or "",
    )


def candidate_from_row(row: dict, labels, **per_model) -> placement.NodeCandidate:
    """A ``placement.NodeCandidate`` from a row of ``Node.objects.candidates(...).with_load()``
    annotated with ``free_vram_bytes`` and ``budget_used_bytes`` (both loading paths read
    that shape); ``per_model`` sets the model-specific fields (``model_rows``, backoff)."""
    return placement.NodeCandidate(
        node_id=row["pk"],
        name=row["name"],
        slots=row["max_replicas_per_model"],
        free_vram=row["free_vram_bytes"],
        in_flight_total=row["in_flight_total"] or 0,
        replica_count=row["replica_count"] or 0,
        worker_api=row["worker_api"],
        vram_budget=row["vram_budget"],
        budget_used=int(row["budget_used_bytes"] or 0),
        available_disk=row["available_disk"],
        total_disk=row["total_disk"],
        labels=tuple(labels),
        **per_model,
    )


def node_labels(node_ids, key: str) -> dict:
    """node id -> ``((key, value),)`` for the nodes that carry label ``key`` ("" -> {})."""
    if not key:
        return {}
    rows = NodeLabel.objects.filter(node_id__in=list(node_ids), key=key).values_list("node_id", "value")
    return {node_id: ((key, value),) for node_id, value in rows}


def explain_next_replica(model_name: str, *, now: datetime | None = None) -> list[placement.Verdict]:
    """"Why here / why not there" for a hypothetical next replica of ``model_name``: every
    candidate node (selector matches) with its verdict from ``placement.explain``, computed
    from current state, read-only (the admin's model page shows it)."""
    rules_ = placement_rules(model_name)
    try:
        needed = estimate_vram(model_name, bytes(ModelLoadInfo.objects.for_model(model_name).model_opts_blob))
    except ModelLoadInfo.DoesNotExist:
        needed = 0
    plan = _snapshot(model_name, rules_.selector, None, rules_.spread_by)
    verdicts, _ = placement.explain(
        plan.candidates,
        needed_vram=needed,
        needed_disk=rules_.disk_bytes,
        now=resolve_now(now),
        strategy=rules_.strategy,
        spread_by=rules_.spread_by,
    )
    return verdicts


def estimate_vram(model_name: str, opts_blob: bytes) -> int:
    """The VRAM a load of these options reserves (0 = unknown: every node fits)."""
    try:
        return codec.estimate_vram_bytes(opts_blob)
    except codec.InvalidModelOptions:
        logger.warning("stored options of %s do not parse; placing without a VRAM estimate", model_name)
        return 0


def _snapshot(model_name: str, selector, candidate_node_ids, spread_by: str = "") -> _Plan:
    """The candidates for one model, from one query (two with ``spread_by``: the labels)."""
    rows = (
        Node.objects.candidates(selector, candidate_node_ids)
        .for_placement(model_name)
        .values(
            "pk",
            "name",
            "address",
            "max_replicas_per_model",
            "model_rows",
            "free_vram_bytes",
            "in_flight_total",
            "replica_count",
            "failure_backoff_until",
            "worker_api",
            "vram_budget",
            "budget_used_bytes",
            "available_disk",
            "total_disk",
        )
    )
    rows = list(rows)
    labels = node_labels([row["pk"] for row in rows], spread_by)
    candidates, addresses = [], {}
    for row in rows:
        candidates.append(
            candidate_from_row(
                row,
                labels.get(row["pk"], ()),
                model_rows=row["model_rows"],
                failure_backoff_until=row["failure_backoff_until"],
            )
        )
        addresses[row["pk"]] = row["address"]
    return _Plan(candidates, addresses)


def _load(row: NodeModel, worker_address: str, backend_type: str, opts_blob: bytes, now) -> NodeModel:
    """The network half of a load, then the conditional ``loading -> loaded``."""
    try:
        address = start_and_load(row, worker_address, opts_blob)
    except client.GrpcCallError as exc:
        # A StartBackend that never got a connection never reached the worker: nothing to stop
        # (and asking would wait for the same silent connection again).
        abandon(row, worker_address if not isinstance(exc, client.NotConnected) else "", str(exc), now)
        raise LoadFailed(f"loading {row.model_name!r} on node {row.node_id} failed: {exc}") from exc
    except BaseException as exc:
        abandon(row, worker_address, str(exc), now)
        raise

    if not NodeModel.objects.mark_loaded(row.pk, address=address, now=now):
        # The row was removed while we loaded (node restarted/offline, or this job was taken
        # over). Its reservation went with it; the backend is not ours to stop any more.
        raise LoadFailed(f"replica row of {row.model_name!r} on node {row.node_id} was removed during the load")
    _record_load_info(row, backend_type, opts_blob, now)
    try:
        LoadFailure.objects.clear(row.model_name, row.node_id)
    except Exception:  # best effort: a stale backoff only costs a less preferred placement
        logger.warning("could not clear load failures of %s on %s", row.model_name, row.node_id, exc_info=True)
    row.refresh_from_db()
    logger.info("loaded %s replica %d on node %s at %s", row.model_name, row.replica_index, row.node_id, row.address)
    return row


def start_and_load(row: NodeModel, worker_address: str, opts_blob: bytes) -> str:
    """The network calls of one load, and nothing else (no database: it runs on the
    reconciler's load threads too, ``registry.bulk_loading``): ``StartBackend`` on the node's
    worker for the claimed ``(model, replica_index)``, then ``LoadModel`` with the stored bytes
    unless the worker handed back a reused backend that provably holds the model. Returns the
    backend's address; raises ``client.GrpcCallError`` or :class:`LoadFailed` (success=false).
    The caller records the outcome (``mark_loaded``, or :func:`abandon`)."""
    node_id = str(row.node_id)
    response = client.start_backend(
        worker_address,
        row.model_name,
        row.backend_type,
        row.replica_index,
        node_id=node_id,
        token=worker_command_token(node_id),
    )
    address = response.address
    if not response.reused:
        # A new process listens there: a channel this process cached for an earlier backend
        # at the same address may sit in reconnect backoff (every call failing at once with
        # "connection refused") long after the new one is up.
        client.close_channel(address)
    if response.reused and _holds_model(address, node_id, opts_blob):
        logger.info(
            "adopted the running backend of %s replica %d on node %s", row.model_name, row.replica_index, node_id
        )
        return address
    if response.reused:
        logger.info(
            "the reused backend of %s replica %d on node %s does not prove it holds the model: loading it",
            row.model_name,
            row.replica_index,
            node_id,
        )
    success, message = client.load_model(
        address, opts_blob, token=backend_token(node_id), timeout=settings.GRPC_LOAD_TIMEOUT
    )
    if not success:
        raise LoadFailed(f"LoadModel of {row.model_name!r} on node {node_id} failed: {message or 'success=false'}")
    return address


def _holds_model(address: str, node_id: str, opts_blob: bytes) -> bool:
    """Whether a backend process the worker reused provably holds the model of ``opts_blob``:
    then it is adopted instead of loaded twice. True only on proof; anything else -> False, and
    the caller sends ``LoadModel`` (which, in a LocalAI backend, replaces whatever it held).

    Two cases reach here. The takeover: a load job's runner died mid-``LoadModel``, the backend
    finished loading anyway, and the new runner gets the same process back: adopt it. The
    abandoned start: a runner died after ``StartBackend`` and before ``LoadModel``: the process
    is up and holds nothing. ``Status`` cannot tell them apart (LocalAI's backends answer READY
    whenever idle, loaded or not), so the proof is :func:`proto.client.holds_model`: a cheap
    ``TokenizeString`` carrying ``ModelIdentity`` = the ``Model`` field of the options about to
    be loaded, which a backend refuses before a load (FAILED_PRECONDITION) and for another model
    (NOT_FOUND). A backend without ``TokenizeString`` (UNIMPLEMENTED) is never adopted: loading
    again costs a reload, adopting an empty process would fail every request routed to it.
    A single-threaded backend cannot answer while a load is still running (DEADLINE_EXCEEDED =
    busy, ``None``), so that is polled until the load deadline. Options without a ``Model`` (or
    that do not parse) carry no identity to prove: never adopted."""
    try:
        identity = codec.options_from_blob(opts_blob).Model
    except codec.InvalidModelOptions:
        return False
    if not identity:
        return False
    deadline = time.monotonic() + float(settings.GRPC_LOAD_TIMEOUT)
    while True:
        proven = client.holds_model(address, identity, token=backend_token(node_id))
        if proven is not None:
            return proven
        if time.monotonic() >= deadline:
            return False


def _record_load_info(row: NodeModel, backend_type: str, opts_blob: bytes, now) -> None:
    """Both copies of the recipe, each best effort: a failure here must not fail a load that
    worked (LocalAI's rule)."""
    try:
        NodeModel.objects.set_replica_load_info(row.node_id, row.model_name, row.replica_index, backend_type, opts_blob)
    except Exception:
        logger.warning("could not write the per-replica load info of %s", row.model_name, exc_info=True)
    try:
        ModelLoadInfo.objects.upsert(row.model_name, backend_type, opts_blob, now=now)
    except Exception:
        logger.warning("could not write the per-model load info of %s", row.model_name, exc_info=True)


def abandon(row: NodeModel, worker_address: str, error: str, now) -> None:
    """Undo a failed load: release the VRAM reservation and delete the ``loading`` row (one
    verb); if the row was still ours, stop the backend best effort (also when StartBackend
    itself failed: a timed-out start may have left a process; a row someone else removed may
    mean a takeover now owns that backend); back the node off for this model."""
    logger.warning("load of %s replica %d on node %s failed: %s", row.model_name, row.replica_index, row.node_id, error)
    operations.discard_failed_load(operations.WORKERS, row, address=worker_address)
    try:
        LoadFailure.objects.record(row.model_name, row.node_id, error, now=now)
    except Exception:
        logger.warning("could not record the load failure of %s", row.model_name, exc_info=True)


# --------------------------------------------------------------------------------------------
# Eviction
# --------------------------------------------------------------------------------------------


def _evict_one(model_name: str, slotted, now, needed: int = 0) -> placement.ReplicaInfo | None:
    """Evict an idle replica on one of the ``slotted`` nodes to make VRAM room for
    ``model_name``; returns it, or None when nothing may go. Size-aware
    (``placement.choose_victim`` with ``now`` and each node's shortfall ``needed -
    placeable_vram``): a replica that alone makes the room first, else the highest idle time
    times VRAM freed.

    Reads every ready replica of the models present on those nodes (so floors are counted
    fleet-wide) and their scheduling floors, lets ``placement.choose_victim`` decide, and
    evicts it (``operations.evict_replica``: row first, conditional on zero in-flight, then its
    VRAM credited back and its backend stopped).
    """
    node_ids = [candidate.node_id for candidate in slotted]
    shortfall = {c.node_id: needed - c.placeable_vram for c in slotted if needed > 0}
    present = NodeModel.objects.filter(node_id__in=node_ids).exclude(model_name=model_name).values("model_name")
    rows = list(
        NodeModel.objects.ready()
        .filter(model_name__in=present)
        .values("pk", "node_id", "model_name", "replica_index", "in_flight", "last_used", "reserved_vram")
    )
    if not rows:
        return None
    floors = {
        name: rules.replica_floor(low, high)
        for name, low, high in ModelSchedulingConfig.objects.filter(
            model_name__in={row["model_name"] for row in rows}
        ).values_list("model_name", "min_replicas", "max_replicas")
    }
    replicas = [
        placement.ReplicaInfo(
            replica_id=row["pk"],
            node_id=row["node_id"],
            model_name=row["model_name"],
            replica_index=row["replica_index"],
            in_flight=row["in_flight"],
            last_used=row["last_used"],
            vram=row["reserved_vram"],
            floor=floors.get(row["model_name"], 0),
        )
        for row in rows
    ]
    while True:
        victim = placement.choose_victim(
            replicas, node_ids=node_ids, exclude_model=model_name, now=resolve_now(now), shortfall=shortfall
        )
        if victim is None:
            return None
        if operations.evict_replica(
            operations.WORKERS,
            victim.replica_id,
            node_id=victim.node_id,
            model_name=victim.model_name,
            replica_index=victim.replica_index,
            vram=victim.vram,
        ):
            break
        # It became busy (or went) since the snapshot: take it out of the running and retry.
        replicas = [r for r in replicas if r.replica_id != victim.replica_id]
    logger.info(
        "evicted %s replica %d on node %s to make room for %s",
        victim.model_name,
        victim.replica_index,
        victim.node_id,
        model_name,
    )
    return victim
