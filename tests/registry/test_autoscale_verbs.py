"""The autoscaler's write verbs on PostgreSQL, with threads: record_waiting counts every
cold route exactly once; record_autoscale subtracts only what the pass consumed."""

from datetime import UTC, datetime

import pytest

from registry.models import ModelSchedulingConfig
from tests.concurrency import THREADS, run_in_threads

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_concurrent_waiting_routes_are_each_counted(close_thread_connections):
    ModelSchedulingConfig.objects.upsert("llama", target_in_flight_per_replica=8)
    counted = run_in_threads(lambda i: ModelSchedulingConfig.objects.record_waiting("llama"), close_thread_connections)
    assert all(counted)
    assert ModelSchedulingConfig.objects.get(model_name="llama").waiting_at_zero == THREADS


def test_waiting_is_not_counted_without_a_target():
    ModelSchedulingConfig.objects.upsert("plain", min_replicas=1)
    assert ModelSchedulingConfig.objects.record_waiting("plain") is False
    assert ModelSchedulingConfig.objects.get(model_name="plain").waiting_at_zero == 0


def test_recording_keeps_routes_counted_after_the_pass_read(close_thread_connections):
    ModelSchedulingConfig.objects.upsert("llama", target_in_flight_per_replica=8)
    ModelSchedulingConfig.objects.record_waiting("llama", 5)

    def act(i):
        if i == 0:
            return ModelSchedulingConfig.objects.record_autoscale([("llama", 2.5, NOW, 1, NOW, 5, NOW)])
        return ModelSchedulingConfig.objects.record_waiting("llama")

    run_in_threads(act, close_thread_connections)
    row = ModelSchedulingConfig.objects.get(model_name="llama")
    assert row.waiting_at_zero == THREADS - 1  # the 5 consumed are gone, the new ones kept
    assert (row.load_avg, row.desired_replicas, row.desired_since, row.load_sampled_at) == (2.5, 1, NOW, NOW)


def test_record_autoscale_writes_many_models_in_one_statement(django_assert_num_queries):
    for name in ("a", "b", "c"):
        ModelSchedulingConfig.objects.upsert(name, target_in_flight_per_replica=4)
    with django_assert_num_queries(1):
        written = ModelSchedulingConfig.objects.record_autoscale(
            [("a", 1.0, NOW, 1, NOW, 0, NOW), ("b", 9.0, NOW, 3, NOW, 0, NOW), ("c", 0.0, NOW, 0, NOW, 0, None)]
        )
    assert written == 3
    desired = dict(ModelSchedulingConfig.objects.values_list("model_name", "desired_replicas"))
    assert desired == {"a": 1, "b": 3, "c": 0}
    busy = dict(ModelSchedulingConfig.objects.values_list("model_name", "load_busy_at"))
    assert busy == {"a": NOW, "b": NOW, "c": None}


def test_upsert_validates_and_keeps_state():
    from django.core.exceptions import ValidationError

    ModelSchedulingConfig.objects.upsert("llama", target_in_flight_per_replica=8)
    ModelSchedulingConfig.objects.record_autoscale([("llama", 3.0, NOW, 2, NOW, 0, NOW)])
    row = ModelSchedulingConfig.objects.upsert("llama", target_in_flight_per_replica=4, downscale_delay_s=5)
    assert (row.target_in_flight_per_replica, row.downscale_delay_s, row.desired_replicas) == (4, 5, 2)
    with pytest.raises(ValidationError):
        ModelSchedulingConfig.objects.upsert("llama", target_in_flight_per_replica=0)


EVERY_DAY = {"days": "*", "start": "00:00", "end": "24:00", "min_replicas": 2}


def test_upsert_validates_the_floor_schedule_against_the_ceiling():
    from django.core.exceptions import ValidationError

    row = ModelSchedulingConfig.objects.upsert("llama", max_replicas=4, floor_schedule=[EVERY_DAY])
    assert row.floor_schedule == [EVERY_DAY]
    with pytest.raises(ValidationError) as caught:
        ModelSchedulingConfig.objects.upsert("llama", max_replicas=1, floor_schedule=[EVERY_DAY])
    assert "min_replicas 2 > max_replicas 1" in caught.value.message_dict["floor_schedule"][0]
    assert ModelSchedulingConfig.objects.get(model_name="llama").max_replicas == 4  # nothing written


def test_concurrent_upserts_of_schedules_leave_one_whole_schedule(close_thread_connections):
    # Idiom: upsert on model_name, last writer wins; each writer's schedule is written whole
    # (one row, one JSON value), never a mix of two writers' windows.
    schedules = [[{**EVERY_DAY, "min_replicas": i + 1}, {**EVERY_DAY, "min_replicas": i + 1}] for i in range(THREADS)]
    run_in_threads(
        lambda i: ModelSchedulingConfig.objects.upsert("llama", floor_schedule=schedules[i]), close_thread_connections
    )
    stored = ModelSchedulingConfig.objects.get(model_name="llama").floor_schedule
    assert stored in schedules
