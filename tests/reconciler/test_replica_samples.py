"""The desired vs ready history the dashboard charts: a pass that changes a model's ready count
(or floor) appends a sample; a steady pass writes none; the history has the window's samples and
the value the model had when the window opened."""

from datetime import timedelta

import pytest

from reconciler.models import ReplicaSample
from registry.models import ModelSchedulingConfig
from tests.factories import make_node, make_scheduling

pytestmark = pytest.mark.django_db


@pytest.fixture
def reconcile(reconcile):
    def run(at=None, **overrides):
        return reconcile(at, heartbeat=True, **overrides)

    return run


def samples(model):
    return list(ReplicaSample.objects.filter(model_name=model).values_list("at", "ready", "desired"))


def test_a_scale_up_writes_the_changes_and_a_steady_pass_none(now, reconcile, load_info):
    make_node(name="gpu-a", now=now)
    make_node(name="gpu-b", now=now)
    make_scheduling("llama", min_replicas=2)
    load_info("llama")

    reconcile()  # both replicas added in this pass: 2 of 2 ready
    assert samples("llama") == [(now, 2, 2)]
    reconcile(at=now + timedelta(seconds=10))
    reconcile(at=now + timedelta(seconds=20))
    assert samples("llama") == [(now, 2, 2)]  # nothing changed: nothing written

    ModelSchedulingConfig.objects.upsert("llama", min_replicas=1, max_replicas=0)
    reconcile(at=now + timedelta(seconds=30))
    assert samples("llama")[-1][1:] == (2, 1)  # the floor went down, ready did not (yet)


def test_history_keeps_the_value_at_the_start_of_the_window_and_prunes_after_two_hours(now):
    ReplicaSample.objects.record_changes([("llama", 0, 2), ("whisper", 1, 1)], now=now - timedelta(minutes=90))
    ReplicaSample.objects.record_changes([("llama", 1, 2)], now=now - timedelta(minutes=70))
    ReplicaSample.objects.record_changes([("llama", 2, 2)], now=now - timedelta(minutes=10))
    history = ReplicaSample.objects.history(["llama", "whisper", "absent"], since=now - timedelta(hours=1))
    assert history["llama"] == [(now - timedelta(minutes=70), 1, 2), (now - timedelta(minutes=10), 2, 2)]
    assert history["whisper"] == [(now - timedelta(minutes=90), 1, 1)]
    assert history["absent"] == []

    ReplicaSample.objects.record_changes([("whisper", 0, 1)], now=now + timedelta(minutes=45))
    assert not ReplicaSample.objects.filter(at__lt=now - timedelta(minutes=75)).exists()
    assert ReplicaSample.objects.record_changes([], now=now) == 0
