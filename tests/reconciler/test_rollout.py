"""The rollout applied by real passes (database, the fake scheduler and prober of the other
reconciler tests): a load-info change replaces every replica one at a time, the floor held at
every pass; Progressing and the events tell the story; a rollback rolls back."""

from datetime import timedelta

import pytest

from reconciler.models import Event, ModelCondition
from registry.models import Lease, ModelLoadInfo, ModelRevision, NodeModel
from tests.factories import make_node, make_scheduling

pytestmark = pytest.mark.django_db

Type = ModelCondition.Type
OLD, NEW = b"\n\x05llama", b"\n\x05llama\x10\x01"


def progressing():
    return ModelCondition.objects.get(model_name="llama", type=Type.PROGRESSING)


def ready():
    return NodeModel.objects.ready().filter(model_name="llama", draining_since__isnull=True)


def roll(reconcile, now, passes=20):
    """Passes every 10 s until nothing is outdated; the floor is checked after every pass."""
    seen = []
    for i in range(passes):
        reconcile(at=now + timedelta(seconds=10 * i), heartbeat=True)
        assert ready().count() >= 2, f"below the floor after pass {i}"
        seen.append(progressing().reason)
        revisions = set(NodeModel.objects.filter(model_name="llama").values_list("revision", flat=True))
        if revisions == {ModelRevision.objects.head("llama").number} and seen[-1] == "rollout_complete":
            return seen
    pytest.fail(f"did not finish: {seen}")


def test_a_load_info_change_rolls_every_replica_and_a_rollback_rolls_back(now, reconcile):
    make_node(name="a", slots=2, now=now)
    make_node(name="b", slots=2, now=now)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", OLD)
    make_scheduling("llama", min_replicas=2)
    reconcile(at=now, heartbeat=True)
    assert set(ready().values_list("revision", flat=True)) == {2}

    ModelLoadInfo.objects.upsert("llama", "llama-cpp", NEW)
    seen = roll(reconcile, now + timedelta(minutes=1))

    assert "rolling_out" in seen
    assert set(NodeModel.objects.filter(model_name="llama").values_list("revision", flat=True)) == {3}
    kinds = list(Event.objects.filter(model_name="llama").order_by("id").values_list("kind", flat=True))
    assert kinds.count("rollout_started") == 1 and kinds.count("rollout_complete") == 1
    assert kinds.count("replica_draining") == 2
    removed = Event.objects.filter(model_name="llama", kind="replica_removed")
    assert [e.details["reason"] for e in removed] == ["rollout", "rollout"]

    ModelRevision.objects.rollback("llama", 2)
    roll(reconcile, now + timedelta(minutes=10))
    assert set(NodeModel.objects.filter(model_name="llama").values_list("revision", flat=True)) == {4}
    assert ModelLoadInfo.objects.for_model("llama").model_opts_blob == OLD


def test_a_draining_replica_with_a_lease_waits_for_it(now, reconcile):
    make_node(name="a", slots=2, now=now)
    make_node(name="b", slots=2, now=now)
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", OLD)
    make_scheduling("llama", min_replicas=1)
    reconcile(at=now, heartbeat=True)
    (old,) = ready()
    lease = Lease.objects.pick_and_grant("llama", ttl=600, now=now)
    assert lease.replica_id == old.pk
    ModelLoadInfo.objects.upsert("llama", "llama-cpp", NEW)

    reconcile(at=now + timedelta(seconds=10), heartbeat=True)  # surge
    reconcile(at=now + timedelta(seconds=20), heartbeat=True)  # drain
    old.refresh_from_db()
    assert old.draining_since is not None
    reconcile(at=now + timedelta(seconds=30), heartbeat=True)
    assert NodeModel.objects.filter(pk=old.pk).exists()  # a request is still in flight
    assert progressing().reason == "rolling_out"

    Lease.objects.release(lease.pk, now=now)
    reconcile(at=now + timedelta(seconds=40), heartbeat=True)
    assert not NodeModel.objects.filter(pk=old.pk).exists()
