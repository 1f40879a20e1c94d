"""``unhealthy``: a node that keeps heartbeating while its worker stops answering ListBackends.

Driven through the real verbs and a real worker gRPC server on loopback (the default prober,
the node's own credentials): the server goes silent (ListBackends hangs past the pass's
deadline) or goes away (nothing listens), and the reconciler's passes do the rest. Nothing
here sets a status by hand.
"""

from __future__ import annotations

import threading
from concurrent import futures
from datetime import timedelta
from uuid import uuid4

import grpc
import pytest
from django.test import override_settings

from proto import backend_pb2, backend_pb2_grpc, client, worker_pb2, worker_pb2_grpc
from reconciler.models import Event, UnansweredListing
from reconciler.planning import plan_worker_health
from reconciler.reconcile import reconcile_once
from reconciler.snapshot import NodeView
from registry.models import Node, NodeModel
from tests.factories import make_node

pytestmark = pytest.mark.django_db

MODEL = "llama"
SILENCE = 1.0  # seconds a silent ListBackends hangs: longer than the pass's deadline below


class Worker(worker_pb2_grpc.WorkerServicer):
    """The worker service of one node, running one backend of ``MODEL``; ``silent`` makes
    ListBackends hang past any deadline the pass gives it."""

    def __init__(self, address: str):
        self.address = address
        self.node_id = ""
        self.silent = threading.Event()

    def ListBackends(self, request, context):
        if self.silent.is_set():
            threading.Event().wait(SILENCE)
        backend = worker_pb2.BackendProcess(
            model_name=MODEL, replica_index=0, state=worker_pb2.BackendProcess.RUNNING, address=self.address
        )
        return worker_pb2.ListBackendsResponse(node_id=self.node_id, backends=[backend])


class Backend(backend_pb2_grpc.BackendServicer):
    """The backend itself answers its probes all along: only the worker service goes silent."""

    def Health(self, request, context):
        return backend_pb2.Reply(message=b"OK")


@pytest.fixture
def worker():
    """A real gRPC server on loopback serving the worker service and the backend; yields
    ``(worker, stop)``, ``stop()`` taking the whole server away."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = Worker(f"127.0.0.1:{port}")
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    backend_pb2_grpc.add_BackendServicer_to_server(Backend(), server)
    server.start()
    client.close_all_channels()
    yield servicer, lambda: server.stop(grace=None).wait()
    servicer.silent.clear()
    server.stop(grace=None)
    client.close_all_channels()


@pytest.fixture
def node(worker, now):
    """A node served by ``worker``, with one loaded replica there."""
    servicer, _ = worker
    node = make_node(name="gpu-a", now=now, address=servicer.address)
    servicer.node_id = str(node.pk)
    NodeModel.objects.record_loaded(node.pk, MODEL, 0, address=servicer.address, now=now)
    return node


def heartbeat_and_pass(node, at):
    """The node heartbeats, then a pass runs at ``at`` (default prober: real gRPC)."""
    assert Node.objects.heartbeat(node.pk, now=at)
    summary = reconcile_once(now=at)
    assert summary.outcome == "ok", summary
    return summary


def state(node):
    node.refresh_from_db()
    return node.status


@override_settings(RECONCILE_WORKER_TIMEOUT=0.3, RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY=3)
def test_a_heartbeating_node_whose_worker_goes_silent_turns_unhealthy_and_back(worker, node, now):
    servicer, _ = worker
    at = [now + timedelta(seconds=10 * i) for i in range(7)]
    heartbeat_and_pass(node, at[0])
    assert NodeModel.objects.ready().filter(node=node).count() == 1

    servicer.silent.set()
    first, second = heartbeat_and_pass(node, at[1]), heartbeat_and_pass(node, at[2])
    assert first.actions["worker_listings_unanswered"] == second.actions["worker_listings_unanswered"] == 1
    assert state(node) == Node.Status.HEALTHY  # two silent passes are not enough
    third = heartbeat_and_pass(node, at[3])

    assert third.actions["nodes_marked_unhealthy"] == 1
    assert state(node) == Node.Status.UNHEALTHY
    event = Event.objects.get(kind=Event.Kind.NODE_UNHEALTHY)
    assert (event.node_id, event.details["unanswered_listings"]) == (node.pk, 3)
    assert "DEADLINE_EXCEEDED" in event.details["error"]
    # Not routed to nor placed on; its replica row is kept for when the worker answers again.
    assert not Node.objects.schedulable().filter(pk=node.pk).exists()
    assert not Node.objects.placeable().filter(pk=node.pk).exists()
    assert NodeModel.objects.filter(node=node).count() == 1
    assert not NodeModel.objects.ready().filter(node=node).exists()

    # Its heartbeats keep arriving: they do not make it healthy, its worker's answer does.
    assert "nodes_recovered" not in heartbeat_and_pass(node, at[4]).actions
    assert state(node) == Node.Status.UNHEALTHY
    servicer.silent.clear()
    back = heartbeat_and_pass(node, at[5])

    assert back.actions["nodes_recovered"] == 1
    assert state(node) == Node.Status.HEALTHY
    assert Event.objects.filter(kind=Event.Kind.NODE_RECOVERED, node_id=node.pk).count() == 1
    assert not UnansweredListing.objects.exists()
    assert NodeModel.objects.ready().filter(node=node).count() == 1
    # A new silence counts from one again.
    servicer.silent.set()
    heartbeat_and_pass(node, at[6])
    assert UnansweredListing.objects.get(node=node).failures == 1
    assert state(node) == Node.Status.HEALTHY


@override_settings(RECONCILE_WORKER_TIMEOUT=0.3, RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY=2)
def test_an_answer_in_between_restarts_the_count(worker, node, now):
    servicer, _ = worker
    heartbeat_and_pass(node, now)
    servicer.silent.set()
    heartbeat_and_pass(node, now + timedelta(seconds=10))
    servicer.silent.clear()
    heartbeat_and_pass(node, now + timedelta(seconds=20))
    servicer.silent.set()
    heartbeat_and_pass(node, now + timedelta(seconds=30))

    assert state(node) == Node.Status.HEALTHY
    assert UnansweredListing.objects.get(node=node).failures == 1


@override_settings(RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY=3)
def test_a_worker_that_goes_away_makes_its_node_unhealthy_then_offline_once_heartbeats_stop(worker, node, now):
    _, stop = worker
    heartbeat_and_pass(node, now)
    stop()  # nothing listens at the address any more: ListBackends is UNAVAILABLE

    for i in (1, 2, 3):
        heartbeat_and_pass(node, now + timedelta(seconds=10 * i))

    assert state(node) == Node.Status.UNHEALTHY
    assert "UNAVAILABLE" in Event.objects.get(kind=Event.Kind.NODE_UNHEALTHY).details["error"]
    assert NodeModel.objects.filter(node=node).exists()

    # The heartbeats stop too: the node is reaped as stale, like a healthy one.
    for i in range(4, 9):
        summary = reconcile_once(now=now + timedelta(seconds=10 * i))
    assert state(node) == Node.Status.OFFLINE
    assert Event.objects.filter(kind=Event.Kind.NODE_OFFLINE, node_id=node.pk).count() == 1
    assert not NodeModel.objects.filter(node=node).exists()
    assert not UnansweredListing.objects.exists()  # back one day, a new streak counts from one
    assert summary.outcome == "ok"


@override_settings(RECONCILE_WORKER_TIMEOUT=0.3, RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY=3)
def test_a_node_whose_heartbeats_stop_with_its_worker_is_left_to_the_stale_sweep(worker, node, now):
    """A stopped (SIGSTOP) or cut-off machine: its worker and its heartbeats go silent together.
    That is not a sick node but a gone one: healthy until stale, then offline."""
    servicer, _ = worker
    heartbeat_and_pass(node, now)
    servicer.silent.set()

    summaries = [reconcile_once(now=now + timedelta(seconds=10 * i)) for i in range(1, 4)]

    assert all("nodes_marked_unhealthy" not in summary.actions for summary in summaries)
    assert UnansweredListing.objects.get(node=node).failures == 1  # no heartbeat since the first
    assert state(node) == Node.Status.HEALTHY
    reaped = reconcile_once(now=now + timedelta(seconds=40))  # 40 s without a heartbeat
    assert reaped.actions["nodes_marked_offline"] == 1
    assert state(node) == Node.Status.OFFLINE
    assert not Event.objects.filter(kind=Event.Kind.NODE_UNHEALTHY).exists()


def test_an_operator_drained_node_that_comes_back_is_not_reported_recovered(now, reconcile):
    """A node an operator drained keeps its drain while offline and comes back ``draining``
    (``mark_healthy``): that is no recovery, so no ``node_recovered`` event."""
    drained = make_node(name="gpu-a", now=now, status=Node.Status.DRAINING)  # the operator's drain
    reconcile(heartbeat=True)
    assert Node.objects.mark_offline(drained.pk, forget_heartbeat=True, now=now)  # its worker signs off
    reconcile(at=now + timedelta(seconds=10))
    assert Node.objects.heartbeat(drained.pk, now=now + timedelta(seconds=15))  # and comes back

    summary = reconcile(at=now + timedelta(seconds=20))

    assert state(drained) == Node.Status.DRAINING
    assert summary.actions["nodes_back_draining"] == 1
    assert "nodes_recovered" not in summary.actions
    assert not Event.objects.filter(kind=Event.Kind.NODE_RECOVERED).exists()


def test_only_heartbeating_nodes_known_to_serve_the_worker_service_count_a_silence(now):
    def view(name, worker_api=Node.WorkerApi.AVAILABLE, **fields):
        return NodeView(id=uuid4(), name=name, status=Node.Status.HEALTHY, worker_api=worker_api, **fields)

    worker, localai, unknown = view("w"), view("l", Node.WorkerApi.MISSING), view("u", Node.WorkerApi.UNKNOWN)
    before, after = now, now + timedelta(seconds=10)
    in_streak = view(
        "s", Node.WorkerApi.MISSING, last_heartbeat=after, unanswered_listings=1, unanswered_heartbeat=before
    )
    no_new_heartbeat = view("h", last_heartbeat=before, unanswered_listings=1, unanswered_heartbeat=before)
    sick = NodeView(id=uuid4(), name="x", status=Node.Status.UNHEALTHY, worker_api=Node.WorkerApi.AVAILABLE)
    fine = view("f")
    listings = (worker, localai, unknown, in_streak, no_new_heartbeat, sick, fine)

    plan = plan_worker_health(
        listings,
        answered={sick.id, fine.id},
        failed={worker.id, localai.id, unknown.id, in_streak.id, no_new_heartbeat.id},
    )

    assert plan.unanswered == (worker, in_streak)
    assert plan.answered == (sick,)  # ``fine`` had no streak to end: no write


def test_most_workers_silent_at_once_marks_none_unhealthy():
    """As with stale heartbeats: when most workers fall silent together, the control plane's
    own outbound network is the likelier culprit; streaks count, nobody is marked."""
    nodes = [NodeView(id=uuid4(), name=f"w{i}", status=Node.Status.HEALTHY) for i in range(4)]
    ids = [node.id for node in nodes]

    half = plan_worker_health(tuple(nodes), answered=set(ids[2:]), failed=set(ids[:2]), mass_silence_fraction=0.5)
    most = plan_worker_health(tuple(nodes), answered={ids[3]}, failed=set(ids[:3]), mass_silence_fraction=0.5)
    lone = plan_worker_health(tuple(nodes[:2]), answered=set(), failed={ids[0]}, mass_silence_fraction=0.5)

    assert not half.guard and len(half.unanswered) == 2  # exactly half: not "most"
    assert most.guard and len(most.unanswered) == 3
    assert not lone.guard  # one silent worker is never a mass silence
