"""Sweeps a pass runs after planning: leaked reservations, old events, and the router's hook."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from registry.models import Node

from .snapshot import Snapshot

logger = logging.getLogger(__name__)


def leaked_reservations(snapshot: Snapshot) -> list[tuple]:
    """``(node, amount)`` for nodes holding a VRAM reservation with no ``loading`` row left to
    account for it (a loader that died before releasing it). Pure."""
    leaked = []
    for node in snapshot.nodes.values():
        if node.reserved_vram <= 0:
            continue
        if any(replica.loading for replica in snapshot.replicas_by_node.get(node.id, ())):
            continue
        leaked.append((node, node.reserved_vram))
    return leaked


def release_reservation(node_id, amount: int) -> bool:
    """Return the observed leaked amount with the registry's conditional update
    (``reserved -= n WHERE reserved >= n``): a reservation made after the snapshot stays, and a
    heartbeat that already reset the figure makes this a no-op."""
    return Node.objects.release_vram(node_id, amount)


def expire_leases_and_dead_load_jobs(*, now: datetime) -> dict[str, int]:
    """Hook for the router's housekeeping, run once per pass under the reconcile lock.

    The router's author fills this in: expire leases past their TTL (and so give back leaked
    ``in_flight``), sweep in-flight counters against live leases, and reap load jobs whose
    runner died (requeue or fail them, removing their ``loading`` rows and reservations).
    Return counts by action name (they are added to the pass summary's ``actions``). Must
    not make network calls; keep each step a short conditional update.
    """
    return {}


def prune_events(*, keep_days: int, now: datetime) -> int:
    """Delete events older than ``keep_days`` (0 keeps everything)."""
    if keep_days <= 0:
        return 0
    from .models import Event

    return Event.objects.prune(older_than=timedelta(days=keep_days), now=now)
