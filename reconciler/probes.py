"""The network half of a pass: probing replicas and asking workers what they run.

Calls go out in parallel (``fan_out``: a bounded number of threads), each with a short
deadline, and never inside a database transaction: the threads only talk gRPC, and every
database write happens afterwards on the pass's own thread and connection.

The prober is injectable: anything with ``probe``, ``list_backends``, ``stop_backend`` and
``unload_model`` (the signatures of ``GrpcProber`` below; every call names its node, whose
credential it carries). Tests pass a fake.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from uuid import UUID

from registry.operations import WorkerClient
from registry.placement import serves_worker_api

from .planning import CheckPlan, WorkerBackend

logger = logging.getLogger(__name__)

ALIVE, BUSY, UNREACHABLE = "alive", "busy", "unreachable"


class GrpcProber(WorkerClient):
    """The default prober: ``proto.client`` with the node's own credentials
    (``core.credentials``): Health carries the node's backend token, worker calls (here and in
    ``registry.operations.WorkerClient``, whose ``stop_backend`` it inherits) its worker command
    token; the fleet registration token is never sent."""

    def probe(self, address: str, *, node_id: str, timeout: float | None = None):
        from core.credentials import backend_token
        from proto import client

        return client.probe(address, token=backend_token(node_id), timeout=timeout)

    def list_backends(self, address: str, *, node_id: str, timeout: float | None = None):
        from core.credentials import worker_command_token
        from proto import client

        return client.list_backends(address, node_id=node_id, token=worker_command_token(node_id), timeout=timeout)

    def unload_model(self, address: str, model_name: str, *, node_id: str, timeout: float | None = None):
        from core.credentials import worker_command_token
        from proto import client

        return client.unload_model(
            address, model_name, node_id=node_id, token=worker_command_token(node_id), timeout=timeout
        )


def probe_outcome(result) -> str:
    """``alive``/``busy``/``unreachable`` from a ``ProbeResult``, a ``Probe`` or a string."""
    outcome = getattr(result, "outcome", result)
    return str(getattr(outcome, "value", outcome)).lower()


# BackendProcess.State numbers of proto/worker.proto, for responses that carry enum ints.
_STATE_NAMES = {0: "STATE_UNSPECIFIED", 1: "STARTING", 2: "RUNNING", 3: "EXITED"}


def worker_backends(response) -> tuple[str, list[WorkerBackend]]:
    """``(reported node id, backends)`` from a ``ListBackendsResponse`` (or anything shaped
    like it: ``.node_id`` and ``.backends`` with model_name, replica_index, state, address)."""
    backends = [
        WorkerBackend(
            backend.model_name,
            int(backend.replica_index),
            _state_name(backend.state),
            getattr(backend, "address", ""),
        )
        for backend in getattr(response, "backends", response)
    ]
    return getattr(response, "node_id", "") or "", backends


def _state_name(state) -> str:
    """A backend's state name from the enum's int (protobuf) or any string-like value."""
    return _STATE_NAMES.get(state, str(state)) if isinstance(state, int) else str(state).upper()


# ListBackends failures that show the address does not serve this node's worker service (as
# opposed to a slow or briefly unreachable worker, which changes nothing): grpc.StatusCode names.
_NOT_A_WORKER = {
    "UNIMPLEMENTED": "answers gRPC but not the worker service",
    "UNAVAILABLE": "nothing answers gRPC there",
    "UNAUTHENTICATED": "the worker service refuses this node's command token",
    "PERMISSION_DENIED": "the worker service refuses this node's command token",
    "FAILED_PRECONDITION": "the worker there serves another node",
}


def missing_worker_service(exc: Exception, address: str, *, known_available: bool = True) -> str:
    """Why a failed ``ListBackends`` at ``address`` means the node cannot be placed on, or ""
    when the failure says nothing about that (an unexpected error; a deadline on a node known
    to serve the service, which may just be busy). A node never seen answering that misses
    the deadline is not placed on: a StartBackend there could not do better."""
    code = getattr(getattr(exc, "code", None), "name", "")
    why = _NOT_A_WORKER.get(code)
    if code == "DEADLINE_EXCEEDED" and not known_available:
        why = "no answer within the deadline"
    return f"{address}: {why} (ListBackends: {code})" if why else ""


# ListBackends failures in which nothing answered at all (no connection, or no answer within
# the deadline), as opposed to an answer refusing the call: grpc.StatusCode names.
_NO_ANSWER = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def no_answer(exc: Exception) -> bool:
    """Whether a failed call got no answer at all (what makes a silent worker's node unhealthy)."""
    return getattr(getattr(exc, "code", None), "name", "") in _NO_ANSWER


@dataclass
class CheckResults:
    probes: dict[int, str] = field(default_factory=dict)  # replica id -> alive/busy/unreachable
    probe_errors: dict[int, str] = field(default_factory=dict)
    listings: dict[UUID, list[WorkerBackend]] = field(default_factory=dict)
    listing_errors: dict[UUID, str] = field(default_factory=dict)
    # node id -> why its address does not serve its worker service (a subset of listing_errors)
    worker_api_missing: dict[UUID, str] = field(default_factory=dict)
    # node id -> the error of a listing nothing answered (a subset of listing_errors)
    unanswered: dict[UUID, str] = field(default_factory=dict)


def fan_out(calls: list[tuple], *, concurrency: int, name: str = "reconcile-check") -> dict:
    """Run ``calls`` (``(key, function, args, kwargs)``) on at most ``concurrency`` threads;
    returns ``{key: (True, result)}`` or ``{key: (False, exception)}`` for every call.

    Each thread takes the next call from a shared iterator until none is left: no future,
    lock-and-condition pair or queue item per call (a pass makes one call per worker of the
    fleet, and with a thread pool's per-call bookkeeping a thousand quick answers cost more
    than answering them one after the other). The threads end before this returns."""
    results: dict = {}
    pending = iter(calls)
    take = threading.Lock()

    def work() -> None:
        while True:
            with take:
                call = next(pending, None)
            if call is None:
                return
            key, function, args, kwargs = call
            try:
                results[key] = (True, function(*args, **kwargs))
            except Exception as exc:  # reported to the caller, never raised from a thread
                results[key] = (False, exc)

    threads = [
        threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(min(concurrency, len(calls)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def run_checks(
    plan: CheckPlan, prober, *, probe_timeout: float, worker_timeout: float, concurrency: int
) -> CheckResults:
    """Run every probe and listing of ``plan`` in parallel (``fan_out``); never raises for one
    failed call.

    A probe that raises (the client's ``probe`` does not, a fake might) is recorded as an error
    and changes nothing. A listing that fails, or whose reported node id is another node's (an
    address reused by a different worker), is recorded as an error and that node is skipped;
    when the failure shows that the address does not serve the node's worker service, the
    reason is also put in ``worker_api_missing``; when nothing answered at all, in
    ``unanswered``.
    """
    results = CheckResults()
    if not plan.probes and not plan.listings:
        return results
    calls = [
        (
            ("probe", replica.id),
            prober.probe,
            (replica.address,),
            {"node_id": str(replica.node_id), "timeout": probe_timeout},
        )
        for replica in plan.probes
    ]
    calls.extend(
        (("list", node.id), _listing, (prober, node.address, str(node.id), worker_timeout), {})
        for node in plan.listings
    )
    answers = fan_out(calls, concurrency=max(1, concurrency))
    for replica in plan.probes:
        ok, answer = answers[("probe", replica.id)]
        try:
            if not ok:
                raise answer
            results.probes[replica.id] = probe_outcome(answer)
        except Exception as exc:  # a broken prober must not abort the pass
            logger.warning("probe of replica %s failed: %s", replica.id, exc)
            results.probe_errors[replica.id] = str(exc)
    for node in plan.listings:
        node_id = node.id
        ok, answer = answers[("list", node_id)]
        if not ok:
            exc = answer
            logger.info("ListBackends on node %s failed: %s", node_id, exc)
            results.listing_errors[node_id] = str(exc)
            if no_answer(exc):
                results.unanswered[node_id] = str(exc)
            missing = missing_worker_service(exc, node.address, known_available=serves_worker_api(node.worker_api))
            if missing:
                results.worker_api_missing[node_id] = missing
            continue
        reported_id, backends = answer
        if reported_id and reported_id != str(node_id):
            results.listing_errors[node_id] = f"worker answered as node {reported_id}"
            results.worker_api_missing[node_id] = f"{node.address}: the worker there answers as node {reported_id}"
            continue
        results.listings[node_id] = backends
    return results


def _listing(prober, address: str, node_id: str, timeout: float) -> tuple[str, list[WorkerBackend]]:
    """One worker's ``ListBackends``, read (``worker_backends``) on the calling thread."""
    return worker_backends(prober.list_backends(address, node_id=node_id, timeout=timeout))
