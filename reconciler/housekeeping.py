"""Sweeps a pass runs after planning: leaked reservations, old events, and the router's hook."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from registry.models import NodeModel

from .snapshot import Snapshot

logger = logging.getLogger(__name__)


def stale_loading_rows(snapshot: Snapshot, *, older_than: timedelta, now: datetime) -> list:
    """``loading`` rows whose load cannot still be running: older than every deadline a load
    has (worker start + LoadModel + margin). Their loader died (a SIGKILLed qcluster, a web
    process restarted mid-load) and left the row and its VRAM reservation behind. Pure.

    Node-level reservations need no sweep of their own: every heartbeat that reports VRAM
    resets ``reserved_vram``, and a successful load keeps its reservation until then on purpose
    (the freed figure only shows in the worker's next report).
    """
    cutoff = now - older_than
    return [replica for replica in snapshot.replicas if replica.loading and _loading_since(replica) < cutoff]


def _loading_since(replica) -> datetime:
    """When the row entered ``loading`` (its ``state_changed_at``, written by the loader's
    claim); rows written before that column existed fall back to ``updated_at``."""
    since = replica.state_changed_at or replica.updated_at
    return since if since is not None else datetime.max.replace(tzinfo=UTC)


def discard_stale_loading_row(replica_id) -> bool:
    """Delete the row if it is still ``loading`` and give back its reservation (the registry's
    conditional ``discard_loading``: a load that finished meanwhile keeps its row)."""
    return NodeModel.objects.discard_loading(replica_id)


def expire_leases_and_dead_load_jobs(*, now: datetime) -> dict[str, int]:
    """The router's housekeeping, once per pass under the reconcile lock: expire leases past
    their TTL, set in-flight counters to the live lease counts, reap load jobs whose runner
    died (requeued for another runner, or failed after their attempts, their ``loading`` rows
    and reservations cleaned) and purge old leases and jobs. Counts by action name."""
    from registry.tasks import housekeeping

    return housekeeping(now)


def prune_events(*, keep_days: int, now: datetime) -> int:
    """Delete events older than ``keep_days`` (0 keeps everything)."""
    if keep_days <= 0:
        return 0
    from .models import Event

    return Event.objects.prune(older_than=timedelta(days=keep_days), now=now)
