"""The router under real concurrency: threads with their own PostgreSQL connections against
real gRPC fakes. SQLite serialises writers and ignores row locks, so these run on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from registry import router, tasks
from registry.models import Lease, LoadJob, Node, NodeModel
from tests.concurrency import THREADS
from tests.concurrency import run_in_threads as shared_run_in_threads
from tests.factories import GIB, make_node, make_replica

from .conftest import options_blob

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

BLOB = options_blob("llama.gguf", vram=2 * GIB)


def run_in_threads(target, close_thread_connections, count=THREADS):
    """The shared runner, returning a thread's exception in its slot (some tests expect typed
    errors)."""
    return shared_run_in_threads(target, close_thread_connections, count, return_exceptions=True)


def assert_no_leftovers():
    assert not NodeModel.objects.loading().exists()
    assert not LoadJob.objects.active().exists()


@pytest.mark.parametrize("runner", ["inline", "thread"])
def test_eight_callers_of_one_cold_model_share_one_job_one_load_and_one_replica(
    fleet, settings, close_thread_connections, runner
):
    settings.CONTROLPLANE_LOAD_JOB_RUNNER = runner  # inline: the claiming thread runs the load
    gpu = fleet.add_node("gpu-1", slots=4, load_delay=0.3)
    fleet.add_node("gpu-2", slots=4, load_delay=0.3)

    results = run_in_threads(
        lambda i: router.route("llama", backend_type="x", opts_blob=BLOB, wait=20), close_thread_connections
    )

    assert all(isinstance(result, router.RouteResult) and result.ready for result in results), results
    assert LoadJob.objects.count() == 1
    loads = sum(len(node.worker.load_requests) for node in fleet.nodes)
    starts = sum(node.worker.count("StartBackend") for node in fleet.nodes)
    assert (loads, starts) == (1, 1)
    replica = NodeModel.objects.get()
    assert {result.lease.replica_id for result in results} == {replica.pk}
    assert replica.in_flight == THREADS == Lease.objects.live().count()
    assert_no_leftovers()
    assert gpu  # (either node may have been chosen)


def test_concurrent_claims_create_exactly_one_job(close_thread_connections):
    claims = run_in_threads(lambda i: LoadJob.objects.claim_or_attach("llama"), close_thread_connections)

    assert sum(created for _, created in claims) == 1
    assert len({job.pk for job, _ in claims}) == 1
    assert LoadJob.objects.count() == 1


def test_eight_callers_of_a_model_whose_load_fails_all_get_the_typed_error_after_one_attempt(
    fleet, close_thread_connections
):
    failing = fleet.add_node("gpu-1", load_success=False, load_delay=0.2)

    results = run_in_threads(
        lambda i: router.route("llama", backend_type="x", opts_blob=BLOB, wait=20), close_thread_connections
    )

    assert all(isinstance(result, router.LoadFailed) for result in results), results
    # One job failed; callers arriving after it finished may start one retry each at most,
    # but never concurrently, and every attempt cleaned up after itself.
    assert len(failing.worker.load_requests) == LoadJob.objects.count()
    assert not NodeModel.objects.exists()
    assert Node.objects.get().reserved_vram == 0
    assert_no_leftovers()


def test_concurrent_loaders_never_exceed_a_nodes_slots(fleet, close_thread_connections):
    gpu = fleet.add_node("gpu-1", slots=2, total_vram=10 * GIB, load_delay=0.1)

    results = run_in_threads(
        lambda i: router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB), close_thread_connections
    )

    loaded = [r for r in results if isinstance(r, NodeModel)]
    refused = [r for r in results if isinstance(r, router.CapacityExhausted)]
    assert (len(loaded), len(refused)) == (2, THREADS - 2), results
    assert sorted(r.replica_index for r in loaded) == [0, 1]
    assert gpu.worker.count("StartBackend") == 2
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 4 * GIB
    assert_no_leftovers()


def test_concurrent_loaders_never_over_commit_vram(fleet, close_thread_connections):
    gpu = fleet.add_node("gpu-1", slots=8, total_vram=5 * GIB, load_delay=0.1)

    results = run_in_threads(
        lambda i: router.schedule_and_load("llama", backend_type="x", opts_blob=BLOB), close_thread_connections
    )

    loaded = [r for r in results if isinstance(r, NodeModel)]
    assert len(loaded) == 2  # 2 x 2 GiB fit in 5 GiB; the rest found no VRAM and nothing to evict
    assert all(isinstance(r, (NodeModel, router.AllReplicasBusy, router.CapacityExhausted)) for r in results), results
    gpu.node.refresh_from_db()
    assert gpu.node.reserved_vram == 4 * GIB
    assert_no_leftovers()


def test_concurrent_runners_of_a_dead_job_take_it_over_once(fleet, close_thread_connections):
    gpu = fleet.add_node("gpu-1", load_delay=0.2)
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)
    LoadJob.objects.start(job.pk, "dead:1", now=timezone.now() - timedelta(minutes=10))

    states = run_in_threads(lambda i: tasks.run_load_job(job.pk, runner=f"runner:{i}"), close_thread_connections)

    assert Counter(states)["succeeded"] == 1, states
    assert len(gpu.worker.load_requests) == 1
    job.refresh_from_db()
    assert (job.state, job.attempts) == ("succeeded", 2)


def test_concurrent_releases_of_one_lease_decrement_once(close_thread_connections):
    row = make_replica(make_node())
    Lease.objects.pick_and_grant("llama", ttl=60)
    lease = Lease.objects.pick_and_grant("llama", ttl=60)

    released = run_in_threads(lambda i: Lease.objects.release(lease.pk), close_thread_connections)

    assert released.count(True) == 1
    row.refresh_from_db()
    assert row.in_flight == 1 == Lease.objects.live().count()


def test_expiry_racing_releases_leaves_in_flight_equal_to_live_leases(close_thread_connections):
    row = make_replica(make_node())
    past = timezone.now() - timedelta(minutes=5)
    expired = [Lease.objects.pick_and_grant("llama", ttl=1, now=past) for _ in range(20)]
    for _ in range(5):
        Lease.objects.pick_and_grant("llama", ttl=600)

    def work(i):
        if i % 2:
            return Lease.objects.expire()
        return sum(Lease.objects.release(lease.pk) for lease in expired[i::2])

    run_in_threads(work, close_thread_connections)

    row.refresh_from_db()
    assert row.in_flight == 5 == Lease.objects.live().count()


def test_sweeps_racing_picks_and_releases_never_miscount(close_thread_connections):
    node = make_node(slots=2)
    rows = [make_replica(node, "llama", 0), make_replica(node, "llama", 1)]
    stop = threading.Event()

    def churn(i):
        if i == 0:
            sweeps = 0
            while not stop.is_set():
                Lease.objects.sweep_in_flight()
                sweeps += 1
            return sweeps
        for round_ in range(25):
            lease = Lease.objects.pick_and_grant("llama", ttl=600)
            if round_ % 5:
                Lease.objects.release(lease.pk)
        return None

    # The sweeper stops once every churning thread is done, so no sweep runs after the churn:
    # a miscount made by a concurrent sweep would still be visible below.
    done = threading.Barrier(THREADS - 1, action=stop.set)

    def run(i):
        result = churn(i)
        if i != 0:
            done.wait(timeout=60)
        return result

    results = run_in_threads(run, close_thread_connections)

    assert results[0] > 0  # the sweeper ran while the others churned
    live = Counter(Lease.objects.live().values_list("replica_id", flat=True))
    for row in rows:
        row.refresh_from_db()
        assert row.in_flight == live[row.pk]
    assert sum(live.values()) == (THREADS - 1) * 5


def test_the_heartbeat_thread_advances_heartbeat_at_during_a_slow_load(fleet, settings, close_thread_connections):
    settings.LOAD_JOB_HEARTBEAT_INTERVAL = 0.05
    fleet.add_node("gpu-1", load_delay=0.6)
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)
    runner = threading.Thread(target=lambda: (tasks.run_load_job(job.pk), close_thread_connections()))
    runner.start()

    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state, heartbeat_at = LoadJob.objects.values_list("state", "heartbeat_at").get(pk=job.pk)
        if state == "running":
            seen.add(heartbeat_at)
        if state in ("succeeded", "failed"):
            break
        time.sleep(0.02)
    runner.join(10)

    assert LoadJob.objects.get(pk=job.pk).state == "succeeded"
    assert len(seen) >= 3
