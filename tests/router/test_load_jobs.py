"""LoadJob verbs: one active job per model, runner ownership, takeover and reaping of dead
runners (no leftover ``loading`` row or VRAM reservation), and the failed-load backoff."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction

from registry.models import LoadFailure, LoadJob, Node, NodeModel
from tests.factories import GIB, make_load_job, make_node, make_replica

pytestmark = pytest.mark.django_db

RUNNER, OTHER = "host-a:100", "host-b:200"


def loading_row_with_reservation(node, amount=4 * GIB):
    """What a runner leaves behind mid-load: a ``loading`` row and its VRAM reservation."""
    return make_replica(node, "llama", 0, state=NodeModel.State.LOADING, reserved_vram=amount)


def running_job(now, *, runner=RUNNER, replica=None):
    job, _ = LoadJob.objects.claim_or_attach("llama", backend_type="echo", opts_blob=b"x", now=now)
    assert LoadJob.objects.start(job.pk, runner, now=now)
    if replica is not None:
        assert LoadJob.objects.record_replica(job.pk, runner, replica.pk, now=now)
    return LoadJob.objects.get(pk=job.pk)


def test_claim_creates_one_job_and_later_callers_attach_to_it(now):
    first, created = LoadJob.objects.claim_or_attach("llama", backend_type="echo", opts_blob=b"blob", now=now)
    second, created_again = LoadJob.objects.claim_or_attach("llama", now=now)

    assert (created, created_again) == (True, False)
    assert second.pk == first.pk
    assert LoadJob.objects.count() == 1
    assert (first.state, first.backend_type, bytes(first.opts_blob)) == ("pending", "echo", b"blob")


def test_the_database_allows_one_active_job_per_model_but_any_number_of_finished_ones(now):
    make_load_job("llama", LoadJob.State.SUCCEEDED, now=now)
    make_load_job("llama", LoadJob.State.FAILED, now=now)
    make_load_job("llama", LoadJob.State.RUNNING, now=now)
    make_load_job("phi", LoadJob.State.PENDING, now=now)
    # A bare insert on purpose: claim_or_attach attaches to the active job, so only the
    # partial unique index is left to refuse a second one.
    with pytest.raises(IntegrityError), transaction.atomic():
        LoadJob.objects.create(model_name="llama", state=LoadJob.State.PENDING)


def test_a_claim_after_the_job_finished_creates_a_new_job(now):
    job, _ = LoadJob.objects.claim_or_attach("llama", now=now)
    LoadJob.objects.fail(job.pk, code="load_failed", message="boom", now=now)

    again, created = LoadJob.objects.claim_or_attach("llama", now=now)

    assert created and again.pk != job.pk


def test_claim_rejects_an_empty_model_name(now):
    with pytest.raises(ValueError):
        LoadJob.objects.claim_or_attach(" ", now=now)


def test_only_one_runner_starts_a_job_and_only_it_may_heartbeat_or_finish(now):
    job, _ = LoadJob.objects.claim_or_attach("llama", now=now)
    assert LoadJob.objects.start(job.pk, RUNNER, now=now)
    assert not LoadJob.objects.start(job.pk, OTHER, now=now)

    assert not LoadJob.objects.heartbeat(job.pk, OTHER, now=now)
    assert LoadJob.objects.heartbeat(job.pk, RUNNER, progress="loading", now=now + timedelta(seconds=5))

    job.refresh_from_db()
    assert (job.state, job.runner, job.attempts, job.progress) == ("running", RUNNER, 1, "loading")
    assert job.heartbeat_at == now + timedelta(seconds=5)


def test_succeed_records_the_replica_coordinates(now):
    node = make_node()
    replica = make_replica(node, "llama", 0, address="127.0.0.1:7000")
    job = running_job(now)

    assert not LoadJob.objects.succeed(job.pk, OTHER, replica, now=now)
    assert LoadJob.objects.succeed(job.pk, RUNNER, replica, now=now)

    job.refresh_from_db()
    assert (job.state, job.node_id, job.replica_index, job.address) == ("succeeded", node.pk, 0, "127.0.0.1:7000")
    assert job.finished_at == now and job.replica_id == replica.pk


def test_fail_removes_the_loading_row_the_job_recorded_and_its_reservation(now):
    node = make_node(total_vram=24 * GIB)
    row = loading_row_with_reservation(node)
    job = running_job(now, replica=row)

    assert LoadJob.objects.fail(job.pk, code="load_failed", message="LoadModel said no", runner=RUNNER, now=now)
    assert not LoadJob.objects.fail(job.pk, code="load_failed", message="again", now=now)

    job.refresh_from_db()
    node.refresh_from_db()
    assert (job.state, job.error_code, job.error_message) == ("failed", "load_failed", "LoadModel said no")
    assert not NodeModel.objects.exists()
    assert node.reserved_vram == 0


def test_take_over_needs_a_stale_heartbeat(now):
    job = running_job(now)

    assert not LoadJob.objects.take_over(job.pk, OTHER, stale_before=now - timedelta(seconds=60), now=now)
    assert LoadJob.objects.take_over(job.pk, OTHER, stale_before=now + timedelta(seconds=1), now=now)
    # The old runner is now a stranger to its job.
    assert not LoadJob.objects.heartbeat(job.pk, RUNNER, now=now)

    job.refresh_from_db()
    assert (job.runner, job.attempts) == (OTHER, 2)


def test_take_over_cleans_the_dead_runners_loading_row_and_reservation(now):
    node = make_node(total_vram=24 * GIB)
    job = running_job(now, replica=loading_row_with_reservation(node))

    later = now + timedelta(minutes=5)
    assert LoadJob.objects.take_over(job.pk, OTHER, stale_before=later - timedelta(seconds=60), now=later)

    node.refresh_from_db()
    job.refresh_from_db()
    assert not NodeModel.objects.exists()
    assert node.reserved_vram == 0
    assert job.replica_id is None


def test_take_over_leaves_a_row_that_reached_loaded_alone(now):
    node = make_node()
    row = make_replica(node, "llama", 0, state=NodeModel.State.LOADED)
    job = running_job(now, replica=row)

    assert LoadJob.objects.take_over(job.pk, OTHER, stale_before=now + timedelta(seconds=1), now=now)

    assert NodeModel.objects.filter(pk=row.pk).exists()


def test_take_over_refuses_a_job_without_attempts_left(now):
    job = running_job(now)
    stale = now + timedelta(seconds=1)
    assert LoadJob.objects.take_over(job.pk, OTHER, stale_before=stale, max_attempts=3, now=now)
    assert LoadJob.objects.take_over(job.pk, RUNNER, stale_before=stale, max_attempts=3, now=now)
    assert not LoadJob.objects.take_over(job.pk, OTHER, stale_before=stale, max_attempts=3, now=now)


def test_reap_dead_requeues_a_stale_running_job_with_no_leftovers(now):
    node = make_node(total_vram=24 * GIB)
    job = running_job(now, replica=loading_row_with_reservation(node))

    result = LoadJob.objects.reap_dead(now=now + timedelta(seconds=61), stale_after=timedelta(seconds=60))

    job.refresh_from_db()
    node.refresh_from_db()
    assert result.requeued == (job.pk,) and result.failed == () and result.cleaned == 1
    assert (job.state, job.runner, job.replica_id) == ("pending", "", None)
    assert not NodeModel.objects.exists()
    assert node.reserved_vram == 0
    # A new runner can start it again.
    assert LoadJob.objects.start(job.pk, OTHER, now=now)


def test_reap_dead_fails_a_job_that_ran_out_of_attempts(now):
    node = make_node(total_vram=24 * GIB)
    job = running_job(now, replica=loading_row_with_reservation(node))

    result = LoadJob.objects.reap_dead(now=now + timedelta(minutes=2), max_attempts=1)

    job.refresh_from_db()
    node.refresh_from_db()
    assert result.failed == (job.pk,) and result.requeued == ()
    assert (job.state, job.error_code) == ("failed", "load_failed")
    assert "stopped responding" in job.error_message
    assert not NodeModel.objects.exists() and node.reserved_vram == 0


def test_reap_dead_leaves_live_runners_and_finished_jobs_alone(now):
    live = running_job(now)
    make_load_job("phi", LoadJob.State.SUCCEEDED, now=now - timedelta(hours=1))

    result = LoadJob.objects.reap_dead(now=now + timedelta(seconds=30), stale_after=timedelta(seconds=60))

    assert result.requeued == result.failed == ()
    assert LoadJob.objects.get(pk=live.pk).state == "running"


def test_reap_dead_requeues_a_pending_job_nobody_started_once_per_window(now):
    job, _ = LoadJob.objects.claim_or_attach("llama", now=now)
    later = now + timedelta(seconds=61)

    assert LoadJob.objects.reap_dead(now=later).requeued == (job.pk,)
    assert LoadJob.objects.reap_dead(now=later + timedelta(seconds=1)).requeued == ()
    assert LoadJob.objects.reap_dead(now=later + timedelta(seconds=61)).requeued == (job.pk,)


def test_purge_deletes_only_old_finished_jobs(now):
    old = make_load_job("a", LoadJob.State.SUCCEEDED, now=now - timedelta(days=2))
    make_load_job("b", LoadJob.State.FAILED, now=now)
    make_load_job("c", LoadJob.State.PENDING, now=now)

    assert LoadJob.objects.purge(finished_before=now - timedelta(days=1)) == 1
    assert not LoadJob.objects.filter(pk=old.pk).exists()
    assert LoadJob.objects.count() == 2


# --- failed-load backoff -----------------------------------------------------------------------


def test_load_failures_back_off_doubling_and_clear_on_success(now):
    node = make_node()

    first = LoadFailure.objects.record("llama", node.pk, "boom", now=now)
    second = LoadFailure.objects.record("llama", node.pk, "boom again", now=now)

    assert (first.failures, first.retry_after) == (1, now + timedelta(seconds=10))
    assert (second.failures, second.retry_after, second.last_error) == (2, now + timedelta(seconds=20), "boom again")
    assert LoadFailure.objects.count() == 1
    assert LoadFailure.objects.clear("llama", node.pk)
    assert not LoadFailure.objects.clear("llama", node.pk)


def test_a_load_failure_goes_with_its_node(now):
    node = make_node()
    LoadFailure.objects.record("llama", node.pk, "boom", now=now)
    Node.objects.deregister(node.pk)
    assert not LoadFailure.objects.exists()


# --- VRAM credit after an eviction ---------------------------------------------------------------


def test_credit_vram_returns_a_pending_reservation_first():
    node = make_node(total_vram=24 * GIB)
    Node.objects.reserve_vram(node.pk, 6 * GIB)

    assert Node.objects.credit_vram(node.pk, 6 * GIB)

    node.refresh_from_db()
    assert (node.reserved_vram, node.available_vram) == (0, 24 * GIB)


def test_credit_vram_adds_back_to_a_reported_figure_capped_at_total():
    node = make_node(total_vram=24 * GIB)
    Node.objects.heartbeat(node.pk, available_vram=20 * GIB)

    assert Node.objects.credit_vram(node.pk, 3 * GIB)
    node.refresh_from_db()
    assert node.available_vram == 23 * GIB

    assert Node.objects.credit_vram(node.pk, 3 * GIB)
    node.refresh_from_db()
    assert node.available_vram == 24 * GIB
