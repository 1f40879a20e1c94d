"""``manage.py qcluster``: django-q2's cluster, with a stop that always ends, within seconds.

This command replaces django-q2's own ``qcluster`` (the ``reconciler`` app comes before
``django_q`` in ``INSTALLED_APPS``); it runs the same cluster with the same settings (load jobs
are django-q2 tasks), plus the reconciler's **leader process** (``reconciler.leader``), started
with the cluster and restarted if it dies: reconcile passes from the cluster's first second,
every ``RECONCILE_INTERVAL``, one at a time across every qcluster (the reconcile advisory lock;
the other qclusters' leader processes are hot spares). What else it changes is stopping:

* **SIGTERM to the whole process group** (a supervisor, systemd's default ``KillMode``, a
  terminal): django-q2's sentinel and its workers die of it at once (its sentinel restores
  SIGTERM's default action) while the main process runs its stop handler, and that handler's
  ``Event.set()`` then waits forever for the dead sentinel to acknowledge the wake-up (a
  multiprocessing condition counts sleepers): the cluster logged "stopping" and never exited.
  Here the sentinel ignores SIGTERM, so only this process decides what happens.
* **Work that runs long**: django-q2 waits for each worker's current task, and the leader
  process runs until it is stopped. This process sends SIGTERM to all its descendants: the
  leader process ends its loop after its current pass, a worker running a load job lets it
  finish (``reconciler.shutdown``).
* **A bound**: whatever is still running ``Q_STOP_GRACE`` seconds (default 6) after the signal
  is killed (SIGKILL). An interrupted load job is requeued by the reconciler's housekeeping and
  its backend adopted (docs/resilience.md); the reconcile lock dies with the connection.

The signal handler only records the signal; the main thread acts on it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from django import db
from django.conf import settings
from django_q.cluster import Cluster, Sentinel, get_mp_context
from django_q.conf import setproctitle
from django_q.management.commands.qcluster import Command as DjangoQClusterCommand
from prometheus_client import multiprocess as prometheus_multiprocess

from reconciler import shutdown
from reconciler.leader import run_leader_process

logger = logging.getLogger("reconciler.qcluster")

#: Seconds between two starts of the leader process (a leader that dies at once is not
#: restarted in a tight loop).
LEADER_RESTART_PAUSE = 1.0


def stop_grace() -> float:
    return float(settings.Q_STOP_GRACE)


class GracefulSentinel(Sentinel):
    """django-q2's sentinel, deaf to SIGTERM (its processes inherit that; its workers then
    handle SIGTERM themselves: ``reconciler.shutdown.install_in_cluster_worker``)."""

    def start(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutdown.mark_graceful_cluster()
        super().start()


def _process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of ``root`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            start = _process_start_time(child)
            if start is not None and child not in found:
                found[child] = start
                pending.append(child)
    return found


def signal_processes(processes: dict[int, str], sig: int) -> list[int]:
    """Send ``sig`` to each process that is still the one recorded (same start time)."""
    sent = []
    for pid, started in processes.items():
        if _process_start_time(pid) != started:
            continue  # gone, or the pid was reused
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


class BoundedCluster(Cluster):
    def __init__(self, broker=None):
        self.signals: list[int] = []
        self.stopped_cleanly = True
        self.leader = None
        self.leader_started = 0.0
        super().__init__(broker)  # installs self.sig_handler for SIGTERM and SIGINT

    def sig_handler(self, signum, frame):
        self.signals.append(signum)

    def start(self) -> int:
        """django-q2's ``Cluster.start`` with :class:`GracefulSentinel`."""
        if setproctitle:
            setproctitle.setproctitle(f"qcluster {self.name}")
        self.stop_event = get_mp_context().Event()
        self.start_event = get_mp_context().Event()
        self.sentinel = get_mp_context().Process(
            target=GracefulSentinel,
            name=f"Process-{uuid.uuid4().hex}",
            args=(self.stop_event, self.start_event, self.cluster_id, self.broker, self.timeout),
        )
        self.sentinel.start()
        self.start_leader()
        logger.info("Q Cluster %s starting.", self.name)
        while not self.start_event.is_set() and not self.signals:
            if not self.sentinel.is_alive():
                raise RuntimeError(f"Q Cluster {self.name} failed to start: sentinel exited {self.sentinel.exitcode}")
            time.sleep(0.1)
        return self.pid

    def start_leader(self) -> None:
        """Start the reconciler's leader process (again, after it died)."""
        if self.leader is not None:
            logger.critical(
                "Q Cluster %s: reconcile leader exited with %s; starting it again", self.name, self.leader.exitcode
            )
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # its live gauges are summed no more
                prometheus_multiprocess.mark_process_dead(self.leader.pid)
        db.connections.close_all()  # a forked process must not share this process's connections
        self.leader = get_mp_context().Process(
            target=run_leader_process, args=(os.getpid(),), name="reconcile leader", daemon=False
        )
        self.leader.start()
        self.leader_started = time.monotonic()

    def serve(self) -> int:
        """Block until a signal (then stop, bounded) or the sentinel's death, keeping the leader
        process running. Exit code."""
        while not self.signals and self.sentinel.is_alive():
            if not self.leader.is_alive() and time.monotonic() - self.leader_started >= LEADER_RESTART_PAUSE:
                self.start_leader()
            time.sleep(0.2)
        if not self.signals:
            logger.error("Q Cluster %s: sentinel exited with %s", self.name, self.sentinel.exitcode)
            self.stop_within(0)
            return 1
        logger.info("received %s", signal.Signals(self.signals[0]).name)
        self.stop_within(stop_grace())
        return 0

    def stop_within(self, grace: float) -> None:
        tree = descendants(self.pid)
        # The leader process ends its loop after its pass, workers their task; the sentinel,
        # pusher and monitor ignore it.
        signal_processes(tree, signal.SIGTERM)
        stopper = threading.Thread(target=Cluster.stop, args=(self,), name="cluster stop", daemon=True)
        stopper.start()
        deadline = time.monotonic() + grace
        while (self.sentinel.is_alive() or self.leader.is_alive()) and time.monotonic() < deadline:
            self.sentinel.join(0.1)
            self.leader.join(0.05)
        tree.update(descendants(self.pid))
        killed = signal_processes(tree, signal.SIGKILL)
        if killed:
            logger.warning(
                "Q Cluster %s: killed %d process(es) still running %gs after the stop", self.name, len(killed), grace
            )
        self.sentinel.join(2)
        self.leader.join(2)
        stopper.join(1)
        self.stopped_cleanly = not stopper.is_alive()


class Command(DjangoQClusterCommand):
    help = "Starts a Django Q Cluster; SIGTERM/SIGINT stop it within Q_STOP_GRACE seconds (default 6)."

    def handle(self, *args, **options):
        settings.SECRET_KEY  # noqa: B018 - as django-q2: the cluster signs its tasks
        if options.get("cluster_name"):
            os.environ["Q_CLUSTER_NAME"] = options["cluster_name"]
        cluster = BoundedCluster()
        cluster.start()
        if options.get("run_once"):
            cluster.stop_within(stop_grace())
            code = 0
        else:
            code = cluster.serve()
        if not cluster.stopped_cleanly:
            # The stop handler is stuck on a wake-up a killed process never acknowledged: exit
            # without running exit handlers that could wait for the same process.
            logging.shutdown()
            os._exit(code)
        if code:
            raise SystemExit(code)
