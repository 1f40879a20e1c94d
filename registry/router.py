"""Route requests to replicas.

:func:`route` (a frontend, per request) is safe to call from any number of web and qcluster
processes at once: warm pick + lease in one short transaction, a Health probe outside it (cached
30 s in ``NodeModel.last_probe_at``), and when no replica is loaded, a durable
:class:`~registry.models.LoadJob` that one runner executes while every caller waits on its row
(or gets the job back after its wait budget, which the API turns into a 202).

Loading itself lives in :mod:`registry.loading`; :func:`schedule_and_load` and the typed
failures (:class:`RouterError` subclasses with a stable ``code``) are re-exported here, so
callers keep one entry point (``registry.router``). Load jobs are enqueued through
:mod:`registry.jobs` (by dotted path): this module never imports ``registry.tasks``, which
imports it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings

from core.credentials import backend_token
from proto import client, codec

from . import affinity, jobs
from .clock import resolve_now
from .loading import (
    ERRORS,
    AllReplicasBusy,
    CapacityExhausted,
    LoadFailed,
    NoLoadInfo,
    NoMatchingNodes,
    RouterError,
    error_from_code,
    schedule_and_load,
)
from .models import Lease, LoadJob, ModelLoadInfo, ModelSchedulingConfig, Node, NodeModel

__all__ = [
    "ERRORS",
    "AllReplicasBusy",
    "CapacityExhausted",
    "LoadFailed",
    "NoLoadInfo",
    "NoMatchingNodes",
    "RouteResult",
    "RouterError",
    "error_from_code",
    "model_identity",
    "route",
    "route_warm",
    "schedule_and_load",
]

logger = logging.getLogger(__name__)

# Bounded retries. Each is a loop over fresh database reads, never a sleep-and-hope.
WARM_ATTEMPTS = 3  # unreachable replicas removed per route call before falling back to a load
POLL_INTERVAL = 0.1  # seconds between reads of a load job a caller waits on


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
    affinity_key: str | None = None,
    now: datetime | None = None,
    warm_tried: bool = False,
) -> RouteResult:
    """Find (or load) a replica of ``model_name`` and lease it for one request.

    1. Candidates from the model's node selector (none = every schedulable node); a selector
       matching no healthy node raises :class:`NoMatchingNodes`. Without options the warm
       pick (3) runs first, evaluating the selector in its own statement (on PostgreSQL one
       round trip for the whole warm route); the selector is read here only when it missed.
    2. Options given are stored as the model's load info (validated first unless they are
       ``codec.CheckedOptions`` already: ``codec.InvalidModelOptions``).
    3. Warm path: warm pick + lease (``Lease.objects.pick_and_grant``: one statement on
       PostgreSQL), then a Health probe outside it unless the row was confirmed in the last
       30 s. BUSY counts as alive; UNREACHABLE releases the lease, removes the row and tries
       the next replica (bounded).
    4. Cold path: claim or attach to the model's load job; the creator enqueues it; every
       caller polls the job row until ``wait`` seconds pass. Success -> warm pick again;
       failure -> the job's typed error; still running -> ``RouteResult(load_job=...)``.

    ``affinity_key`` (a session id, a prompt-prefix hash; at most
    ``affinity.MAX_KEY_LENGTH`` characters, no control characters, "" = none): the warm pick
    prefers the replica the key maps to by rendezvous hashing, while that replica's in-flight
    stays under the bounded-load cap (``ROUTE_AFFINITY_LOAD_FACTOR`` x the model's average);
    otherwise the key's next replica under the cap (see :mod:`registry.affinity`). A bad key
    raises ValueError before anything is written.

    The caller must release the lease (``Lease.objects.release``) when its request is done;
    an unreleased lease expires after ``lease_ttl`` seconds. Call it outside any transaction:
    its claims must commit at once for other frontends to see them (a caller holding an open
    transaction would make every other caller of the model wait on its load-job insert).

    ``warm_tried``: :func:`route_warm` already ran for this request with the same model and
    key and found nothing (the warm route's lean path, ``registry/api/lean_route.py``, hands
    the request on): the warm pick of step 3 is not repeated, so a request makes the same
    statements, probes and removals whichever path answers it.
    """
    if not model_name or not model_name.strip():
        raise ValueError("model name must not be empty")
    affinity_key = affinity.validate_key(affinity_key)
    wait = float(settings.ROUTE_WAIT_SECONDS if wait is None else wait)
    lease_ttl = float(settings.LEASE_TTL_SECONDS if lease_ttl is None else lease_ttl)

    if opts_blob is None and not warm_tried:
        # The frequent case, a warm route without options: one statement picks, counts and
        # leases a replica on a node the model's selector matches (read by the statement).
        result = _warm(model_name, _BY_SELECTOR, lease_ttl, now, affinity_key)
        if result is not None:
            return result

    config = ModelSchedulingConfig.objects.filter(model_name=model_name).values("node_selector").first()
    selector = (config or {}).get("node_selector") or {}
    node_ids = None
    if selector:
        node_ids = list(Node.objects.candidates(selector).values_list("pk", flat=True))
        if not node_ids:
            raise NoMatchingNodes(f"no healthy backend node matches the node selector of {model_name!r}: {selector}")

    if opts_blob is not None:
        # Refuse garbage before storing it; the API's serializer already checked (and says so
        # by handing over CheckedOptions), so those bytes are not decoded a second time.
        opts_blob = bytes(codec.check_options(opts_blob))
        if backend_type is None:  # options alone keep the backend type already stored
            stored = ModelLoadInfo.objects.filter(model_name=model_name).values_list("backend_type", flat=True)
            backend_type = stored.first() or ""
        ModelLoadInfo.objects.upsert(model_name, backend_type, opts_blob, now=now)

        # (Without options the warm pick above already ran, over the same candidates.)
        result = _warm(model_name, node_ids, lease_ttl, now, affinity_key)
        if result is not None:
            return result

    if node_ids is None and not Node.objects.candidates().exists():
        raise NoMatchingNodes("no healthy backend node that answers the worker gRPC service is registered")
    if opts_blob is None and not _has_load_info(model_name):
        raise NoLoadInfo(f"model {model_name!r} has no load info; send backend_type and model options")
    return _cold(model_name, node_ids, backend_type, opts_blob, wait, lease_ttl, now, affinity_key)


def route_warm(model_name: str, *, affinity_key: str | None = None) -> RouteResult | None:
    """The warm part of :func:`route` without options (its step 3 with the default lease TTL),
    or None when no loaded replica could be leased: then ``route(..., warm_tried=True)`` does
    the rest (selector, load info, cold load) without picking a second time."""
    if not model_name or not model_name.strip():
        raise ValueError("model name must not be empty")
    affinity_key = affinity.validate_key(affinity_key)
    return _warm(model_name, _BY_SELECTOR, float(settings.LEASE_TTL_SECONDS), None, affinity_key)


def _has_load_info(model_name: str) -> bool:
    try:
        ModelLoadInfo.objects.for_model(model_name)
    except ModelLoadInfo.DoesNotExist:
        return False
    return True


# ``_warm(node_ids=_BY_SELECTOR)``: candidates are the nodes the model's stored selector matches,
# evaluated by the pick statement itself (no read of the scheduling config beforehand).
_BY_SELECTOR = object()


def _warm(
    model_name: str, node_ids, lease_ttl: float, now: datetime | None, affinity_key: str | None = None
) -> RouteResult | None:
    """Lease a live replica, removing unreachable ones on the way; None when none is left.
    ``node_ids``: None (every healthy node), a list, or ``_BY_SELECTOR``."""
    cache = timedelta(seconds=float(settings.ROUTE_PROBE_CACHE_SECONDS))
    by_selector = node_ids is _BY_SELECTOR
    if by_selector:
        node_ids = None
    for _attempt in range(WARM_ATTEMPTS):
        lease = Lease.objects.pick_and_grant(
            model_name, ttl=lease_ttl, node_ids=node_ids, by_selector=by_selector, affinity_key=affinity_key, now=now
        )
        if lease is None:
            return None
        replica = lease.replica
        checked_at = resolve_now(now)
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
    return client.probe(address, token=backend_token(node_id), timeout=settings.GRPC_HEALTH_TIMEOUT).outcome


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


def _cold(model_name, node_ids, backend_type, opts_blob, wait, lease_ttl, now, affinity_key=None) -> RouteResult:
    """Claim or attach to the model's load job and wait on it (at most ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    # Demand at zero, remembered so load-aware autoscaling sizes the wake-up (a no-op for a
    # model without a load target).
    ModelSchedulingConfig.objects.record_waiting(model_name)
    for _round in range(2):
        job, created = LoadJob.objects.claim_or_attach(
            model_name, backend_type=backend_type or "", opts_blob=opts_blob, candidate_node_ids=node_ids, now=now
        )
        if created:
            jobs.enqueue_load_job(job.pk)
        job = _wait_for(job.pk, deadline)
        if job.state == LoadJob.State.FAILED:
            raise error_from_code(job.error_code, job.error_message)
        if job.state != LoadJob.State.SUCCEEDED:
            return RouteResult(load_job=job)
        result = _warm(model_name, node_ids, lease_ttl, now, affinity_key)
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
