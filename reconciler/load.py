"""Load-aware autoscaling's reading of one model per pass (pure; ``registry.autoscale`` holds
the rule, ``planning.plan_model`` acts on the decision)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from registry import autoscale

from .conf import ReconcileConfig
from .snapshot import ConfigView


class LoadDecision(NamedTuple):
    """Load-aware autoscaling's reading of one model this pass (``registry.autoscale``):
    recorded every pass (``ModelSchedulingConfig.objects.record_autoscale``)."""

    in_flight: int  # live leases on its ready replicas now
    average: float  # over the look-back window, this sample included
    desired: int  # ceil(load / target) clamped to [min, max]
    since: datetime  # since when that desire holds
    reason: str  # steady | up_pending | down_pending | scale_up | scale_down
    target: int  # replica count to act on this pass
    waiting: int  # routes counted at zero that sized this desire (consumed once read)
    message: str
    busy_at: datetime | None = None  # the last pass that saw something in flight


def plan_load(config: ConfigView, ready, current: int, cfg: ReconcileConfig, *, now: datetime) -> LoadDecision:
    """The load-aware rule for one model with ``target_in_flight_per_replica`` (pure)."""
    in_flight = 0
    for replica in ready:
        in_flight += replica.in_flight
    window = cfg.autoscale_window
    busy_at = now if in_flight else config.load_busy_at
    average = autoscale.average(config.load_avg, config.load_sampled_at, in_flight, now, window, busy_at=busy_at)
    # Routes count themselves only when they find no ready replica (``router._cold``): the
    # count is demand that arrived at zero, even when the woken replica is ready by now.
    waiting = config.waiting_at_zero
    # That demand is load the window has not seen yet: it enters the average, which then decays
    # as usual, so the passes after the wake-up do not read the empty window as a fall in load
    # (and, after the downscale delay, remove the replicas the wake-up added).
    average = max(average, float(waiting))
    desired = autoscale.desired_replicas(
        average, config.target, min_replicas=config.min_replicas, max_replicas=config.max_replicas, waiting=waiting
    )
    decision = autoscale.decide(
        current=current,
        desired=desired,
        previous_desired=config.desired_replicas,
        previous_since=config.desired_since,
        now=now,
        upscale_delay=timedelta(seconds=config.upscale_delay_s),
        downscale_delay=timedelta(seconds=config.downscale_delay_s),
        waking=waiting > 0,
    )
    message = autoscale.explain(average, window, config.target, desired, waiting)
    return LoadDecision(
        in_flight, average, desired, decision.since, decision.reason, decision.target, waiting, message, busy_at
    )
