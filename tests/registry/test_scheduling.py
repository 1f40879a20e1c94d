"""Scheduling config: validated upsert and the circuit breaker."""

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from registry.models import ModelSchedulingConfig
from tests.factories import count_unsatisfiable, make_scheduling, trip_breaker

pytestmark = pytest.mark.django_db


def test_upsert_creates_then_replaces_without_touching_the_breaker(now):
    make_scheduling("llama", min_replicas=1, max_replicas=3, node_selector={"zone": "a"})
    trip_breaker("llama", until=now + timedelta(minutes=5), now=now)
    count_unsatisfiable("llama", 2, now=now)

    config = ModelSchedulingConfig.objects.upsert("llama", min_replicas=2, max_replicas=0)

    assert (config.min_replicas, config.max_replicas, config.node_selector) == (2, 0, {})
    assert (config.unsatisfiable_ticks, config.unsatisfiable_until) == (2, now + timedelta(minutes=5))
    assert ModelSchedulingConfig.objects.count() == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"max_replicas": -2}, "max_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"min_replicas": "2"}, "min_replicas"),
        ({"node_selector": ["zone"]}, "node_selector"),
        ({"node_selector": {"zone": 1}}, "node_selector"),
    ],
)
def test_upsert_validates_and_writes_nothing_on_error(kwargs, field):
    make_scheduling("llama", min_replicas=1)
    with pytest.raises(ValidationError) as error:
        ModelSchedulingConfig.objects.upsert("llama", **kwargs)
    assert field in error.value.message_dict
    assert ModelSchedulingConfig.objects.get().min_replicas == 1


def test_min_above_max_is_also_a_database_constraint():
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelSchedulingConfig.objects.create(model_name="llama", min_replicas=3, max_replicas=2)


def test_autoscaled_means_min_or_max_set():
    make_scheduling("off")
    make_scheduling("floor", min_replicas=1)
    make_scheduling("ceiling", max_replicas=2)
    assert set(ModelSchedulingConfig.objects.autoscaled().values_list("model_name", flat=True)) == {"floor", "ceiling"}
    assert not ModelSchedulingConfig.objects.get(model_name="off").is_autoscaled


def test_breaker_trips_after_threshold_passes_and_clears(now):
    make_scheduling("llama", min_replicas=1)
    trips = [
        ModelSchedulingConfig.objects.record_unsatisfiable("llama", threshold=3, cooldown=timedelta(minutes=5), now=now)
        for _ in range(3)
    ]
    assert trips == [False, False, True]
    config = ModelSchedulingConfig.objects.get()
    assert (config.unsatisfiable_ticks, config.unsatisfiable_until) == (0, now + timedelta(minutes=5))

    assert ModelSchedulingConfig.objects.clear_cooldown("llama")
    config.refresh_from_db()
    assert (config.unsatisfiable_ticks, config.unsatisfiable_until) == (0, None)
    assert not ModelSchedulingConfig.objects.clear_cooldown("llama")


def test_a_satisfiable_pass_resets_the_count(now):
    make_scheduling("llama", min_replicas=1)
    ModelSchedulingConfig.objects.record_unsatisfiable("llama", threshold=3, cooldown=timedelta(minutes=5), now=now)
    assert ModelSchedulingConfig.objects.record_satisfiable("llama")
    assert ModelSchedulingConfig.objects.get().unsatisfiable_ticks == 0


def test_remove_forgets_the_config_but_not_replicas_or_load_info(now):
    from registry.models import ModelLoadInfo, NodeModel
    from tests.factories import make_node, make_replica

    make_scheduling("llama", min_replicas=1)
    make_replica(make_node(), "llama", 0)
    ModelLoadInfo.objects.upsert("llama", "echo", b"x", now=now)

    assert ModelSchedulingConfig.objects.remove("llama")
    assert not ModelSchedulingConfig.objects.remove("llama")
    assert NodeModel.objects.for_model("llama").exists()
    assert ModelLoadInfo.objects.for_model("llama").model_opts_blob == b"x"
