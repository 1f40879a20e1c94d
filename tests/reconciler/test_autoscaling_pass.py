"""Load-aware autoscaling and scheduled floors through whole passes (``reconcile_once`` with the
one-by-one scheduler of the reconciler tests; the load pool's path runs end to end in
``tests/e2e/test_autoscaling.py``): in-flight comes from real leases."""

from datetime import timedelta

import pytest

from reconciler.models import Event, ModelCondition
from registry.models import Lease, ModelSchedulingConfig, NodeModel
from tests.factories import make_node, make_replica

pytestmark = pytest.mark.django_db

Type = ModelCondition.Type


@pytest.fixture
def reconcile(reconcile):
    def run(at=None, **overrides):
        return reconcile(at, heartbeat=True, **overrides)

    return run


def replicas(model_name="llama"):
    return NodeModel.objects.filter(model_name=model_name).count()


def test_held_leases_scale_up_after_the_delay_with_an_autoscaled_event(now, reconcile, load_info):
    nodes = [make_node(name=f"n{i}", slots=2, now=now) for i in range(3)]
    make_replica(nodes[0], "llama", 0, address="10.9.0.1:7000")
    load_info("llama")
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=1, target_in_flight_per_replica=2, upscale_delay_s=20)
    for _ in range(5):  # 5 in flight at target 2 -> 3 replicas
        assert Lease.objects.pick_and_grant("llama", ttl=600, now=now) is not None

    reconcile(now)
    assert replicas() == 1
    progressing = ModelCondition.objects.get(model_name="llama", type=Type.PROGRESSING)
    assert progressing.reason == "scale_up_pending", progressing.message

    reconcile(now + timedelta(seconds=20))
    assert replicas() == 3
    event = Event.objects.get(kind=Event.Kind.AUTOSCALED, model_name="llama")
    assert event.message.endswith("target 2 -> 3 replicas (1 -> 3)"), event.message
    assert event.details["desired"] == 3 and event.details["added"] == 2
    assert ModelSchedulingConfig.objects.get(model_name="llama").desired_replicas == 3


def test_an_open_floor_window_scales_up_to_its_floor_and_a_closed_one_does_not(now, reconcile, load_info):
    make_node(name="n0", slots=4, now=now)
    load_info("llama")
    today = now.strftime("%a").lower()
    hour = now.hour
    window = {
        "days": today,
        "start": f"{hour:02d}:00",
        "end": "24:00" if hour == 23 else f"{hour + 1:02d}:00",
        "min_replicas": 2,
    }
    ModelSchedulingConfig.objects.upsert("llama", min_replicas=0, max_replicas=4, floor_schedule=[window])
    reconcile(now)
    assert replicas() == 2
    added = Event.objects.filter(kind=Event.Kind.REPLICA_ADDED, model_name="llama")
    assert added.count() == 2 and all("min 2" in e.message for e in added)

    # A closed window (yesterday's day name) leaves a model with no floor alone.
    yesterday = (now - timedelta(days=1)).strftime("%a").lower()
    ModelSchedulingConfig.objects.upsert("other", max_replicas=4, floor_schedule=[{**window, "days": yesterday}])
    load_info("other")
    reconcile(now + timedelta(seconds=10))
    assert replicas("other") == 0
