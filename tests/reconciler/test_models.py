"""The reconciler's own verbs: conditions, events, stored passes."""

from datetime import timedelta

import pytest

from reconciler.managers import ConditionState
from reconciler.models import Event, ModelCondition, ReconcilePass

pytestmark = pytest.mark.django_db

Type = ModelCondition.Type


def test_set_condition_reports_a_change_only_when_status_or_reason_changes(now):
    assert ModelCondition.objects.set_condition("llama", Type.AVAILABLE, False, "below_minimum", "0 of 1", now=now)
    later = now + timedelta(seconds=10)
    assert not ModelCondition.objects.set_condition("llama", Type.AVAILABLE, False, "below_minimum", "0 of 2", now=later)

    row = ModelCondition.objects.get(model_name="llama", type=Type.AVAILABLE)
    assert (row.message, row.since, row.updated_at) == ("0 of 2", now, later)

    latest = now + timedelta(seconds=20)
    assert ModelCondition.objects.set_condition("llama", Type.AVAILABLE, True, "minimum_replicas_ready", now=latest)
    row.refresh_from_db()
    assert (row.status, row.since) == (True, latest)


def test_set_conditions_returns_transitions_with_the_previous_state(now):
    ModelCondition.objects.set_condition("llama", Type.NO_LOAD_INFO, True, "no_load_info", now=now)

    transitions = ModelCondition.objects.set_conditions(
        [
            ConditionState("llama", Type.NO_LOAD_INFO, False, "load_info_present"),
            ConditionState("phi", Type.NO_LOAD_INFO, False, "load_info_present"),
        ],
        now=now,
    )

    by_model = {t.state.model_name: t for t in transitions}
    assert (by_model["llama"].previous_status, by_model["llama"].previous_reason) == (True, "no_load_info")
    assert by_model["phi"].is_new


def test_an_identical_condition_is_not_rewritten(now, django_assert_num_queries):
    ModelCondition.objects.set_condition("llama", Type.AVAILABLE, True, "ok", "m", now=now)
    with django_assert_num_queries(3):  # savepoint, locked read, release: no write
        ModelCondition.objects.set_condition("llama", Type.AVAILABLE, True, "ok", "m", now=now)


def test_forget_keeps_cluster_conditions(now):
    ModelCondition.objects.set_condition("", Type.REAPING_PAUSED, False, "reaping_allowed", now=now)
    ModelCondition.objects.set_condition("gone", Type.AVAILABLE, False, "below_minimum", now=now)

    assert ModelCondition.objects.forget(["gone", ""]) == 1
    assert ModelCondition.objects.cluster().exists()


def test_events_are_appended_and_pruned_by_age(now):
    old = Event.objects.record(Event.Kind.NODE_OFFLINE, node_name="gpu-a", now=now - timedelta(days=40))
    new = Event.objects.record(Event.Kind.REPLICA_ADDED, model_name="llama", details={"reason": "below_min"}, now=now)

    assert list(Event.objects.newest_first()) == [new, old]
    assert Event.objects.prune(older_than=timedelta(days=30), now=now) == 1
    assert list(Event.objects.all()) == [new]


def test_reconcile_passes_are_capped(now):
    for i in range(5):
        ReconcilePass.objects.record(
            outcome=ReconcilePass.Outcome.OK,
            started_at=now + timedelta(seconds=i),
            duration=timedelta(milliseconds=5),
            summary={"i": i},
            keep=3,
        )

    assert [p.summary["i"] for p in ReconcilePass.objects.all()] == [4, 3, 2]
    assert ReconcilePass.objects.latest_pass().finished_at == now + timedelta(seconds=4, milliseconds=5)
