"""One reconcile pass: snapshot -> plan -> apply, one pass at a time across every process.

A pass is level-triggered: it recomputes desired vs observed from the database, so running it
twice, or after a crash half-way, is harmless. Its phases, in order:

1. node health: the pass records which heartbeats changed since it last looked (on its own
   clock; counting restarts after an observation gap), nodes not seen heartbeating for the
   stale threshold go offline (unless the mass-staleness guard holds or heartbeat ingestion is
   silent), offline nodes heartbeating again recover;
2. checks (network, outside any transaction, bounded parallelism and deadlines): probe loaded
   replicas not confirmed recently; ask each healthy or unhealthy worker which backends it
   runs; apply: refresh or count probe failures, remove rows after three unreachable probes or
   when the worker no longer runs their backend, stop orphan backends; a heartbeating node
   whose worker does not answer for several passes turns unhealthy, and healthy again at its
   worker's first answer;
3. housekeeping: leaked VRAM reservations, the router's lease/load-job hook;
4. scaling per autoscaled model (cooldown gate, floor, busy +1, idle scale-down);
5. conditions per model, with an event per state change.

The phases themselves are ``apply.Pass``; this module drives them: the reconcile lock, the
pass's clock, the stored summary, and the leader loop (``run_leader``, and ``lead``, which keeps
it going across database outages: the qcluster's leader process and ``manage.py reconcile
--loop``; docs/resilience.md, "The leader loop").

The snapshot is re-read (same fixed number of queries) after a phase that changed rows, so each
phase plans from what the database says, not from what the previous phase hoped it did.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import uuid4

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, connections
from django.utils import timezone

from core import metrics
from core.logs import log_context
from registry.locks import LockKey, try_advisory_lock

from . import shutdown
from .apply import Pass
from .conf import ReconcileConfig
from .models import ReconcilePass
from .probes import GrpcProber
from .scale_up import SchedulerUnavailable
from .summary import PassSummary

__all__ = [
    "LeaderSummary",
    "PassSummary",
    "RouterScheduler",
    "SchedulerUnavailable",
    "database_now",
    "lead",
    "reconcile_once",
    "record_skipped",
    "run_leader",
    "run_pass",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The default scheduler
# --------------------------------------------------------------------------------------------


class RouterScheduler:
    """``registry.router.schedule_and_load``, imported at call time: the router imports the
    registry and may be absent in a partial deployment, so the reconciler never imports it
    at module import."""

    def schedule_and_load(self, model_name: str, candidate_node_ids):
        try:
            from registry import router
        except ModuleNotFoundError as exc:
            if exc.name != "registry.router":
                raise
            raise SchedulerUnavailable("registry.router is not available") from exc
        return router.schedule_and_load(model_name, candidate_node_ids)

    def load_many(self, wants, *, concurrency: int, deadline: float | None = None):
        """Every replica a pass's scale-up wants, claimed first, loaded ``concurrency`` at a
        time (``registry.bulk_loading.load_many``)."""
        try:
            from registry import bulk_loading, router  # noqa: F401 - router: the deployment has the scheduler
        except ModuleNotFoundError as exc:
            if exc.name not in ("registry.router", "registry.bulk_loading"):
                raise
            raise SchedulerUnavailable(f"{exc.name} is not available") from exc
        return bulk_loading.load_many(wants, concurrency=concurrency, deadline=deadline)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def reconcile_once(*, now: datetime | None = None, scheduler=None, prober=None) -> PassSummary:
    """Run one pass under the reconcile try-lock; return at once when another process holds it.

    ``now`` fixes the pass's clock (tests); ``scheduler`` is anything with
    ``schedule_and_load(model_name, candidate_node_ids)``, and optionally ``load_many(wants,
    concurrency=, deadline=)`` for the whole scale-up at once (default: the router's, which has
    both);
    ``prober`` anything with ``probe``/``list_backends``/``stop_backend``/``unload_model``
    (default: ``proto.client``). The summary is logged and stored as a ``ReconcilePass``.
    """
    with try_advisory_lock(LockKey.RECONCILE) as held:
        if not held:
            return record_skipped(now=now)
        return run_pass(now=now, scheduler=scheduler, prober=prober)


def record_skipped(*, now: datetime | None = None, reason: str = "held") -> PassSummary:
    """Store and return the summary of a pass that did not run."""
    summary = PassSummary(started_at=now or timezone.now(), outcome=ReconcilePass.Outcome.SKIPPED, reason=reason)
    logger.info("reconcile pass skipped: %s", reason)
    _store(summary, ReconcileConfig.from_settings())
    metrics.observe_reconcile_pass(summary)
    return summary


def run_pass(*, now: datetime | None = None, scheduler=None, prober=None) -> PassSummary:
    """One pass. The caller must hold the reconcile lock (``reconcile_once``, ``run_leader``)."""
    cfg = ReconcileConfig.from_settings()
    if now is None:
        try:
            now = database_now()
        except DatabaseError:
            # The pass fails at its first query and reports it (a fatal error summary).
            now = timezone.now()
    summary = PassSummary(started_at=now)
    started = time.monotonic()
    run = Pass(
        now=now,
        cfg=cfg,
        scheduler=scheduler or RouterScheduler(),
        prober=prober or GrpcProber(),
        summary=summary,
        started=started,
    )
    with log_context(pass_id=uuid4().hex[:12]):
        return _finish_pass(run, summary, cfg, started)


def database_now() -> datetime:
    """The pass's clock: the database server's, so that every reconciler process (leaders on
    different machines take turns) stamps heartbeat observations and pass times on one clock.
    ``clock_timestamp()``, not ``now()``, which is frozen at the start of a transaction. Other
    databases (the SQLite lane: one machine) use this process's clock."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            return cursor.fetchone()[0]
    return timezone.now()


def _finish_pass(run: Pass, summary: PassSummary, cfg: ReconcileConfig, started: float) -> PassSummary:
    try:
        run.run()
    except Exception as exc:
        logger.exception("reconcile pass failed")
        summary.outcome = ReconcilePass.Outcome.ERROR
        summary.reason = f"{type(exc).__name__}: {exc}"[:1000]
        summary.fatal = isinstance(exc, (OperationalError, InterfaceError))
    finally:
        summary.duration_s = time.monotonic() - started
    try:
        run.flush_events()
        _store(summary, cfg)
    except DatabaseError:
        logger.exception("could not store the reconcile pass")
        summary.fatal = True
    log = logger.warning if summary.outcome == ReconcilePass.Outcome.ERROR else logger.info
    log("reconcile pass %s (%.3fs)", summary, summary.duration_s)
    metrics.observe_reconcile_pass(summary)
    return summary


def _store(summary: PassSummary, cfg: ReconcileConfig) -> None:
    host, _, pid = summary.holder.rpartition(":")
    ReconcilePass.objects.record(
        outcome=summary.outcome,
        started_at=summary.started_at,
        duration=timedelta(seconds=summary.duration_s),
        summary=summary.as_dict(),
        holder_host=host,
        holder_pid=int(pid) if pid.isdigit() else None,
        keep=cfg.passes_kept,
    )


# --------------------------------------------------------------------------------------------
# Leader loop
# --------------------------------------------------------------------------------------------


#: ``LeaderSummary.reason`` of a leader run cut short because its qcluster is stopping.
STOPPING = "stopping"
#: ``LeaderSummary.reason`` of a leader run that ended on a database error (lock maybe gone).
LOST = "database connection lost"


@dataclass
class LeaderSummary:
    """What a leader run did: passes run while holding the lock, their summed actions."""

    started_at: datetime
    outcome: str = ReconcilePass.Outcome.OK  # skipped: never got the lock
    reason: str = ""
    passes: int = 0
    errors: int = 0
    held_s: float = 0.0
    actions: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    last: dict | None = None

    def add(self, summary: PassSummary) -> None:
        self.passes += 1
        self.errors += summary.outcome == ReconcilePass.Outcome.ERROR
        self.actions.update(summary.actions)
        self.skipped.update(summary.skipped)
        self.last = summary.as_dict()

    def as_dict(self) -> dict:
        return {
            "outcome": str(self.outcome),
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "passes": self.passes,
            "errors": self.errors,
            "held_s": round(self.held_s, 3),
            "actions": dict(sorted(self.actions.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "last": self.last,
        }


def run_leader(
    *,
    budget: float | None,
    interval: float | None = None,
    standby: bool = False,
    scheduler=None,
    prober=None,
    clock=time.monotonic,
    sleep=shutdown.pause,
) -> LeaderSummary:
    """Take the leader try-lock and run a pass every ``interval`` seconds until ``budget``
    seconds have passed (``None``: forever), then release it and return.

    Two locks: the leader lock (``LockKey.RECONCILE_LEADER``), held for the whole run, makes one
    process the leader; each pass also takes the pass lock (``LockKey.RECONCILE``) for its own
    duration only, as ``reconcile_once`` does, so passes stay one at a time while a forced pass
    (``POST /api/v1/reconcile``, ``manage.py reconcile --once``) can still run between the
    leader's passes. A tick whose pass lock is taken is skipped (counted in ``skipped.held``).

    Without the leader lock: return at once (``skipped: held``), or with ``standby`` keep trying
    every interval until the budget ends (a hot spare: every qcluster's leader process,
    ``manage.py reconcile --loop``). Both are session locks on this thread's database connection,
    so if the process dies they die with the connection and a standby leader takes over at its
    next try. A pass is only started if it starts before the budget ends; a database error that
    may have cost the connection ends the run (the locks may be gone).
    """
    interval = float(settings.RECONCILE_INTERVAL if interval is None else interval)
    began = clock()
    deadline = None if budget is None else began + float(budget)
    result = LeaderSummary(started_at=timezone.now())

    def time_left(at: float) -> bool:
        return deadline is None or at < deadline

    while True:
        if shutdown.stop_requested():
            result.outcome, result.reason = ReconcilePass.Outcome.SKIPPED, STOPPING
            return result
        with try_advisory_lock(LockKey.RECONCILE_LEADER) as leading:
            if leading:
                result.outcome, result.reason = ReconcilePass.Outcome.OK, ""
                took = clock()
                try:
                    while True:
                        pass_started = clock()
                        with try_advisory_lock(LockKey.RECONCILE) as held:
                            summary = run_pass(scheduler=scheduler, prober=prober) if held else None
                        if summary is None:
                            result.skipped["held"] += 1  # a forced pass is running
                        else:
                            result.add(summary)
                            if summary.fatal:
                                result.reason = LOST
                                return result
                        next_start = pass_started + interval
                        if not time_left(next_start):
                            return result
                        if not shutdown.stop_requested():
                            sleep(max(0.0, next_start - clock()))  # ends early on a stop
                        if shutdown.stop_requested():
                            result.reason = STOPPING
                            return result
                finally:
                    result.held_s += clock() - took
        # Only reached without the leader lock: the loop above always returns.
        result.outcome, result.reason = ReconcilePass.Outcome.SKIPPED, "held"
        if not standby:
            record_skipped()
            return result
        if not time_left(clock() + interval):
            return result
        sleep(interval)


def lead(*, budget: float | None = None, interval: float | None = None, sleep=shutdown.pause) -> LeaderSummary:
    """A standby leader loop that outlives database outages: ``run_leader`` until ``budget``
    seconds have passed (``None``: until the process is asked to stop), starting again, on a
    fresh connection, every ``interval`` after a run that lost its connection or could not reach
    the database at all. The advisory lock died with the old connection, so whichever leader
    reconnects first leads. Returns the last run's summary (``LOST`` if the budget ran out
    during an outage)."""
    pause = float(settings.RECONCILE_INTERVAL if interval is None else interval)
    began = time.monotonic()
    result = LeaderSummary(started_at=timezone.now(), outcome=ReconcilePass.Outcome.ERROR, reason=LOST)
    while not shutdown.stop_requested():
        remaining = None if budget is None else budget - (time.monotonic() - began)
        if remaining is not None and remaining <= 0:
            break
        try:
            result = run_leader(budget=remaining, interval=interval, standby=True, sleep=sleep)
        except DatabaseError as exc:
            logger.warning("reconcile leader: database unavailable (%s); retrying in %gs", exc, pause)
            result = LeaderSummary(
                started_at=timezone.now(), outcome=ReconcilePass.Outcome.ERROR, reason=f"{LOST}: {exc}"
            )
        else:
            if result.reason != LOST:
                break
            logger.warning("reconcile leader: %s; retrying in %gs", LOST, pause)
        for alias in connections:
            try:
                connections[alias].close()
            except DatabaseError:
                pass
        sleep(pause)
    return result
