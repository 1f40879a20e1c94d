"""Concurrent API calls against PostgreSQL (SQLite serialises writers and ignores row locks)."""

from contextlib import contextmanager

import pytest
from django.db import transaction

from registry.models import ModelLoadInfo, Node, NodeModel
from tests.clients import REGISTRATION_TOKEN, client_with
from tests.concurrency import THREADS, held_in_another_thread, run_in_threads, start_in_thread
from tests.factories import make_node


def report_llama(node):
    return NodeModel.objects.report_loaded(
        node.pk, "llama", 0, address="10.0.0.1:4000", backend_type="x", opts_blob=b"\x0a\x01m"
    )


def not_done_while_held(future) -> bool:
    """The other call is still waiting half a second after it started."""
    try:
        future.result(timeout=0.5)
    except TimeoutError:
        return True
    return False


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_registration_of_one_name_yields_one_node_and_no_server_error(close_thread_connections):
    def register(index: int) -> tuple[int, dict]:
        body = {"name": "gpu-race", "address": f"10.0.0.{index}:50051", "total_vram": 1024}
        response = client_with(REGISTRATION_TOKEN).post("/api/node/register", body, format="json")
        return response.status_code, response.json()

    answers = run_in_threads(register, close_thread_connections)

    statuses = sorted(status for status, _ in answers)
    assert len(statuses) == THREADS
    assert all(status < 500 for status in statuses), answers
    # The verb retries a lost insert race as a re-registration, so every caller succeeds.
    assert set(statuses) <= {201, 409}, answers
    assert Node.objects.filter(name="gpu-race").count() == 1
    node = Node.objects.get(name="gpu-race")
    assert {body["id"] for status, body in answers if status == 201} == {str(node.pk)}


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_replica_report_waits_for_a_deletion_of_its_node_and_then_stores_nothing(close_thread_connections):
    """``NodeModel.objects.report_loaded`` locks the node row first: while a deletion of the
    node is uncommitted the report waits, and once it commits the report stores nothing and
    answers None (the API's 400 "Unknown node"), instead of failing on the foreign key."""
    node = make_node(name="going-away")
    outcome: dict[str, object] = {}

    @contextmanager
    def deletion_not_yet_committed():
        with transaction.atomic():
            outcome["deleted"] = Node.objects.deregister(node.pk)
            yield

    with held_in_another_thread(deletion_not_yet_committed, close_thread_connections) as commit:
        report = start_in_thread(lambda: report_llama(node), close_thread_connections)
        assert not_done_while_held(report), "the report did not wait for the node's row lock"
        commit()
        outcome["report"] = report.result(timeout=30)

    assert outcome == {"deleted": True, "report": None}
    assert not NodeModel.objects.exists()
    assert not ModelLoadInfo.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_deletion_waits_for_a_replica_report_of_its_node_and_then_deletes_its_row(close_thread_connections):
    """The other order: ``Node.objects.deregister`` locks the node row before Django collects
    the rows that cascade, so a report committing meanwhile is collected and deleted with the
    node (without the lock the delete failed on the foreign key of the reported row)."""
    node = make_node(name="reporting")
    outcome: dict[str, object] = {}

    @contextmanager
    def report_not_yet_committed():
        with transaction.atomic():
            outcome["report"] = report_llama(node)
            yield

    with held_in_another_thread(report_not_yet_committed, close_thread_connections) as commit:
        deletion = start_in_thread(lambda: Node.objects.deregister(node.pk), close_thread_connections)
        assert not_done_while_held(deletion), "the deletion did not wait for the node's row lock"
        commit()
        outcome["deleted"] = deletion.result(timeout=30)

    assert outcome["deleted"] is True and outcome["report"] is not None
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeModel.objects.exists()
    assert ModelLoadInfo.objects.filter(model_name="llama").exists()  # load info outlives nodes
