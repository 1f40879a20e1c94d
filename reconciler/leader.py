"""The qcluster's leader process: reconcile passes from the cluster's first second, every interval.

``manage.py qcluster`` starts this process beside django-q2's sentinel (both are children of
the qcluster's main process) and starts it again if it dies. It runs ``reconcile.lead``: a
standby leader loop that takes the reconcile advisory lock when it is free, runs a pass every
``RECONCILE_INTERVAL`` for as long as it holds it, tries again every interval while another
process holds it, and reconnects after a database outage. So, with several qclusters, one
leads and the others are hot spares; when the leader's process dies, its database connection
and with it the lock go, and a spare leads within one interval.

Stopping: SIGTERM (sent by the qcluster's bounded stop) ends the loop after its current pass,
and the process exits once the cold loads its passes handed to its load pool are recorded
(``reconcile.lead`` drains it; a load still running at ``Q_STOP_GRACE`` dies with the process
and its ``loading`` row is discarded later by the stale-loading sweep).
If the qcluster's main process dies without stopping it (SIGKILL to that process alone), this
process notices that its parent changed and stops the same way: an orphan must not keep the
lock from the restarted qcluster's leader.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from django import db

from . import shutdown
from .reconcile import lead

logger = logging.getLogger("reconciler.leader")

#: Seconds between two checks that the qcluster's main process is still this process's parent.
PARENT_CHECK_INTERVAL = 0.5


def watch_parent(parent_pid: int) -> None:
    """Request a stop once ``parent_pid`` is no longer this process's parent."""
    while not shutdown.STOP_REQUESTED.wait(PARENT_CHECK_INTERVAL):
        if os.getppid() != parent_pid:
            logger.warning("reconcile leader: the qcluster process %d is gone; stopping", parent_pid)
            shutdown.STOP_REQUESTED.set()


def run_leader_process(parent_pid: int) -> None:
    """Target of the leader process (forked from the qcluster's main process, which closes its
    database connections first: a forked process must not share them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the qcluster, which stops us
    shutdown.stop_on_sigterm()
    threading.Thread(target=watch_parent, args=(parent_pid,), name="parent watch", daemon=True).start()
    logger.info("reconcile leader started (pid %d)", os.getpid())
    summary = lead()
    logger.info("reconcile leader stopped: %s", summary.reason or summary.outcome)
    db.connections.close_all()
