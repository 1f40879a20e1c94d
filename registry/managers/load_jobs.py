"""Load-job verbs (one durable cold load per model) and the failed-load backoff."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, models, transaction
from django.db.models import (
    F,
    Q,
)

from .. import placement
from ..clock import resolve_now
from .shared import registry_model

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Load jobs: one durable cold load per model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReapResult:
    """What ``LoadJob.objects.reap_dead`` did. ``requeued``: ids of jobs now ``pending`` that
    the caller must enqueue again (``registry.jobs.enqueue_load_job``); ``failed``: ids of jobs
    that ran out of attempts; ``cleaned``: leftover ``loading`` rows removed."""

    requeued: tuple = ()
    failed: tuple = ()
    cleaned: int = 0


def _discard_loading_row(replica_id) -> bool:
    return registry_model("NodeModel").objects.discard_loading(replica_id)


class LoadJobQuerySet(models.QuerySet):
    def active(self):
        """Pending or running: the partial unique index allows one of these per model."""
        return self.filter(state__in=self.model.ACTIVE_STATES)

    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def stale(self, *, stale_before: datetime):
        """Running jobs whose runner has not heartbeated since ``stale_before``."""
        return self.filter(state=self.model.State.RUNNING).filter(
            Q(heartbeat_at__lt=stale_before) | Q(heartbeat_at__isnull=True)
        )


class LoadJobManager(models.Manager.from_queryset(LoadJobQuerySet)):
    def claim_or_attach(
        self,
        model_name: str,
        *,
        backend_type: str = "",
        opts_blob: bytes | None = None,
        candidate_node_ids: Iterable | None = None,
        now: datetime | None = None,
    ) -> tuple:
        """Create the model's load job, or attach to the one already active. Returns
        ``(job, created)``; only the creator enqueues it.

        Idiom: insert and let the partial unique index (one pending/running job per model)
        decide; the loser of a race gets ``IntegrityError`` and reads the active job. If that
        job finished between the failed insert and the read, the caller attaches to it anyway
        (its outcome answers the caller's question) instead of starting a second load. Never
        holds a lock; on PostgreSQL a racing insert waits only for the winner's autocommit.
        """
        if not model_name or not model_name.strip():
            raise ValueError("model name must not be empty")
        now = resolve_now(now)
        node_ids = None if candidate_node_ids is None else [str(pk) for pk in candidate_node_ids]
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    job = self.create(
                        model_name=model_name,
                        backend_type=backend_type or "",
                        opts_blob=bytes(opts_blob) if opts_blob is not None else None,
                        candidate_node_ids=node_ids,
                        created_at=now,
                    )
                return job, True
            except IntegrityError:
                pass
            job = self.active().for_model(model_name).first()
            if job is None:
                job = self.for_model(model_name).order_by("-created_at").first()
            if job is not None:
                return job, False
        raise IntegrityError(f"could not claim or attach a load job for {model_name!r}")

    def start(self, job_id, runner: str, *, now: datetime | None = None) -> bool:
        """``pending`` -> ``running`` owned by ``runner`` (conditional update; counts an
        attempt). False: someone else started it, or it finished. Idiom: conditional update
        ``WHERE state = 'pending'``."""
        now = resolve_now(now)
        return (
            self.filter(pk=job_id, state=self.model.State.PENDING).update(
                state=self.model.State.RUNNING,
                runner=runner,
                heartbeat_at=now,
                attempts=F("attempts") + 1,
                progress="started",
            )
            == 1
        )

    def heartbeat(self, job_id, runner: str, *, progress: str | None = None, now: datetime | None = None) -> bool:
        """The runner is alive (and optionally says how far it got). Conditional on the job
        still running under ``runner``: False means it was taken over or reaped; stop. Idiom:
        conditional update ``WHERE state = 'running' AND runner = runner``."""
        changes = {"heartbeat_at": resolve_now(now)}
        if progress is not None:
            changes["progress"] = progress[:255]
        return self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(**changes) == 1

    def record_replica(self, job_id, runner: str, replica_id, *, now: datetime | None = None) -> bool:
        """Note the ``loading`` row the job just inserted, so a takeover can clean it up. Idiom:
        conditional update on (running, ``runner``); False: the job is no longer this
        runner's."""
        return (
            self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(
                replica_id=replica_id, heartbeat_at=resolve_now(now)
            )
            == 1
        )

    def take_over(
        self, job_id, runner: str, stale_before: datetime, *, max_attempts: int = 3, now: datetime | None = None
    ) -> bool:
        """Adopt a running job whose runner went quiet (heartbeat older than ``stale_before``).

        Conditional update on (running, stale heartbeat, attempts left); the winner then removes
        the dead runner's ``loading`` row and its VRAM reservation in the same transaction and
        runs the load from scratch. False: the runner is alive, the job finished, someone else
        took it over, or it has no attempts left (``reap_dead`` fails it).
        Idiom: conditional update, then the leftover row's discard, in one short ``atomic()``.
        """
        now = resolve_now(now)
        with transaction.atomic():
            taken = (
                self.stale(stale_before=stale_before)
                .filter(pk=job_id, attempts__lt=max_attempts)
                .update(runner=runner, heartbeat_at=now, attempts=F("attempts") + 1, progress="taken over")
                == 1
            )
            if taken:
                replica_id = self.filter(pk=job_id).values_list("replica_id", flat=True).get()
                _discard_loading_row(replica_id)
                self.filter(pk=job_id).update(replica=None)
        return taken

    def succeed(self, job_id, runner: str, replica, *, now: datetime | None = None) -> bool:
        """``running`` -> ``succeeded`` with the replica's coordinates (conditional on
        ``runner`` still owning it). False: the job was taken over or reaped meanwhile. Idiom:
        conditional update on (running, ``runner``)."""
        now = resolve_now(now)
        return (
            self.filter(pk=job_id, state=self.model.State.RUNNING, runner=runner).update(
                state=self.model.State.SUCCEEDED,
                replica_id=replica.pk,
                node_id=replica.node_id,
                replica_index=replica.replica_index,
                address=replica.address,
                heartbeat_at=now,
                finished_at=now,
                progress="loaded",
                error_code="",
                error_message="",
            )
            == 1
        )

    def fail(self, job_id, *, code: str, message: str, runner: str | None = None, now: datetime | None = None) -> bool:
        """An active job -> ``failed`` with a stable error ``code`` (conditional; with ``runner``
        only while that runner owns it). A ``loading`` row the job recorded is removed and its
        VRAM returned. False: the job had already finished or changed hands. Idiom: conditional
        update on the active states (and ``runner``), then the row's discard, in one short
        ``atomic()``."""
        now = resolve_now(now)
        queryset = self.active().filter(pk=job_id)
        if runner is not None:
            queryset = queryset.filter(runner=runner)
        with transaction.atomic():
            replica_id = queryset.values_list("replica_id", flat=True).first()
            failed = (
                queryset.update(
                    state=self.model.State.FAILED,
                    error_code=code[:64],
                    error_message=message,
                    heartbeat_at=now,
                    finished_at=now,
                )
                == 1
            )
            if failed:
                _discard_loading_row(replica_id)
        return failed

    def reap_dead(
        self, *, now: datetime | None = None, stale_after: timedelta = timedelta(seconds=60), max_attempts: int = 3
    ) -> ReapResult:
        """Housekeeping for load jobs whose runner died (the reconciler calls this).

        - ``running`` with no heartbeat for ``stale_after``: the dead runner's ``loading`` row
          and VRAM reservation are removed; the job goes back to ``pending`` (requeued) or, after
          ``max_attempts`` runs, to ``failed`` with code ``load_failed``.
        - ``pending`` for ``stale_after`` without a runner (its queue message was lost): requeued
          again; its ``heartbeat_at`` is bumped so it is requeued at most once per window.

        Idiom: each transition is a conditional update on the state and heartbeat read, so a
        runner that heartbeats in between wins, and two reapers never both act on one job.
        The caller enqueues ``requeued`` (``registry.tasks.reap_load_jobs`` does both).
        """
        now = resolve_now(now)
        cutoff = now - stale_after
        State = self.model.State
        requeued, failed, cleaned = [], [], 0
        for job in self.stale(stale_before=cutoff).values("pk", "heartbeat_at", "attempts", "replica_id", "runner"):
            same = self.filter(
                pk=job["pk"], state=State.RUNNING, runner=job["runner"], heartbeat_at=job["heartbeat_at"]
            )
            with transaction.atomic():
                if job["attempts"] >= max_attempts:
                    changed = same.update(
                        state=State.FAILED,
                        error_code="load_failed",
                        error_message=f"load runner {job['runner'] or '?'} stopped responding "
                        f"({job['attempts']} attempt(s))",
                        finished_at=now,
                        heartbeat_at=now,
                    )
                    target = failed
                else:
                    changed = same.update(
                        state=State.PENDING, runner="", heartbeat_at=now, replica=None, progress="requeued"
                    )
                    target = requeued
                if changed:
                    cleaned += _discard_loading_row(job["replica_id"])
                    target.append(job["pk"])
        lost = self.filter(state=State.PENDING).filter(
            Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, created_at__lt=cutoff)
        )
        for job_id, heartbeat_at in lost.values_list("pk", "heartbeat_at"):
            if self.filter(pk=job_id, state=State.PENDING, heartbeat_at=heartbeat_at).update(heartbeat_at=now):
                requeued.append(job_id)
        return ReapResult(requeued=tuple(requeued), failed=tuple(failed), cleaned=cleaned)

    def purge(self, *, finished_before: datetime) -> int:
        """Delete finished jobs older than ``finished_before``; returns how many went. Idiom:
        one set-based DELETE of finished rows."""
        deleted, _ = self.filter(state__in=self.model.FINISHED_STATES, finished_at__lt=finished_before).delete()
        return deleted


# --------------------------------------------------------------------------------------------
# Failed-load backoff
# --------------------------------------------------------------------------------------------


class LoadFailureManager(models.Manager):
    def record(self, model_name: str, node_id, error: str, *, now: datetime | None = None):
        """Count one more failed load of ``model_name`` on ``node_id`` and push its
        ``retry_after`` to ``now + placement.failure_backoff(failures)``. Returns the row.

        Idiom: row lock on the pair inside one transaction; two first failures race on the
        unique constraint and the loser retries into the row lock.
        """
        now = resolve_now(now)
        for _attempt in range(3):
            try:
                with transaction.atomic():
                    row = self.select_for_update().filter(model_name=model_name, node_id=node_id).first()
                    if row is None:
                        row = self.model(model_name=model_name, node_id=node_id, failures=0)
                    row.failures += 1
                    row.last_error = (error or "")[:2000]
                    row.retry_after = now + placement.failure_backoff(row.failures)
                    row.updated_at = now
                    row.save()
                return row
            except IntegrityError:
                continue
        raise IntegrityError(f"could not record a load failure of {model_name!r} on {node_id}")

    def clear(self, model_name: str, node_id) -> bool:
        """A load succeeded there: forget the failures. False when there were none. Idiom:
        conditional delete by ``(model, node)``."""
        deleted, _ = self.filter(model_name=model_name, node_id=node_id).delete()
        return deleted > 0
