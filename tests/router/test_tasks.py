"""The load-job task: runs a pending job, takes over a dead runner's job (cleaning its leftovers),
leaves a live runner's job alone, records typed failures; housekeeping and requeueing."""

from datetime import timedelta

import pytest
from django.utils import timezone

from registry import jobs, tasks
from registry.models import Lease, LoadJob, ModelLoadInfo, Node, NodeModel
from tests.factories import GIB, make_replica

from .conftest import options_blob

pytestmark = pytest.mark.django_db

BLOB = options_blob("llama.gguf", vram=2 * GIB)


def test_it_runs_a_pending_job_to_success(fleet):
    gpu = fleet.add_node("gpu-1")
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)

    assert tasks.run_load_job(job.pk, runner="me:1") == "succeeded"

    job.refresh_from_db()
    replica = NodeModel.objects.get()
    assert (job.state, job.runner, job.replica_id, job.address) == ("succeeded", "me:1", replica.pk, replica.address)
    assert gpu.worker.load_requests == [BLOB]


def test_without_options_the_job_loads_from_the_models_load_info(fleet):
    gpu = fleet.add_node("gpu-1")
    ModelLoadInfo.objects.upsert("llama", "vllm", BLOB)
    job, _ = LoadJob.objects.claim_or_attach("llama")

    assert tasks.run_load_job(job.pk) == "succeeded"
    assert gpu.worker.calls[0][1].backend_type == "vllm"


def test_a_job_whose_model_got_a_replica_meanwhile_succeeds_without_loading(fleet):
    gpu = fleet.add_node("gpu-1")
    replica = make_replica(gpu.node, "llama", 0, address="127.0.0.1:9")
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)

    assert tasks.run_load_job(job.pk) == "succeeded"

    assert LoadJob.objects.get(pk=job.pk).replica_id == replica.pk
    assert gpu.worker.calls == []


def test_a_failing_load_fails_the_job_with_the_typed_code(fleet):
    fleet.add_node("gpu-1", load_success=False)
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)

    assert tasks.run_load_job(job.pk) == "failed"

    job.refresh_from_db()
    assert job.error_code == "load_failed" and "success=false" not in job.error_code
    assert not NodeModel.objects.exists() and Node.objects.get().reserved_vram == 0


def test_a_job_run_by_a_live_runner_is_left_alone(fleet):
    gpu = fleet.add_node("gpu-1")
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)
    LoadJob.objects.start(job.pk, "other:2")

    assert tasks.run_load_job(job.pk, runner="me:1") == "running"
    assert gpu.worker.calls == []


def test_a_dead_runners_job_is_taken_over_with_no_leftover_row_or_reservation(fleet):
    gpu = fleet.add_node("gpu-1", total_vram=10 * GIB)
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)
    long_ago = timezone.now() - timedelta(minutes=10)
    LoadJob.objects.start(job.pk, "dead:1", now=long_ago)
    # The dead runner got as far as its loading row and reservation (index 0).
    leftover = make_replica(gpu.node, "llama", 0, state=NodeModel.State.LOADING, reserved_vram=2 * GIB)
    LoadJob.objects.record_replica(job.pk, "dead:1", leftover.pk, now=long_ago)

    assert tasks.run_load_job(job.pk, runner="me:1") == "succeeded"

    job.refresh_from_db()
    gpu.node.refresh_from_db()
    replica = NodeModel.objects.get()
    assert replica.pk != leftover.pk and replica.state == "loaded" and replica.replica_index == 0
    assert (job.state, job.runner, job.attempts) == ("succeeded", "me:1", 2)
    assert gpu.node.reserved_vram == 2 * GIB  # only the new load's reservation
    assert len(gpu.worker.load_requests) == 1


def test_the_heartbeat_thread_beats_while_a_slow_load_blocks(fleet, settings, monkeypatch):
    settings.LOAD_JOB_HEARTBEAT_INTERVAL = 0.05
    fleet.add_node("gpu-1", load_delay=0.4)
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="x", opts_blob=BLOB)
    beats = []
    monkeypatch.setattr(LoadJob.objects, "heartbeat", lambda job_id, runner, **kw: beats.append(runner) or True)

    assert tasks.run_load_job(job.pk, runner="me:1") == "succeeded"

    assert len(beats) >= 3 and set(beats) == {"me:1"}


def test_reap_load_jobs_enqueues_the_requeued_ones(fleet, monkeypatch):
    job, _ = LoadJob.objects.claim_or_attach("llama")
    LoadJob.objects.start(job.pk, "dead:1", now=timezone.now() - timedelta(minutes=10))
    queued = []
    monkeypatch.setattr(jobs, "enqueue_load_job", queued.append)

    result = tasks.reap_load_jobs()

    assert result.requeued == (job.pk,) and queued == [job.pk]


def test_reap_load_jobs_survives_a_broker_that_is_down_and_a_later_reap_enqueues_again(fleet, monkeypatch):
    """Redis down while a pass reaps: the pass goes on, the job stays pending, and once the
    broker answers a later reap (one stale window on) hands it over."""
    import redis

    job, _ = LoadJob.objects.claim_or_attach("llama")
    LoadJob.objects.start(job.pk, "dead:1", now=timezone.now() - timedelta(minutes=10))

    def broker_down(job_id):
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(jobs, "enqueue_load_job", broker_down)
    result = tasks.reap_load_jobs()

    assert result.requeued == (job.pk,)
    assert LoadJob.objects.get(pk=job.pk).state == LoadJob.State.PENDING

    queued = []
    monkeypatch.setattr(jobs, "enqueue_load_job", queued.append)
    tasks.reap_load_jobs(now=timezone.now() + timedelta(hours=1))
    assert queued == [job.pk]


def test_housekeeping_expires_sweeps_and_reaps(fleet, monkeypatch):
    gpu = fleet.add_node("gpu-1")
    row = make_replica(gpu.node, "llama", 0, in_flight=5)
    now = timezone.now()
    Lease.objects.pick_and_grant("llama", ttl=1, now=now - timedelta(minutes=1))
    monkeypatch.setattr(jobs, "enqueue_load_job", lambda job_id: None)

    summary = tasks.housekeeping(now)

    assert summary["leases_expired"] == 1
    assert summary["in_flight_corrected"] == 1
    row.refresh_from_db()
    assert row.in_flight == 0
    assert set(summary) >= {"load_jobs_requeued", "load_jobs_failed", "leases_purged", "load_jobs_purged"}
