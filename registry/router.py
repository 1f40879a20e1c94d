"""Route requests to replicas, and load models on demand.

Two entry points, both safe to call from any number of web and qcluster processes at once:

* :func:`route` (a frontend, per request): warm pick + lease in one short transaction, a
  Health probe outside it (cached 30 s in ``NodeModel.last_probe_at``), and when no replica is
  loaded, a durable :class:`~registry.models.LoadJob` that one runner executes while every caller
  waits on its row (or gets the job back after its wait budget, which the API turns into a 202).
* :func:`schedule_and_load` (a load job runner, or the reconciler): place one new replica,
  insert its ``loading`` row before any network call, reserve VRAM, start the backend on the
  worker, ``LoadModel``, then record the outcome with a conditional update.

The order is always: claim in the database (short transaction), network outside any
transaction or lock, record the outcome conditionally. Failures are typed (:class:`RouterError`
subclasses with a stable ``code``) so the API and the reconciler can tell them apart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.credentials import backend_token, worker_command_token
from proto import client, codec

from . import operations, placement, rules
from .models import Lease, LoadFailure, LoadJob, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel

logger = logging.getLogger(__name__)

# Bounded retries. Each is a loop over fresh database reads, never a sleep-and-hope.
WARM_ATTEMPTS = 3  # unreachable replicas removed per route call before falling back to a load
MAX_EVICTIONS = 3  # replicas evicted for one load before "all replicas busy"
PLACEMENT_RACES = 5  # lost index/VRAM races (another loader won) before giving up
POLL_INTERVAL = 0.1  # seconds between reads of a load job a caller waits on


def _setting(name: str, default):
    return getattr(settings, name, default)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else timezone.now()


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
# route()
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteResult:
    """Either a ``lease`` on a loaded replica (``node_name`` and ``model_identity`` set), or the
    ``load_job`` still loading the model after the caller's wait budget (answer 202 +
    Retry-After).

    ``model_identity``: what the frontend must send as ``ModelIdentity`` in its requests to the
    replica (see :func:`model_identity`); empty means "send none" (the backend skips the check).
    """

    lease: Lease | None = None
    load_job: LoadJob | None = None
    node_name: str = ""
    model_identity: str = ""

    @property
    def ready(self) -> bool:
        return self.lease is not None


def route(
    model_name: str,
    *,
    backend_type: str | None = None,
    opts_blob: bytes | None = None,
    wait: float | None = None,
    lease_ttl: float | None = None,
    now: datetime | None = None,
) -> RouteResult:
    """Find (or load) a replica of ``model_name`` and lease it for one request.

    1. Candidates from the model's node selector (none = every schedulable node); a selector
       matching no healthy node raises :class:`NoMatchingNodes`.
    2. Options given are stored as the model's load info (validated first:
       ``codec.InvalidModelOptions``).
    3. Warm path: warm pick + lease (one transaction), then a Health probe outside it unless
       the row was confirmed in the last 30 s. BUSY counts as alive; UNREACHABLE releases the
       lease, removes the row and tries the next replica (bounded).
    4. Cold path: claim or attach to the model's load job; the creator enqueues it; every
       caller polls the job row until ``wait`` seconds pass. Success -> warm pick again;
       failure -> the job's typed error; still running -> ``RouteResult(load_job=...)``.

    The caller must release the lease (``Lease.objects.release``) when its request is done;
    an unreleased lease expires after ``lease_ttl`` seconds. Call it outside any transaction:
    its claims must commit at once for other frontends to see them (a caller holding an open
    transaction would make every other caller of the model wait on its load-job insert).
    """
    if not model_name or not model_name.strip():
        raise ValueError("model name must not be empty")
    wait = float(_setting("ROUTE_WAIT_SECONDS", 30.0) if wait is None else wait)
    lease_ttl = float(_setting("LEASE_TTL_SECONDS", 600) if lease_ttl is None else lease_ttl)

    config = ModelSchedulingConfig.objects.filter(model_name=model_name).values("node_selector").first()
    selector = (config or {}).get("node_selector") or {}
    node_ids = None
    if selector:
        node_ids = list(Node.objects.candidates(selector).values_list("pk", flat=True))
        if not node_ids:
            raise NoMatchingNodes(f"no healthy backend node matches the node selector of {model_name!r}: {selector}")

    if opts_blob is not None:
        opts_blob = bytes(opts_blob)
        codec.options_from_blob(opts_blob)  # refuse garbage before storing it
        if backend_type is None:  # options alone keep the backend type already stored
            stored = ModelLoadInfo.objects.filter(model_name=model_name).values_list("backend_type", flat=True)
            backend_type = stored.first() or ""
        ModelLoadInfo.objects.upsert(model_name, backend_type, opts_blob, now=now)

    result = _warm(model_name, node_ids, lease_ttl, now)
    if result is not None:
        return result

    if node_ids is None and not Node.objects.candidates().exists():
        raise NoMatchingNodes("no healthy backend node that answers the worker gRPC service is registered")
    if opts_blob is None and not _has_load_info(model_name):
        raise NoLoadInfo(f"model {model_name!r} has no load info; send backend_type and model options")
    return _cold(model_name, node_ids, backend_type, opts_blob, wait, lease_ttl, now)


def _has_load_info(model_name: str) -> bool:
    try:
        ModelLoadInfo.objects.for_model(model_name)
    except ModelLoadInfo.DoesNotExist:
        return False
    return True


def _warm(model_name: str, node_ids, lease_ttl: float, now: datetime | None) -> RouteResult | None:
    """Lease a live replica, removing unreachable ones on the way; None when none is left."""
    cache = timedelta(seconds=float(_setting("ROUTE_PROBE_CACHE_SECONDS", 30.0)))
    for _attempt in range(WARM_ATTEMPTS):
        lease = Lease.objects.pick_and_grant(model_name, ttl=lease_ttl, node_ids=node_ids, now=now)
        if lease is None:
            return None
        replica = lease.replica
        checked_at = _now(now)
        if _recently_confirmed(replica, checked_at, cache):
            return _leased(lease)
        outcome = _probe(replica.address, replica.node_id)
        if outcome is client.Probe.ALIVE:
            NodeModel.objects.record_probe_ok(replica.pk, now=checked_at)
            return _leased(lease)
        if outcome is client.Probe.BUSY:
            # Single-threaded backends cannot answer Health while they generate: it is alive.
            return _leased(lease)
        logger.warning(
            "replica %s of %s at %s is unreachable; removing it and re-routing",
            replica.replica_index,
            model_name,
            replica.address or "(no address)",
        )
        Lease.objects.release(lease.pk, now=now)
        NodeModel.objects.remove_replica(replica.node_id, replica.model_name, replica.replica_index)
        if replica.address:
            client.close_channel(replica.address)
    return None


def _recently_confirmed(replica: NodeModel, checked_at: datetime, cache: timedelta) -> bool:
    """Whether the replica may be routed to without a Health probe: confirmed within ``cache``
    AND its node heartbeated within two heartbeat intervals. A worker that died stops
    heartbeating at once, so its replicas lose the cache long before the node is reaped."""
    if replica.last_probe_at is None or checked_at - replica.last_probe_at >= cache:
        return False
    heartbeat = getattr(replica, "node_last_heartbeat", None)
    fresh_for = timedelta(seconds=2 * float(settings.HEARTBEAT_INTERVAL))
    return heartbeat is not None and checked_at - heartbeat < fresh_for


def _probe(address: str, node_id) -> client.Probe:
    """Health with the node's backend token (the data-plane credential, never the fleet's)."""
    if not address:
        return client.Probe.UNREACHABLE
    return client.probe(address, token=backend_token(node_id), timeout=_setting("GRPC_HEALTH_TIMEOUT", None)).outcome


def _leased(lease: Lease) -> RouteResult:
    return RouteResult(lease=lease, node_name=_node_name(lease.node_id), model_identity=model_identity(lease.replica))


def model_identity(replica: NodeModel) -> str:
    """The ``Model`` of the ModelOptions the replica's backend was loaded with.

    LocalAI backends compare ``ModelIdentity`` of every request (PredictOptions field 54 and
    its namesakes) with the ``Model`` of the LoadModel they served: a mismatch is NOT_FOUND
    "model identity mismatch" (a request that reached a port now serving another model), and
    an empty identity skips the check. The router sends the stored blob to ``LoadModel``
    untouched and never fills ``Model`` itself, so the identity is the ``Model`` of the
    replica row's per-replica blob (written with the load, or by the frontend that reported
    the replica); read from the row the warm pick already fetched, so no query. Only a row
    without a per-replica blob (older rows; the best-effort write failed) falls back to the
    model's load info (one query). A blob that does not parse gives "" (no check)."""
    blob = replica.model_opts_blob
    if blob is None:
        blob = (
            ModelLoadInfo.objects.filter(model_name=replica.model_name)
            .values_list("model_opts_blob", flat=True)
            .first()
        )
    if blob is None:
        return ""
    try:
        return codec.options_from_blob(blob).Model
    except codec.InvalidModelOptions:
        return ""


# node id -> (name, monotonic expiry). Saves a query per routed request; a node keeps its name
# for its id (the name is the re-registration key), so the entry only goes stale if an operator
# renames a node in the admin, and then for at most NODE_NAME_CACHE_SECONDS.
_node_names: dict = {}
NODE_NAME_CACHE_SECONDS = 60.0


def _node_name(node_id) -> str:
    cached = _node_names.get(node_id)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    name = Node.objects.filter(pk=node_id).values_list("name", flat=True).first() or ""
    if name:
        if len(_node_names) > 10_000:
            _node_names.clear()
        _node_names[node_id] = (name, time.monotonic() + NODE_NAME_CACHE_SECONDS)
    return name


def _cold(model_name, node_ids, backend_type, opts_blob, wait, lease_ttl, now) -> RouteResult:
    """Claim or attach to the model's load job and wait on it (at most ``wait`` seconds)."""
    from . import tasks  # tasks imports this module

    deadline = time.monotonic() + wait
    for _round in range(2):
        job, created = LoadJob.objects.claim_or_attach(
            model_name, backend_type=backend_type or "", opts_blob=opts_blob, candidate_node_ids=node_ids, now=now
        )
        if created:
            tasks.enqueue_load_job(job.pk)
        job = _wait_for(job.pk, deadline)
        if job.state == LoadJob.State.FAILED:
            raise error_from_code(job.error_code, job.error_message)
        if job.state != LoadJob.State.SUCCEEDED:
            return RouteResult(load_job=job)
        result = _warm(model_name, node_ids, lease_ttl, now)
        if result is not None:
            return result
        # The new replica vanished before we could lease it (removed, or its node went away):
        # one more round, which starts a new job unless another caller already did.
    raise LoadFailed(f"replicas of {model_name!r} disappeared right after loading")


def _wait_for(job_id, deadline: float) -> LoadJob:
    """Poll the job row until it finishes or the deadline passes; returns the last read."""
    while True:
        job = LoadJob.objects.get(pk=job_id)
        remaining = deadline - time.monotonic()
        if not job.is_active or remaining <= 0:
            return job
        time.sleep(min(POLL_INTERVAL, remaining))


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

    Placement comes from one snapshot query (``placement.choose_node``). The replica row is
    inserted as ``loading`` before any network call: the unique ``(node, model, index)``
    constraint stops a duplicate, and a lost race re-plans. VRAM is reserved in the database
    (admission), the worker starts the backend, ``LoadModel`` gets the stored bytes, and only
    then does a conditional update mark the row ``loaded``; both load-info copies are written
    best effort. Any failure releases the reservation, deletes the ``loading`` row, stops the
    backend (best effort), backs the node off for this model and raises :class:`LoadFailed`.
    ``on_replica(row)`` is called once the ``loading`` row exists (a load job records it so a
    takeover can clean it up).

    If no node has a free slot: :class:`CapacityExhausted`. If slots exist but not the VRAM:
    evict the least recently used idle replica (never below its model's floor) and re-plan, a
    few times; nothing evictable: :class:`AllReplicasBusy` (also after evicting a replica of
    unknown size, whose freed VRAM only the node's next heartbeat shows). No candidates:
    :class:`NoMatchingNodes`. Never holds a transaction or lock across a gRPC call.
    """
    if not model_name or not model_name.strip():
        raise ValueError("model name must not be empty")
    if opts_blob is None:
        try:
            info = ModelLoadInfo.objects.for_model(model_name)
        except ModelLoadInfo.DoesNotExist:
            raise NoLoadInfo(f"model {model_name!r} has no load info") from None
        opts_blob = info.model_opts_blob
        backend_type = backend_type or info.backend_type
    opts_blob = bytes(opts_blob)
    backend_type = backend_type or ""
    needed = _estimate_vram(model_name, opts_blob)

    config = ModelSchedulingConfig.objects.filter(model_name=model_name).values("node_selector", "placement").first()
    selector = (config or {}).get("node_selector") or {}
    strategy = (config or {}).get("placement") or placement.SPREAD

    evictions = races = 0
    while True:
        plan = _snapshot(model_name, selector, candidate_node_ids)
        decision = placement.choose_node(plan.candidates, needed_vram=needed, now=_now(now), strategy=strategy)
        if decision.node is None:
            if decision.reason == placement.NO_CANDIDATES:
                raise NoMatchingNodes(f"no healthy backend node is a candidate for {model_name!r}")
            if decision.reason == placement.NO_WORKER_SERVICE:
                raise NoMatchingNodes(f"no candidate node for {model_name!r} answers the worker gRPC service")
            if decision.reason == placement.NO_FREE_SLOT:
                raise CapacityExhausted(f"every candidate node holds its maximum replicas of {model_name!r}")
            victim = None if evictions >= MAX_EVICTIONS else _evict_one(model_name, decision.slotted, now)
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
        row = _claim_row(model_name, decision.node, backend_type, needed, now)
        if row is None:
            races += 1
            if races >= PLACEMENT_RACES:
                raise CapacityExhausted(f"lost {races} placement races for {model_name!r}; try again")
            continue
        if on_replica is not None:
            on_replica(row)
        return _load(row, plan.addresses[row.node_id], backend_type, opts_blob, now)


def _estimate_vram(model_name: str, opts_blob: bytes) -> int:
    try:
        return codec.estimate_vram_bytes(opts_blob)
    except codec.InvalidModelOptions:
        logger.warning("stored options of %s do not parse; placing without a VRAM estimate", model_name)
        return 0


def _snapshot(model_name: str, selector, candidate_node_ids) -> _Plan:
    """The candidates for one model, from one query."""
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
        )
    )
    candidates, addresses = [], {}
    for row in rows:
        candidates.append(
            placement.NodeCandidate(
                node_id=row["pk"],
                name=row["name"],
                slots=row["max_replicas_per_model"],
                model_rows=row["model_rows"],
                free_vram=row["free_vram_bytes"],
                in_flight_total=row["in_flight_total"] or 0,
                replica_count=row["replica_count"] or 0,
                failure_backoff_until=row["failure_backoff_until"],
                worker_api=row["worker_api"],
            )
        )
        addresses[row["pk"]] = row["address"]
    return _Plan(candidates, addresses)


def _claim_row(
    model_name: str, candidate: placement.NodeCandidate, backend_type: str, needed: int, now
) -> NodeModel | None:
    """Insert the ``loading`` row on the lowest free index and reserve its VRAM. None: another
    loader took the index or the VRAM first (the caller re-plans)."""
    index = NodeModel.objects.next_free_index(
        Node(pk=candidate.node_id, max_replicas_per_model=candidate.slots), model_name
    )
    if index is None:
        return None
    try:
        with transaction.atomic():
            row = NodeModel.objects.create(
                node_id=candidate.node_id,
                model_name=model_name,
                replica_index=index,
                state=NodeModel.State.LOADING,
                backend_type=backend_type,
                reserved_vram=needed,
                last_used=_now(now),
                state_changed_at=_now(now),
            )
    except IntegrityError:
        return None
    if not Node.objects.reserve_vram(candidate.node_id, needed):
        NodeModel.objects.filter(pk=row.pk, state=NodeModel.State.LOADING).delete()
        return None
    return row


def _load(row: NodeModel, worker_address: str, backend_type: str, opts_blob: bytes, now) -> NodeModel:
    """The network half of a load, then the conditional ``loading -> loaded``."""
    node_id = str(row.node_id)
    try:
        response = client.start_backend(
            worker_address,
            row.model_name,
            backend_type,
            row.replica_index,
            node_id=node_id,
            token=worker_command_token(node_id),
        )
        address = response.address
        if response.reused and _holds_model(address, node_id, opts_blob):
            logger.info(
                "adopted the running backend of %s replica %d on node %s", row.model_name, row.replica_index, node_id
            )
        else:
            if response.reused:
                logger.info(
                    "the reused backend of %s replica %d on node %s does not prove it holds the model: loading it",
                    row.model_name,
                    row.replica_index,
                    node_id,
                )
            success, message = client.load_model(
                address, opts_blob, token=backend_token(node_id), timeout=_setting("GRPC_LOAD_TIMEOUT", None)
            )
            if not success:
                raise LoadFailed(
                    f"LoadModel of {row.model_name!r} on node {node_id} failed: {message or 'success=false'}"
                )
    except client.GrpcCallError as exc:
        # A StartBackend that never got a connection never reached the worker: nothing to stop
        # (and asking would wait for the same silent connection again).
        _abandon(row, worker_address if not isinstance(exc, client.NotConnected) else "", str(exc), now)
        raise LoadFailed(f"loading {row.model_name!r} on node {node_id} failed: {exc}") from exc
    except BaseException as exc:
        _abandon(row, worker_address, str(exc), now)
        raise

    if not NodeModel.objects.mark_loaded(row.pk, address=address, now=now):
        # The row was removed while we loaded (node restarted/offline, or this job was taken
        # over). Its reservation went with it; the backend is not ours to stop any more.
        raise LoadFailed(f"replica row of {row.model_name!r} on node {node_id} was removed during the load")
    _record_load_info(row, backend_type, opts_blob, now)
    try:
        LoadFailure.objects.clear(row.model_name, row.node_id)
    except Exception:  # best effort: a stale backoff only costs a less preferred placement
        logger.warning("could not clear load failures of %s on %s", row.model_name, node_id, exc_info=True)
    row.refresh_from_db()
    logger.info("loaded %s replica %d on node %s at %s", row.model_name, row.replica_index, node_id, row.address)
    return row


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
    deadline = time.monotonic() + float(_setting("GRPC_LOAD_TIMEOUT", 120))
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


def _abandon(row: NodeModel, worker_address: str, error: str, now) -> None:
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


def _evict_one(model_name: str, slotted, now) -> placement.ReplicaInfo | None:
    """Evict the LRU idle replica on one of the ``slotted`` nodes to make VRAM room for
    ``model_name``; returns it, or None when nothing may go.

    Reads every ready replica of the models present on those nodes (so floors are counted
    fleet-wide) and their scheduling floors, lets ``placement.choose_victim`` decide, and
    evicts it (``operations.evict_replica``: row first, conditional on zero in-flight, then its
    VRAM credited back and its backend stopped).
    """
    node_ids = [candidate.node_id for candidate in slotted]
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
        victim = placement.choose_victim(replicas, node_ids=node_ids, exclude_model=model_name)
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
