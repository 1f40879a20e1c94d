"""Verbs that write the reconciler's own tables (events, conditions, passes, unanswered
worker listings), one each.

Only the reconciler writes these tables, and its passes are serialised by the reconcile lock,
so the idioms here guard against the rare overlap (an operator's "reconcile now" racing a
scheduled pass that lost its lock) rather than against sustained contention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from django.db import IntegrityError, models, transaction
from django.db.models import F
from django.utils import timezone


def _now(now: datetime | None) -> datetime:
    return now if now is not None else timezone.now()


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class EventQuerySet(models.QuerySet):
    def newest_first(self):
        return self.order_by("-created_at", "-id")

    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def for_node(self, node_id):
        return self.filter(node_id=node_id)

    def of_kind(self, *kinds: str):
        return self.filter(kind__in=kinds)


class EventManager(models.Manager.from_queryset(EventQuerySet)):
    def build(
        self,
        kind: str,
        *,
        model_name: str = "",
        node_id=None,
        node_name: str = "",
        message: str = "",
        details: dict | None = None,
        now: datetime | None = None,
    ):
        """An unsaved event; pass a list of these to ``record_many``."""
        return self.model(
            created_at=_now(now),
            kind=kind,
            model_name=model_name or "",
            node_id=node_id,
            node_name=node_name or "",
            message=message,
            details=details or {},
        )

    def record_many(self, events: Iterable) -> list:
        """Append events (built with ``build``) in one INSERT; returns the saved events.
        Idiom: append-only insert (events are never updated, so there is nothing to lock)."""
        events = list(events)
        if not events:
            return []
        return self.bulk_create(events)

    def record(self, kind: str, **fields):
        """Append one event (``build``'s arguments) and return it. Idiom: append (``record_many``)."""
        return self.record_many([self.build(kind, **fields)])[0]

    def prune(self, *, older_than: timedelta, now: datetime | None = None) -> int:
        """Delete events older than ``older_than``; returns how many went. Idiom: one DELETE
        by age (append-only rows: nothing else writes them)."""
        deleted, _ = self.filter(created_at__lt=_now(now) - older_than).delete()
        return deleted


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


class ConditionState(NamedTuple):
    """The desired value of one condition, as a plan computes it (a named tuple: a pass
    builds four per model)."""

    model_name: str
    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True)
class ConditionTransition:
    """A condition whose status or reason changed (``previous`` is None when it is new)."""

    state: ConditionState
    previous_status: bool | None
    previous_reason: str | None

    @property
    def is_new(self) -> bool:
        return self.previous_status is None


def _same_condition(row: Mapping | None, state: ConditionState) -> bool:
    """Whether a stored condition (``as_map``'s values) already says what ``state`` says."""
    return (
        row is not None
        and row["status"] == state.status
        and row["reason"] == state.reason
        and row["message"] == state.message
    )


class ModelConditionQuerySet(models.QuerySet):
    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def cluster(self):
        return self.filter(model_name=self.model.CLUSTER)

    def as_map(self) -> dict[tuple[str, str], dict]:
        """``{(model_name, type): {status, reason, message, since}}`` in one query."""
        return {
            (row["model_name"], row["type"]): row
            for row in self.values("model_name", "type", "status", "reason", "message", "since")
        }


class ModelConditionManager(models.Manager.from_queryset(ModelConditionQuerySet)):
    # Above this many models one pass reads the whole (small) table instead of a long IN list.
    _IN_LIST_LIMIT = 500

    def set_conditions(
        self,
        states: Iterable[ConditionState],
        *,
        now: datetime | None = None,
        known: Mapping[tuple[str, str], Mapping] | None = None,
    ) -> list[ConditionTransition]:
        """Upsert conditions and return the ones whose ``status`` or ``reason`` changed.

        A changed status/reason moves ``since`` to ``now``; a new message alone is written
        without counting as a transition (so events are recorded once per state change, not
        every pass); an identical condition is not written at all.

        ``known``: the conditions as the caller read them shortly before (``as_map``, or the
        reconciler's snapshot: ``status``, ``reason`` and ``message`` per key). A state equal
        to its known row is left alone without being read again, so a pass in which nothing
        changed sends no query here; the others are re-read and written as below. (A row
        another writer changed since ``known`` was read is corrected by the next pass.)

        Idiom: row lock. The current rows are read with ``SELECT ... FOR UPDATE`` and the
        changed ones written with one ``INSERT ... ON CONFLICT (model_name, type) DO UPDATE``
        in the same short transaction, so two overlapping writers cannot both report the same
        transition. A fixed number of queries however many conditions are given.
        """
        now = _now(now)
        if known is None:
            states = {(s.model_name, s.type): s for s in states}
        else:
            states = {
                (s.model_name, s.type): s for s in states if not _same_condition(known.get((s.model_name, s.type)), s)
            }
        if not states:
            return []
        names = {name for name, _ in states}
        with transaction.atomic():
            current = self.select_for_update()
            if len(names) <= self._IN_LIST_LIMIT:
                current = current.filter(model_name__in=names)
            current = current.as_map()
            rows, transitions = [], []
            for key, state in states.items():
                old = current.get(key)
                changed = old is None or old["status"] != state.status or old["reason"] != state.reason
                if not changed and old["message"] == state.message:
                    continue
                if changed:
                    transitions.append(
                        ConditionTransition(
                            state,
                            None if old is None else old["status"],
                            None if old is None else old["reason"],
                        )
                    )
                rows.append(
                    self.model(
                        model_name=state.model_name,
                        type=state.type,
                        status=state.status,
                        reason=state.reason,
                        message=state.message,
                        since=now if changed else old["since"],
                        updated_at=now,
                    )
                )
            if rows:
                self.bulk_create(
                    rows,
                    update_conflicts=True,
                    unique_fields=["model_name", "type"],
                    update_fields=["status", "reason", "message", "since", "updated_at"],
                )
        return transitions

    def set_condition(
        self, model_name: str, type: str, status: bool, reason: str, message: str = "", *, now: datetime | None = None
    ) -> bool:
        """Upsert one condition; True when status or reason changed. Idiom: upsert
        (``set_conditions``)."""
        return bool(self.set_conditions([ConditionState(model_name, type, status, reason, message)], now=now))

    def forget(self, model_names: Iterable[str]) -> int:
        """Delete every condition of models nobody knows any more; returns rows deleted.
        Idiom: one conditional DELETE (a model known again gets its rows back next pass)."""
        model_names = [name for name in model_names if name != self.model.CLUSTER]
        if not model_names:
            return 0
        deleted, _ = self.filter(model_name__in=model_names).delete()
        return deleted


# --------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------


class ReconcilePassManager(models.Manager):
    def record(
        self,
        *,
        outcome: str,
        started_at: datetime,
        duration: timedelta,
        summary: dict,
        holder_host: str = "",
        holder_pid: int | None = None,
        keep: int | None = None,
    ):
        """Store one pass and, with ``keep``, prune all but the newest ``keep`` rows.

        Idiom: append (one INSERT; pass rows are never updated), then ``prune``. Pruning
        deletes by id below the ``keep``-th newest (ids grow with time), two queries whatever
        the table size. Returns the saved row.
        """
        row = self.create(
            outcome=outcome,
            started_at=started_at,
            finished_at=started_at + duration,
            duration=duration,
            summary=summary,
            holder_host=holder_host[:255],
            holder_pid=holder_pid,
        )
        if keep is not None:
            self.prune(keep=keep)
        return row

    def prune(self, *, keep: int) -> int:
        """Delete all but the newest ``keep`` passes (by id); returns how many went. Idiom: one
        DELETE below a boundary id read just before (an overlapping pass can only add newer
        rows, never make the DELETE take a kept one)."""
        boundary = self.order_by("-id").values_list("id", flat=True)[keep : keep + 1]
        boundary = list(boundary)
        if not boundary:
            return 0
        deleted, _ = self.filter(id__lte=boundary[0]).delete()
        return deleted

    def last_ok_finished_at(self) -> datetime | None:
        """When the newest ``ok`` pass (of any process) ended, or None: the reconciler's last
        observation of the fleet before the pass now running."""
        return self.filter(outcome="ok").order_by("-id").values_list("finished_at", flat=True).first()

    def latest_pass(self):
        return self.order_by("-id").first()


# --------------------------------------------------------------------------------------------
# Replica samples (the dashboard's desired vs ready history)
# --------------------------------------------------------------------------------------------

# Kept twice the dashboard's one-hour window, so the value a model had when the window opens is
# usually still there.
REPLICA_SAMPLES_KEPT = timedelta(hours=2)


class ReplicaSampleManager(models.Manager):
    def record_changes(self, samples: Iterable[tuple[str, int, int]], *, now: datetime | None = None) -> int:
        """Append one row per ``(model, ready, desired)`` that changed this pass, and prune the
        rows older than ``REPLICA_SAMPLES_KEPT``. Returns how many were written.

        Idiom: append-only (one bulk INSERT), then one DELETE by age; only the reconciler writes
        here, under its lock. Called only when something changed, so a steady pass sends no
        query here and a model's history is a step function of its changes.
        """
        at = _now(now)
        rows = [self.model(model_name=name, at=at, ready=ready, desired=desired) for name, ready, desired in samples]
        if not rows:
            return 0
        self.bulk_create(rows)
        self.filter(at__lt=at - REPLICA_SAMPLES_KEPT).delete()
        return len(rows)

    def history(self, model_names: Iterable[str], *, since: datetime) -> dict[str, list[tuple[datetime, int, int]]]:
        """``{model: [(at, ready, desired), ...]}`` oldest first, for the samples since ``since``
        plus the newest one before it (the value each model had when the window opened), in one
        query."""
        names = list(model_names)
        history: dict[str, list] = {name: [] for name in names}
        if not names:
            return history
        before = self.filter(model_name=models.OuterRef("model_name"), at__lt=since).order_by("-at", "-id")
        rows = (
            self.filter(model_name__in=names)
            .filter(models.Q(at__gte=since) | models.Q(id=models.Subquery(before.values("id")[:1])))
            .order_by("model_name", "at", "id")
            .values_list("model_name", "at", "ready", "desired")
        )
        for name, at, ready, desired in rows:
            history[name].append((at, ready, desired))
        return history


# --------------------------------------------------------------------------------------------
# Unanswered worker listings
# --------------------------------------------------------------------------------------------


class UnansweredListingManager(models.Manager):
    def record_unanswered(self, node_id, *, heartbeat, error: str, now: datetime | None = None) -> int:
        """Count one more pass in which the node's worker did not answer ``ListBackends``
        although the node heartbeated (``heartbeat``: its ``last_heartbeat``, kept in
        ``counted_heartbeat``); returns the streak's length (0: the node is gone).

        Idiom: upsert. The row is created at the first failure of a streak (``since``), then
        incremented with an ``F()`` UPDATE; only the reconcile lock's holder calls it, so an
        overlap is at most an operator's pass racing a scheduled one (both counts land). A node
        deleted meanwhile is an IntegrityError on the foreign key: no streak, 0.
        """
        now = _now(now)
        error = (error or "")[:1000]
        try:
            with transaction.atomic():
                row, created = self.get_or_create(
                    node_id=node_id,
                    defaults={
                        "failures": 1,
                        "since": now,
                        "counted_heartbeat": heartbeat,
                        "last_error": error,
                        "updated_at": now,
                    },
                )
                if created:
                    return 1
                self.filter(pk=row.pk).update(
                    failures=F("failures") + 1, counted_heartbeat=heartbeat, last_error=error, updated_at=now
                )
                return self.filter(pk=row.pk).values_list("failures", flat=True).get()
        except IntegrityError:
            return 0

    def clear(self, node_id) -> bool:
        """End the node's streak of unanswered listings: its worker answered, or the node went
        offline (back, a new streak counts from one). Idiom: one conditional DELETE; True when
        there was a streak."""
        deleted, _ = self.filter(node_id=node_id).delete()
        return deleted > 0
