"""The load-aware autoscaling rule (docs/autoscaling.md): pure functions, no database.

Per model with ``target_in_flight_per_replica`` set:

- the load is the in-flight requests (live leases) of its replicas, averaged over a look-back
  window (``average``: a time-weighted moving average sampled once per pass, so no sample
  table grows and a pass writes one number per model);
- ``desired = ceil(load / target)`` clamped to ``[floor, max_replicas]`` (``0`` = no ceiling);
  the floor is ``min_replicas`` (a model with ``min_replicas = 0`` may go to zero);
- a model at zero replicas sizes its wake-up from the routes that found no replica
  (``waiting``): 40 waiting requests at target 8 ask for 5 replicas, not 1;
- a change of desire is acted on only once it has held for ``upscale_delay_s`` (more replicas)
  or ``downscale_delay_s`` (fewer): ``decide``.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import NamedTuple


def average(
    previous: float,
    sampled_at: datetime | None,
    current: float,
    now: datetime,
    window: timedelta,
    *,
    busy_at: datetime | None = None,
) -> float:
    """The in-flight average over ``window`` after sampling ``current`` at ``now``.

    A time-weighted exponential moving average: the previous average keeps the weight
    ``exp(-elapsed / window)``, the new sample takes the rest. The first sample, or one after
    a gap longer than the window, is the average itself. ``busy_at``: the last sample with
    something in flight (None: none seen); a whole window of empty samples since then is a
    load of exactly 0 (an exponential average alone only tends to 0, and at ``ceil`` even
    0.001 asks for a replica: a model could never scale to zero).
    """
    if current == 0 and (busy_at is None or now - busy_at >= window):
        return 0.0
    if sampled_at is None or window.total_seconds() <= 0:
        return float(current)
    elapsed = (now - sampled_at).total_seconds()
    if elapsed <= 0:
        return float(previous)
    if elapsed >= window.total_seconds():
        return float(current)
    keep = math.exp(-elapsed / window.total_seconds())
    return keep * previous + (1.0 - keep) * current


def desired_replicas(load: float, target: int, *, min_replicas: int, max_replicas: int, waiting: int = 0) -> int:
    """``ceil(max(load, waiting) / target)`` clamped to ``[min_replicas, max_replicas]``
    (``max_replicas = 0``: no ceiling). ``waiting``: requests that found no replica while the
    model was at zero (they are load the window has not seen yet)."""
    if target <= 0:
        raise ValueError("target must be positive")
    demand = max(load, float(waiting))
    # A float average such as 16.000000001 must not ask for a third replica at target 8.
    wanted = math.ceil(round(demand / target, 6))
    wanted = max(wanted, min_replicas)
    if max_replicas > 0:
        wanted = min(wanted, max_replicas)
    return wanted


class Decision(NamedTuple):
    """What the rule does this pass for one model.

    ``desired``: the clamped count the load asks for now. ``since``: when that desire started
    to hold (kept across passes). ``target``: the replica count to act on now (``current``
    until a delay has passed). ``reason``: ``steady``, ``up_pending``, ``down_pending``,
    ``scale_up`` or ``scale_down``.
    """

    desired: int
    since: datetime
    target: int
    reason: str


def decide(
    *,
    current: int,
    desired: int,
    previous_desired: int | None,
    previous_since: datetime | None,
    now: datetime,
    upscale_delay: timedelta,
    downscale_delay: timedelta,
    waking: bool = False,
) -> Decision:
    """Apply the delays: act on ``desired`` only once it has been wanted (on the same side of
    ``current``) for the delay of its direction. A desire that changes value but stays on the
    same side keeps its ``since`` (a load climbing 3 -> 4 -> 5 does not restart the clock).
    ``waking``: routes are waiting on a model at zero: no delay (they wait for a replica).
    """
    if desired == current:
        return Decision(desired, now if previous_desired != desired else (previous_since or now), current, "steady")
    up = desired > current
    same_side = previous_desired is not None and previous_since is not None and (previous_desired > current) == up
    same_side = same_side and previous_desired != current
    since = previous_since if same_side else now
    delay = upscale_delay if up else downscale_delay
    if (up and waking) or now - since >= delay:
        return Decision(desired, since, desired, "scale_up" if up else "scale_down")
    return Decision(desired, since, current, "up_pending" if up else "down_pending")


def explain(load: float, window: timedelta, target: int, desired: int, waiting: int = 0) -> str:
    """The sentence an event and a condition carry: why this many replicas."""
    text = f"in-flight {load:.1f} avg over {int(window.total_seconds())}s, target {target}"
    if waiting:
        text += f", {waiting} waiting at zero"
    return f"{text} -> {desired} replicas"
