"""Operations: the sequences that span registry verbs and a call to a worker.

Each one writes the database first, through one manager verb, and only then calls the worker,
outside any transaction, best effort: once the row is gone nothing routes to the replica any
more, and a backend whose stop call failed is an orphan the reconciler stops on a later pass
(``ListBackends`` shows it without a row). The admin, the reconciler and the router call these
functions rather than writing "remove the row, then stop the backend" themselves.

The worker client is a parameter (``workers``): anything with ``stop_backend(address,
model_name, replica_index, *, node_id, timeout=None)``. ``WORKERS`` is the real one (gRPC with
the node's worker command token); the reconciler passes its prober, tests pass fakes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from core import metrics
from core.credentials import worker_command_token
from proto import client

from .models import Node, NodeModel

logger = logging.getLogger(__name__)


class WorkerCalls(Protocol):
    def stop_backend(self, address: str, model_name: str, replica_index: int, *, node_id: str, timeout=None): ...


class WorkerClient:
    """The worker calls the control plane makes, authenticated with the node's command token."""

    def stop_backend(self, address: str, model_name: str, replica_index: int, *, node_id: str, timeout=None):
        return client.stop_backend(
            address,
            model_name,
            replica_index,
            node_id=str(node_id),
            token=worker_command_token(node_id),
            timeout=timeout,
        )


WORKERS = WorkerClient()


@dataclass(frozen=True)
class Unloaded:
    """What ``unload_replica`` did: whether the row went, and why stopping failed ("" if not)."""

    removed: bool
    stop_error: str = ""


def stop_backend(
    workers: WorkerCalls, address: str, node_id, model_name: str, replica_index: int, *, timeout=None
) -> str:
    """Ask a worker to stop one backend, best effort; returns the failure as text, "" when the
    call worked or there is no address to call (a node that never said where it listens)."""
    if not address:
        return ""
    try:
        workers.stop_backend(address, model_name, replica_index, node_id=str(node_id), timeout=timeout)
    except Exception as exc:  # any failure is reported, never raised: the row is already gone
        logger.warning("could not stop %s replica %d on node %s: %s", model_name, replica_index, node_id, exc)
        return f"{type(exc).__name__}: {exc}"
    return ""


def unload_replica(
    workers: WorkerCalls, *, node_id, address: str, model_name: str, replica_index: int, timeout=None
) -> Unloaded:
    """Remove a replica row (``NodeModel.objects.remove_replica``), then stop its backend.
    Nothing is stopped when the row was already gone: someone else unloaded it."""
    if not NodeModel.objects.remove_replica(node_id, model_name, replica_index):
        return Unloaded(removed=False)
    return Unloaded(
        removed=True, stop_error=stop_backend(workers, address, node_id, model_name, replica_index, timeout=timeout)
    )


def discard_failed_load(workers: WorkerCalls, replica: NodeModel, *, address: str) -> bool:
    """Undo a load that failed: delete the ``loading`` row with its VRAM reservation
    (``NodeModel.objects.discard_loading``), then stop whatever backend the load started. When
    the row was no longer ours (a takeover removed it) the backend is left alone: its new owner
    may be using it. Returns whether the row was ours."""
    if not NodeModel.objects.discard_loading(replica.pk):
        return False
    stop_backend(workers, address, replica.node_id, replica.model_name, replica.replica_index)
    return True


def evict_replica(workers: WorkerCalls, replica_id, *, node_id, model_name: str, replica_index: int, vram: int) -> bool:
    """Evict an idle replica to make room: delete its row only while nothing is in flight on it
    (``remove_if_idle``: a route that lands first wins), credit its VRAM back to the node, then
    stop its backend. False: it became busy or went meanwhile, nothing was done."""
    if not NodeModel.objects.remove_if_idle(replica_id):
        return False
    Node.objects.credit_vram(node_id, vram)
    metrics.observe_eviction()
    address = Node.objects.filter(pk=node_id).values_list("address", flat=True).first() or ""
    stop_backend(workers, address, node_id, model_name, replica_index)
    return True
