"""Ending the qcluster's long-running work promptly when the qcluster stops.

The project's ``manage.py qcluster`` (``reconciler/management/commands/qcluster.py``) stops by
sending SIGTERM to every process it started, then kills what is still running after
``Q_STOP_GRACE``. In its reconcile leader process (``reconciler.leader``) and in django-q2's
worker processes (only under that command, see :func:`install_in_cluster_worker`), SIGTERM
sets :data:`STOP_REQUESTED` instead of killing: the leader loop returns after the pass it is
running instead of sleeping until its next one, and a worker finishes the load job it runs
(django-q2 then stops it) instead of dying half-way through it.
"""

from __future__ import annotations

import signal
import threading

#: Set in the qcluster's leader and worker processes when the qcluster is stopping (in the
#: leader also when its qcluster is gone).
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


def stop_on_sigterm() -> None:
    """In this process, SIGTERM requests a stop (sets :data:`STOP_REQUESTED`)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP_REQUESTED.set())


def mark_graceful_cluster() -> None:
    global _graceful_cluster
    _graceful_cluster = True


def install_in_cluster_worker(sender=None, proc_name=None, **kwargs) -> None:
    """django-q2 ``post_spawn`` receiver (runs in each new worker process)."""
    if _graceful_cluster:
        stop_on_sigterm()
