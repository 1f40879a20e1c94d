"""The reconciler's knobs, read from Django settings at the start of every pass.

The shared timing knobs (``STALE_AFTER``, ``RECONCILE_INTERVAL``, ...) are defined in
``controlplane/settings.py``; the ones below belong to the reconciler alone and are read with
``getattr(settings, NAME, default)`` so a deployment may set them without code changes here.
Reading them per pass (not at import) keeps ``override_settings`` working in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings

# Reconciler-only settings and their defaults.
DEFAULTS = {
    # Reap no node when more than this fraction of the healthy nodes turn stale in one pass
    # (and at least two do): the control plane or its network is the likelier culprit.
    "RECONCILE_MASS_STALE_FRACTION": 0.5,
    # Seconds a scheduled leader run keeps passing before it returns (under Q_CLUSTER timeout).
    "RECONCILE_LEADER_BUDGET": 50.0,
    # Parallel gRPC calls (probes, ListBackends) per pass.
    "RECONCILE_PROBE_CONCURRENCY": 16,
    # Seconds after which a loaded replica's last confirmation is old enough to probe again
    # (None: RECONCILE_INTERVAL).
    "RECONCILE_PROBE_AFTER": None,
    # Deadline (seconds) of the worker calls a pass makes: ListBackends and StopBackend.
    "RECONCILE_WORKER_TIMEOUT": 2.0,
    # Seconds of a pass after which no further scale-up call is started (the rest waits for the
    # next pass), so one slow load cannot hold the reconcile lock for every model.
    "RECONCILE_SCALE_UP_BUDGET": 30.0,
    # How many ReconcilePass rows are kept (older ones are pruned after each pass).
    "RECONCILE_PASSES_KEPT": 1000,
    # Days of events kept (older ones are pruned by housekeeping); 0 keeps them forever.
    "RECONCILE_EVENTS_KEPT_DAYS": 30,
    # Seconds after which a `loading` row is a dead loader's leftover and is discarded (with
    # its VRAM reservation). None: GRPC_WORKER_TIMEOUT + GRPC_LOAD_TIMEOUT + 60, longer than
    # any deadline a live load has.
    "RECONCILE_STALE_LOADING_AFTER": None,
    # Seconds without any observed heartbeat change (or without any pass) after which the
    # reconciler treats heartbeats as not observable: it reaps nothing while that lasts and
    # counts every node's staleness again from when observation resumes. None:
    # HEARTBEAT_INTERVAL + 2 x RECONCILE_INTERVAL (the longest quiet a live fleet shows, plus
    # one pass of margin), kept between STALE_AFTER / 2 and STALE_AFTER.
    "RECONCILE_OBSERVATION_GAP": None,
}


def setting(name: str):
    return getattr(settings, name, DEFAULTS[name])


@dataclass(frozen=True)
class ReconcileConfig:
    """Every number a pass plans with, as plain values (the planners never read settings)."""

    stale_after: timedelta = timedelta(seconds=30)
    interval: float = 10.0
    scale_down_idle_after: timedelta = timedelta(minutes=5)
    unsatisfiable_ticks: int = 3
    unsatisfiable_cooldown: timedelta = timedelta(minutes=5)
    probe_failures_before_removal: int = 3
    probe_timeout: float = 1.0
    probe_after: timedelta = timedelta(seconds=10)
    probe_concurrency: int = 16
    worker_timeout: float = 2.0
    mass_stale_fraction: float = 0.5
    scale_up_budget: float = 30.0
    passes_kept: int = 1000
    stale_loading_after: timedelta = timedelta(seconds=210)
    events_kept_days: int = 30
    observation_gap: timedelta = timedelta(seconds=30)

    @classmethod
    def from_settings(cls) -> ReconcileConfig:
        interval = float(settings.RECONCILE_INTERVAL)
        probe_after = setting("RECONCILE_PROBE_AFTER")
        stale_loading_after = setting("RECONCILE_STALE_LOADING_AFTER")
        if stale_loading_after is None:
            stale_loading_after = float(settings.GRPC_WORKER_TIMEOUT) + float(settings.GRPC_LOAD_TIMEOUT) + 60
        stale_after = float(settings.STALE_AFTER)
        observation_gap = setting("RECONCILE_OBSERVATION_GAP")
        if observation_gap is None:
            observation_gap = float(settings.HEARTBEAT_INTERVAL) + 2 * interval
            observation_gap = min(stale_after, max(stale_after / 2, observation_gap))
        return cls(
            stale_after=timedelta(seconds=stale_after),
            observation_gap=timedelta(seconds=float(observation_gap)),
            interval=interval,
            scale_down_idle_after=timedelta(seconds=float(settings.SCALE_DOWN_IDLE_AFTER)),
            unsatisfiable_ticks=int(settings.UNSATISFIABLE_TICKS),
            unsatisfiable_cooldown=timedelta(seconds=float(settings.UNSATISFIABLE_COOLDOWN)),
            probe_failures_before_removal=int(settings.PROBE_FAILURES_BEFORE_REMOVAL),
            probe_timeout=float(settings.GRPC_PROBE_TIMEOUT),
            probe_after=timedelta(seconds=float(interval if probe_after is None else probe_after)),
            probe_concurrency=max(1, int(setting("RECONCILE_PROBE_CONCURRENCY"))),
            worker_timeout=float(setting("RECONCILE_WORKER_TIMEOUT")),
            mass_stale_fraction=float(setting("RECONCILE_MASS_STALE_FRACTION")),
            scale_up_budget=float(setting("RECONCILE_SCALE_UP_BUDGET")),
            passes_kept=max(1, int(setting("RECONCILE_PASSES_KEPT"))),
            events_kept_days=int(setting("RECONCILE_EVENTS_KEPT_DAYS")),
            stale_loading_after=timedelta(seconds=float(stale_loading_after)),
        )
