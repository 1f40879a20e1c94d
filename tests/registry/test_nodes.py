"""Node verbs: registration, heartbeats, status transitions, labels, slots."""

from datetime import timedelta

import pytest

from core.credentials import node_token
from core.tokens import token_matches
from registry.managers import NodeCredentialRequired
from registry.models import ModelSchedulingConfig, Node, NodeLabel, NodeModel
from tests.factories import GIB, count_unsatisfiable, make_node, make_replica, make_scheduling, trip_breaker

pytestmark = pytest.mark.django_db


def test_first_registration_is_healthy_when_auto_approved_and_gets_a_token(now):
    registration = Node.objects.register(name="gpu-1", address="10.0.0.1:50051", total_vram=24 * GIB, now=now)

    node = registration.node
    assert registration.created
    assert node.status == Node.Status.HEALTHY
    assert node.last_heartbeat == now
    assert node.available_vram == 24 * GIB
    assert token_matches(registration.node_token, node.token_hash)
    assert registration.node_token not in node.token_hash


def test_first_registration_is_pending_without_auto_approve():
    node = Node.objects.register(name="gpu-1", address="a:1", auto_approve=False).node
    assert node.status == Node.Status.PENDING


def test_re_registration_keeps_id_restores_health_and_deletes_replica_rows(now):
    node = make_node(name="gpu-1", status=Node.Status.OFFLINE)
    make_replica(node, "llama", 0)

    again = Node.objects.register(name="gpu-1", address="10.0.0.2:50051", presented_node_token=node.token, now=now)

    assert not again.created
    assert again.node.pk == node.pk
    assert again.node.status == Node.Status.HEALTHY
    assert again.node.address == "10.0.0.2:50051"
    assert not NodeModel.objects.filter(node=node).exists()


def test_re_registration_of_a_pending_node_stays_pending():
    first = Node.objects.register(name="gpu-1", address="a:1", auto_approve=False)
    again = Node.objects.register(
        name="gpu-1", address="a:1", auto_approve=True, presented_node_token=first.node_token
    )
    assert again.node.status == Node.Status.PENDING


def test_the_node_token_is_derived_from_the_node_id_and_survives_re_registration():
    first = Node.objects.register(name="gpu-1", address="a:1")
    second = Node.objects.register(name="gpu-1", address="a:1", presented_node_token=first.node_token)
    node = Node.objects.get(name="gpu-1")
    assert first.node_token == second.node_token == node_token(node.pk)
    assert token_matches(second.node_token, node.token_hash)


def test_re_registration_keeps_operator_set_slots_and_updates_reported_ones():
    node = make_node(name="gpu-1", slots=2)
    Node.objects.set_max_replicas_per_model(node.pk, 5)

    again = Node.objects.register(
        name="gpu-1", address="a:1", max_replicas_per_model=3, presented_node_token=node.token
    ).node
    assert (again.max_replicas_per_model, again.reported_max_replicas_per_model) == (5, 3)

    Node.objects.reset_max_replicas_per_model(node.pk)
    node.refresh_from_db()
    assert node.max_replicas_per_model == 3
    assert NodeLabel.objects.as_dict(node.pk)["node.replica-slots"] == "3"


def test_re_registration_without_the_node_token_changes_nothing(now):
    """The fleet token alone must not take a node over: without the node's current token (or
    with another one) a re-registration raises and the node keeps its address and token."""
    node = make_node(name="gpu-1", address="10.0.0.1:50051")
    other = make_node(name="gpu-2")
    for presented in (None, "", other.token, "cpn_guess"):
        with pytest.raises(NodeCredentialRequired):
            Node.objects.register(name="gpu-1", address="10.6.6.6:50051", presented_node_token=presented, now=now)
    node.refresh_from_db()
    assert node.address == "10.0.0.1:50051"
    assert token_matches(node.token, node.token_hash)


def test_a_fleet_token_node_re_registers_with_the_fleet_token_alone():
    """LocalAI's trust model: such a node's credential is the fleet token itself."""
    first = Node.objects.register(name="localai-1", address="a:1", auth_mode="fleet_token")
    again = Node.objects.register(name="localai-1", address="b:1", auth_mode="fleet_token")
    assert (again.node.pk, again.node.address) == (first.node.pk, "b:1")


def test_zero_slots_are_treated_as_one():
    node = Node.objects.register(name="gpu-1", address="a:1", max_replicas_per_model=0).node
    assert node.max_replicas_per_model == 1


def test_registration_applies_auto_labels_and_merges_worker_labels():
    node = make_node(name="gpu-1", total_vram=24 * GIB, gpu_vendor="nvidia", labels={"zone": "a"}, slots=2)
    NodeLabel.objects.merge(node.pk, {"team": "research"})  # an operator's label

    Node.objects.register(
        name="gpu-1",
        address="a:1",
        total_vram=16 * GIB,
        gpu_vendor="nvidia",
        labels={"zone": "b"},
        presented_node_token=node.token,
    )

    assert NodeLabel.objects.as_dict(node.pk) == {
        "gpu.vendor": "nvidia",
        "gpu.vram": "16GB",
        "node.name": "gpu-1",
        "node.replica-slots": "1",
        "team": "research",
        "zone": "b",
    }


def test_an_auto_label_that_no_longer_applies_is_dropped_at_registration():
    node = make_node(name="gpu-2", total_vram=24 * GIB)
    assert NodeLabel.objects.as_dict(node.pk)["gpu.vram"] == "24GB"

    Node.objects.register(name="gpu-2", address="a:1", total_vram=0, presented_node_token=node.token)

    assert "gpu.vram" not in NodeLabel.objects.as_dict(node.pk)


def test_registration_clears_every_models_cooldown(now):
    make_scheduling("llama", min_replicas=1)
    trip_breaker("llama", until=now + timedelta(minutes=5), now=now)
    count_unsatisfiable("llama", 2, now=now)

    make_node()

    config = ModelSchedulingConfig.objects.get(model_name="llama")
    assert (config.unsatisfiable_until, config.unsatisfiable_ticks) == (None, 0)


def test_register_rejects_an_empty_name():
    with pytest.raises(ValueError):
        Node.objects.register(name=" ", address="a:1")


def test_heartbeat_sets_timestamp_memory_and_resets_reservation(now):
    node = make_node(total_vram=24 * GIB)
    Node.objects.reserve_vram(node.pk, 4 * GIB)

    assert Node.objects.heartbeat(node.pk, available_vram=20 * GIB, available_ram=7, now=now + timedelta(seconds=10))

    node.refresh_from_db()
    assert (node.last_heartbeat, node.available_vram, node.reserved_vram, node.available_ram) == (
        now + timedelta(seconds=10),
        20 * GIB,
        0,
        7,
    )


def test_heartbeat_without_vram_keeps_the_reservation(now):
    node = make_node()
    Node.objects.reserve_vram(node.pk, GIB)
    Node.objects.heartbeat(node.pk, now=now)
    node.refresh_from_db()
    assert node.reserved_vram == GIB


@pytest.mark.parametrize("status", [Node.Status.PENDING, Node.Status.OFFLINE])
def test_heartbeat_on_pending_or_offline_node_only_updates_the_timestamp(now, status):
    node = make_node(status=status, total_vram=24 * GIB)
    Node.objects.reserve_vram(node.pk, GIB)

    assert Node.objects.heartbeat(node.pk, available_vram=GIB, now=now + timedelta(seconds=5))

    node.refresh_from_db()
    assert node.status == status
    assert node.last_heartbeat == now + timedelta(seconds=5)
    assert (node.available_vram, node.reserved_vram) == (24 * GIB, GIB)


def test_heartbeat_never_changes_status(now):
    node = make_node(status=Node.Status.UNHEALTHY)
    Node.objects.heartbeat(node.pk, available_vram=1, now=now)
    node.refresh_from_db()
    assert node.status == Node.Status.UNHEALTHY


def test_heartbeat_of_an_unknown_node_returns_false():
    import uuid

    assert Node.objects.heartbeat(uuid.uuid4(), available_vram=1) is False


def test_approve_only_moves_pending_nodes():
    node = make_node(status=Node.Status.PENDING)
    assert Node.objects.approve(node.pk)
    assert not Node.objects.approve(node.pk)
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


def test_mark_unhealthy_keeps_replica_rows():
    node = make_node()
    make_replica(node)
    assert Node.objects.mark_unhealthy(node.pk)
    assert NodeModel.objects.filter(node=node).count() == 1


def test_mark_healthy_recovers_unhealthy_and_offline_but_not_pending_or_draining():
    recovering = [make_node(status=Node.Status.UNHEALTHY), make_node(status=Node.Status.OFFLINE)]
    stuck = [make_node(status=Node.Status.PENDING), make_node(status=Node.Status.DRAINING)]
    assert all(Node.objects.mark_healthy(node.pk) for node in recovering)
    assert not any(Node.objects.mark_healthy(node.pk) for node in stuck)


def test_drain_keeps_rows_but_makes_them_unroutable_and_resume_restores():
    node = make_node()
    make_replica(node)
    assert Node.objects.mark_draining(node.pk, by=Node.DrainedBy.OPERATOR)
    assert NodeModel.objects.filter(node=node).count() == 1
    assert NodeModel.objects.warm_pick("llama") is None
    assert Node.objects.resume(node.pk, by=Node.DrainedBy.OPERATOR)
    assert NodeModel.objects.warm_pick("llama") is not None


def test_mark_offline_expecting_the_observed_heartbeat_loses_to_a_newer_one(now):
    node = make_node(now=now)
    make_replica(node)
    observed = Node.objects.get(pk=node.pk).last_heartbeat
    # A heartbeat lands between the reconciler's snapshot and its mark_offline, through a web
    # process whose clock is a minute behind: the value changed, so the node is not reaped.
    Node.objects.heartbeat(node.pk, now=now - timedelta(minutes=1))

    assert not Node.objects.mark_offline(node.pk, expected_heartbeat=observed, now=now)

    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY
    assert NodeModel.objects.filter(node=node).exists()
    assert Node.objects.mark_offline(node.pk, expected_heartbeat=now - timedelta(minutes=1), now=now)


def test_status_and_slot_verbs_write_their_now(now):
    node = make_node(now=now, status=Node.Status.PENDING)
    steps = [
        (Node.objects.approve, {}),
        (Node.objects.mark_draining, {"by": Node.DrainedBy.OPERATOR}),
        (Node.objects.resume, {"by": Node.DrainedBy.OPERATOR}),
        (Node.objects.mark_unhealthy, {}),
        (Node.objects.mark_healthy, {}),
        (Node.objects.set_max_replicas_per_model, {"slots": 3}),
        (Node.objects.reset_max_replicas_per_model, {}),
        (Node.objects.mark_offline, {}),
    ]
    for minutes, (verb, kwargs) in enumerate(steps, start=1):
        at = now + timedelta(minutes=minutes)
        assert verb(node.pk, now=at, **kwargs), verb.__name__
        assert Node.objects.get(pk=node.pk).updated_at == at, verb.__name__


def test_observe_heartbeats_stamps_changed_heartbeats_with_the_observers_clock(now):
    a = make_node(now=now)
    b = make_node(now=now)
    observer = now + timedelta(hours=1)  # the reconciler's clock; the web process's is irrelevant

    assert Node.objects.observe_heartbeats(now=observer) == 2  # first sight of both
    assert Node.objects.observe_heartbeats(now=observer + timedelta(seconds=1)) == 0  # nothing changed
    Node.objects.heartbeat(a.pk, now=now - timedelta(minutes=5))  # a web process with a slow clock
    assert Node.objects.observe_heartbeats(now=observer + timedelta(seconds=2)) == 1

    seen = dict(Node.objects.values_list("pk", "heartbeat_seen_at"))
    assert seen == {a.pk: observer + timedelta(seconds=2), b.pk: observer}
    a.refresh_from_db()
    assert a.heartbeat_seen == now - timedelta(minutes=5)
    # A restart of observation stamps every node.
    assert Node.objects.observe_heartbeats(now=observer + timedelta(seconds=3), restart=True) == 2
    assert set(Node.objects.values_list("heartbeat_seen_at", flat=True)) == {observer + timedelta(seconds=3)}


def test_observe_heartbeats_sees_a_forgotten_heartbeat_as_a_change(now):
    node = make_node(now=now)
    Node.objects.observe_heartbeats(now=now)
    Node.objects.mark_offline(node.pk, forget_heartbeat=True, now=now)

    assert Node.objects.observe_heartbeats(now=now + timedelta(seconds=1)) == 1
    node.refresh_from_db()
    assert (node.heartbeat_seen, node.heartbeat_seen_at) == (None, now + timedelta(seconds=1))


def test_deregister_deletes_node_labels_and_replicas():
    node = make_node(labels={"zone": "a"})
    make_replica(node)
    assert Node.objects.deregister(node.pk)
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeLabel.objects.filter(node_id=node.pk).exists()
    assert not NodeModel.objects.exists()
    assert not Node.objects.deregister(node.pk)


def test_selector_uses_and_semantics_and_ignores_unhealthy_nodes():
    both = make_node(labels={"zone": "a", "gpu": "h100"})
    make_node(labels={"zone": "a", "gpu": "a10"})
    make_node(labels={"zone": "a", "gpu": "h100"}, status=Node.Status.UNHEALTHY)
    make_node(labels={"zone": "a", "gpu": "h100"}, node_type=Node.NodeType.AGENT)

    assert list(Node.objects.candidates({"zone": "a", "gpu": "h100"})) == [both]
    assert Node.objects.candidates({}).count() == 2


def test_label_verbs_merge_replace_remove_and_clear_cooldowns(now):
    node = make_node(labels={"a": "1"})
    make_scheduling("llama", min_replicas=1)

    def cool():
        trip_breaker("llama", until=now + timedelta(minutes=5), now=now)

    def cooled():
        return ModelSchedulingConfig.objects.get().unsatisfiable_until is not None

    cool()
    NodeLabel.objects.merge(node.pk, {"b": "2"})
    assert not cooled()
    assert {"a": "1", "b": "2"}.items() <= NodeLabel.objects.as_dict(node.pk).items()

    cool()
    NodeLabel.objects.replace(node.pk, {"c": "3"})
    assert NodeLabel.objects.as_dict(node.pk) == {"c": "3"}
    assert not cooled()

    cool()
    assert NodeLabel.objects.remove(node.pk, "c")
    assert not NodeLabel.objects.remove(node.pk, "c")
    assert not cooled()


def test_invalid_labels_are_rejected_without_writing():
    node = make_node(labels={"a": "1"})
    with pytest.raises(ValueError):
        NodeLabel.objects.replace(node.pk, {"": "x"})
    with pytest.raises(ValueError):
        NodeLabel.objects.merge(node.pk, {"k": 3})
    assert NodeLabel.objects.as_dict(node.pk)["a"] == "1"


def test_slot_override_must_be_positive():
    node = make_node()
    with pytest.raises(ValueError):
        Node.objects.set_max_replicas_per_model(node.pk, 0)
