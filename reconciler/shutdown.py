"""Ending the qcluster's long-running tasks promptly when the qcluster stops.

django-q2 stops a cluster by letting each worker process finish its current task, and the
reconciler's leader loop is a task that runs for up to ``RECONCILE_LEADER_BUDGET`` (50 s). The
project's ``manage.py qcluster`` (``reconciler/management/commands/qcluster.py``) therefore
sends SIGTERM to its worker processes when it stops; in those processes (and only there, see
:func:`install_in_cluster_worker`) SIGTERM sets :data:`STOP_REQUESTED`, and the leader loop
returns after the pass it is running instead of sleeping until its budget is spent.
"""

from __future__ import annotations

import signal
import threading

#: Set in a qcluster worker process when the cluster is stopping.
STOP_REQUESTED = threading.Event()

# Set in the sentinel before it forks its workers (fork copies it): post_spawn receivers only
# install the SIGTERM handler under the project's qcluster, never under another runner that
# relies on SIGTERM's default action.
_graceful_cluster = False


def stop_requested() -> bool:
    return STOP_REQUESTED.is_set()


def pause(seconds: float) -> None:
    """``time.sleep`` that ends early when the process is asked to stop."""
    STOP_REQUESTED.wait(max(0.0, seconds))


def mark_graceful_cluster() -> None:
    global _graceful_cluster
    _graceful_cluster = True


def install_in_cluster_worker(sender=None, proc_name=None, **kwargs) -> None:
    """django-q2 ``post_spawn`` receiver (runs in each new worker process)."""
    if _graceful_cluster:
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())
