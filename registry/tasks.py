"""django-q2 entry points of the registry: run a load job, and the load/lease housekeeping.

Thin on purpose: the state transitions are manager verbs (``LoadJob.objects.*``,
``Lease.objects.*``) and the work is ``loading.schedule_and_load``. Where a load job runs
(``CONTROLPLANE_LOAD_JOB_RUNNER``: a qcluster, a thread, inline) is decided by
``registry.jobs.enqueue_load_job``, which names ``run_load_job`` by its dotted path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connections
from django.utils import timezone

from core import metrics

from . import jobs, loading
from .models import Lease, LoadJob, NodeModel

logger = logging.getLogger(__name__)


def runner_id() -> str:
    """``host:pid`` of this process: who runs a load job (shown in the job row)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """Heartbeat a running job from a background thread while the load blocks on gRPC, so a
    live runner is never mistaken for a dead one. The thread uses (and closes) its own
    database connection; a heartbeat that finds the job taken over just stops beating."""

    def __init__(self, job_id, runner: str, interval: float) -> None:
        self.job_id, self.runner, self.interval = job_id, runner, interval
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.interval > 0:
            self._thread = threading.Thread(target=self._beat, name=f"load-job-heartbeat-{self.job_id}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    if not LoadJob.objects.heartbeat(self.job_id, self.runner):
                        logger.warning("load job %s is no longer ours; heartbeat stops", self.job_id)
                        return
                except Exception:
                    logger.warning("load job %s heartbeat failed", self.job_id, exc_info=True)
        finally:
            connections.close_all()

    def __exit__(self, *exc_info):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


def run_load_job(job_id, *, runner: str | None = None) -> str:
    """Run one load job to its end; returns the state it left the job in (or what it found).

    Starts a pending job, or takes over a running one whose runner stopped heartbeating; a job
    someone else runs, or that finished, is left alone. Re-checks the warm path first (a
    replica may have been loaded since the job was created), then ``schedule_and_load`` with
    a heartbeat thread, then ``succeed``/``fail`` (typed error codes).
    """
    runner = runner or runner_id()
    stale_after = timedelta(seconds=float(settings.LOAD_JOB_STALE_AFTER))
    max_attempts = int(settings.LOAD_JOB_MAX_ATTEMPTS)
    if not LoadJob.objects.start(job_id, runner):
        stale_before = timezone.now() - stale_after
        if not LoadJob.objects.take_over(job_id, runner, stale_before, max_attempts=max_attempts):
            state = LoadJob.objects.filter(pk=job_id).values_list("state", flat=True).first()
            logger.info("load job %s not run here (state %s)", job_id, state or "missing")
            return state or "missing"
    metrics.observe_load_job("started")
    job = LoadJob.objects.get(pk=job_id)

    ready = NodeModel.objects.ready().for_model(job.model_name)
    if job.candidate_node_ids is not None:
        ready = ready.filter(node_id__in=job.candidate_node_ids)
    existing = ready.order_by("pk").first()
    if existing is not None:
        LoadJob.objects.succeed(job_id, runner, existing)
        metrics.observe_load_job("succeeded")
        return LoadJob.State.SUCCEEDED

    opts_blob = bytes(job.opts_blob) if job.opts_blob else None
    with _Heartbeat(job_id, runner, float(settings.LOAD_JOB_HEARTBEAT_INTERVAL)):
        try:
            replica = loading.schedule_and_load(
                job.model_name,
                job.candidate_node_ids,
                backend_type=job.backend_type or None,
                opts_blob=opts_blob,
                on_replica=lambda row: LoadJob.objects.record_replica(job_id, runner, row.pk),
            )
        except loading.RouterError as exc:
            LoadJob.objects.fail(job_id, code=exc.code, message=exc.message, runner=runner)
            metrics.observe_load_job("failed")
            return LoadJob.State.FAILED
        except Exception as exc:
            logger.exception("load job %s crashed", job_id)
            LoadJob.objects.fail(
                job_id, code=loading.LoadFailed.code, message=f"{type(exc).__name__}: {exc}", runner=runner
            )
            metrics.observe_load_job("failed")
            return LoadJob.State.FAILED
    if not LoadJob.objects.succeed(job_id, runner, replica):
        # Taken over while we loaded (we looked dead); the replica is loaded and routable anyway.
        logger.warning("load job %s finished here after being taken over", job_id)
    metrics.observe_load_job("succeeded")
    return LoadJob.State.SUCCEEDED


def reap_load_jobs(now: datetime | None = None, *, requeue: bool = True):
    """``LoadJob.objects.reap_dead`` with the configured thresholds (``LOAD_JOB_STALE_AFTER``,
    ``LOAD_JOB_MAX_ATTEMPTS``), then enqueue every job it set back to pending (one broker
    insert each; ``requeue=False`` leaves that to a later pass). Returns the ``ReapResult``."""
    result = LoadJob.objects.reap_dead(
        now=now,
        stale_after=timedelta(seconds=float(settings.LOAD_JOB_STALE_AFTER)),
        max_attempts=int(settings.LOAD_JOB_MAX_ATTEMPTS),
    )
    if requeue:
        for job_id in result.requeued:
            try:
                jobs.enqueue_load_job(job_id)
            except Exception as exc:  # the broker (Redis) is down: the pass must go on
                # The job stays pending with no message; reap_dead hands it back to a later
                # reap, which enqueues it again once the broker answers.
                logger.warning(
                    "could not enqueue load job %s (%s: %s); a later pass retries", job_id, type(exc).__name__, exc
                )
    if result.requeued or result.failed:
        logger.warning("load jobs reaped: %d requeued, %d failed", len(result.requeued), len(result.failed))
    return result


def housekeeping(now: datetime | None = None, *, requeue: bool = True) -> dict[str, int]:
    """One pass of the router's housekeeping (the reconciler runs it every pass):

    expire leases past their TTL (``Lease.objects.expire``), set in-flight counters to the live
    lease counts (``Lease.objects.sweep_in_flight``), reap dead load jobs and requeue them
    (``reap_load_jobs``), and purge leases and finished jobs older than
    ``ROUTER_RETENTION_SECONDS`` (default one day). No gRPC; every step is a short conditional
    update, idempotent and safe in several processes at once. Returns counts per step.
    """
    now = now or timezone.now()
    retention = timedelta(seconds=float(settings.ROUTER_RETENTION_SECONDS))
    reaped = reap_load_jobs(now, requeue=requeue)
    return {
        "leases_expired": Lease.objects.expire(now),
        "in_flight_corrected": Lease.objects.sweep_in_flight(),
        "load_jobs_requeued": len(reaped.requeued),
        "load_jobs_failed": len(reaped.failed),
        "leases_purged": Lease.objects.purge(released_before=now - retention),
        "load_jobs_purged": LoadJob.objects.purge(finished_before=now - retention),
    }
