"""The reconciler's knobs, read from Django settings at the start of every pass.

Every setting and its default is defined once, in ``controlplane/settings.py`` (the
``Reconciler`` and ``Timing`` groups). Reading them per pass (not at import) keeps
``override_settings`` working in tests; a test that needs other numbers builds
``dataclasses.replace(ReconcileConfig.from_settings(), ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings


@dataclass(frozen=True)
class ReconcileConfig:
    """Every number a pass plans with, as plain values (the planners never read settings).
    No defaults of its own: ``from_settings`` is the only constructor production uses."""

    stale_after: timedelta
    interval: float
    scale_down_idle_after: timedelta
    autoscale_window: timedelta
    unsatisfiable_ticks: int
    unsatisfiable_cooldown: timedelta
    probe_failures_before_removal: int
    worker_failures_before_unhealthy: int
    probe_timeout: float
    probe_after: timedelta
    probe_concurrency: int
    worker_timeout: float
    mass_stale_fraction: float
    scale_up_budget: float
    load_concurrency: int
    passes_kept: int
    stale_loading_after: timedelta
    events_kept_days: int
    observation_gap: timedelta
    rollout_drain_timeout: timedelta

    @classmethod
    def from_settings(cls) -> ReconcileConfig:
        """The settings as a config; the settings left unset derive from others as
        ``controlplane/settings.py`` documents."""
        interval = float(settings.RECONCILE_INTERVAL)
        probe_after = settings.RECONCILE_PROBE_AFTER
        stale_loading_after = settings.RECONCILE_STALE_LOADING_AFTER
        if stale_loading_after is None:
            stale_loading_after = float(settings.GRPC_WORKER_TIMEOUT) + float(settings.GRPC_LOAD_TIMEOUT) + 60
        stale_after = float(settings.STALE_AFTER)
        observation_gap = settings.RECONCILE_OBSERVATION_GAP
        if observation_gap is None:
            observation_gap = float(settings.HEARTBEAT_INTERVAL) + 2 * interval
            observation_gap = min(stale_after, max(stale_after / 2, observation_gap))
        return cls(
            stale_after=timedelta(seconds=stale_after),
            observation_gap=timedelta(seconds=float(observation_gap)),
            interval=interval,
            scale_down_idle_after=timedelta(seconds=float(settings.SCALE_DOWN_IDLE_AFTER)),
            autoscale_window=timedelta(seconds=max(0.0, float(settings.AUTOSCALE_WINDOW_SECONDS))),
            unsatisfiable_ticks=int(settings.UNSATISFIABLE_TICKS),
            unsatisfiable_cooldown=timedelta(seconds=float(settings.UNSATISFIABLE_COOLDOWN)),
            probe_failures_before_removal=int(settings.PROBE_FAILURES_BEFORE_REMOVAL),
            worker_failures_before_unhealthy=max(1, int(settings.RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY)),
            probe_timeout=float(settings.GRPC_PROBE_TIMEOUT),
            probe_after=timedelta(seconds=float(interval if probe_after is None else probe_after)),
            probe_concurrency=max(1, int(settings.RECONCILE_PROBE_CONCURRENCY)),
            worker_timeout=float(settings.RECONCILE_WORKER_TIMEOUT),
            mass_stale_fraction=float(settings.RECONCILE_MASS_STALE_FRACTION),
            scale_up_budget=float(settings.RECONCILE_SCALE_UP_BUDGET),
            load_concurrency=max(1, int(settings.RECONCILE_LOAD_CONCURRENCY)),
            passes_kept=max(1, int(settings.RECONCILE_PASSES_KEPT)),
            events_kept_days=int(settings.RECONCILE_EVENTS_KEPT_DAYS),
            stale_loading_after=timedelta(seconds=float(stale_loading_after)),
            rollout_drain_timeout=timedelta(seconds=float(settings.ROLLOUT_DRAIN_TIMEOUT)),
        )
