"""The last hour of the fleet as charts (``charts.py``): reconcile passes, cold loads and each
model's ready vs desired replicas. One query per chart, bounded by the window."""

from __future__ import annotations

from datetime import datetime, timedelta

from registry.models import LoadJob

from ..models import ReconcilePass, ReplicaSample
from . import charts

WINDOW = timedelta(hours=1)
PASSES_CHARTED = 720  # one pass every 5 s for an hour; more frequent passes show the newest
LOADS_CHARTED = 500


def pass_marks(*, since: datetime) -> list[tuple[datetime, float, str, int]]:
    """``(started_at, seconds, outcome, actions)`` of the passes since ``since``, oldest first."""
    rows = (
        ReconcilePass.objects.filter(started_at__gte=since)
        .order_by("-started_at", "-id")
        .values_list("started_at", "duration", "outcome", "summary")[:PASSES_CHARTED]
    )
    return [
        (started, duration.total_seconds(), outcome, sum(((summary or {}).get("actions") or {}).values()))
        for started, duration, outcome, summary in reversed(rows)
    ]


def pass_charts(*, now: datetime) -> dict:
    """The pass duration and the actions per pass over the last hour (bars coloured by outcome)."""
    start = now - WINDOW
    passes = pass_marks(since=start)
    durations = [
        charts.Mark(at, seconds, f"outcome-{outcome}", f"{at:%H:%M:%S} {outcome}: {seconds:.2f} s")
        for at, seconds, outcome, _ in passes
    ]
    actions = [
        charts.Mark(at, count, f"outcome-{outcome}", f"{at:%H:%M:%S}: {count} action(s)")
        for at, _, outcome, count in passes
    ]
    return {
        "pass_count": len(passes),
        "pass_durations": charts.bars(
            durations, start=start, end=now, unit="s", label="Reconcile pass duration, last hour"
        ),
        "pass_actions": charts.bars(actions, start=start, end=now, label="Actions per reconcile pass, last hour"),
    }


def cold_load_chart(*, now: datetime) -> dict:
    """How long each cold load through the router (a load job) took, by when it ended; failed
    ones in red."""
    start = now - WINDOW
    rows = (
        LoadJob.objects.filter(finished_at__gte=start, state__in=LoadJob.FINISHED_STATES)
        .order_by("-finished_at")
        .values_list("model_name", "state", "created_at", "finished_at", "error_code")[:LOADS_CHARTED]
    )
    marks = [
        charts.Mark(
            finished,
            (finished - created).total_seconds(),
            f"load-{state}",
            f"{model} {state}{f' ({error})' if error else ''}: {(finished - created).total_seconds():.1f} s",
        )
        for model, state, created, finished, error in rows
    ]
    return {
        "load_count": len(marks),
        "cold_loads": charts.dots(marks, start=start, end=now, unit="s", label="Cold load durations, last hour"),
    }


def replica_charts(rows: list[dict], *, now: datetime) -> None:
    """Add ``chart`` to each model row (``dashboard.model_row``): its ready and floor replica
    counts over the last hour, from the samples the passes wrote, ending at the current
    counts."""
    start = now - WINDOW
    history = ReplicaSample.objects.history([row["name"] for row in rows], since=start)
    for row in rows:
        samples = history[row["name"]]
        ready = [(max(at, start), value) for at, value, _ in samples] + [(now, row["ready"])]
        floor = [(max(at, start), value) for at, _, value in samples] + [(now, row["floor"])]
        row["chart"] = charts.steps(
            [("floor", "line-floor", floor), ("ready", "line-ready", ready)],
            start=start,
            end=now,
            label=f"{row['name']}: ready vs floor, last hour",
        )
