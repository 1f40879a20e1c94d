"""Concurrent API calls against PostgreSQL (SQLite serialises writers and ignores row locks)."""

import threading

import pytest
from django.db import transaction
from rest_framework.test import APIClient

from registry.models import ModelLoadInfo, Node, NodeModel
from tests.api.conftest import REGISTRATION_TOKEN
from tests.factories import make_node

THREADS = 8


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_registration_of_one_name_yields_one_node_and_no_server_error(close_thread_connections):
    barrier = threading.Barrier(THREADS)
    answers: list[tuple[int, dict]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def register(index: int) -> None:
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {REGISTRATION_TOKEN}")
            body = {"name": "gpu-race", "address": f"10.0.0.{index}:50051", "total_vram": 1024}
            barrier.wait(timeout=10)
            response = client.post("/api/node/register", body, format="json")
            with lock:
                answers.append((response.status_code, response.json()))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append(exc)
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=register, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
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
    deleted, release, reported = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, object] = {}
    errors: list[BaseException] = []

    def delete() -> None:
        try:
            with transaction.atomic():
                outcome["deleted"] = Node.objects.deregister(node.pk)
                deleted.set()
                release.wait(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            close_thread_connections()

    def report() -> None:
        try:
            deleted.wait(timeout=10)
            outcome["report"] = NodeModel.objects.report_loaded(
                node.pk, "llama", 0, address="10.0.0.1:4000", backend_type="x", opts_blob=b"\x0a\x01m"
            )
            reported.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=delete), threading.Thread(target=report)]
    for thread in threads:
        thread.start()
    assert deleted.wait(timeout=10)
    assert not reported.wait(timeout=0.5), "the report did not wait for the node's row lock"
    release.set()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors, errors
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
    reported, release, deleted = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, object] = {}
    errors: list[BaseException] = []

    def report() -> None:
        try:
            with transaction.atomic():
                outcome["report"] = NodeModel.objects.report_loaded(
                    node.pk, "llama", 0, address="10.0.0.1:4000", backend_type="x", opts_blob=b"\x0a\x01m"
                )
                reported.set()
                release.wait(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            close_thread_connections()

    def delete() -> None:
        try:
            reported.wait(timeout=10)
            outcome["deleted"] = Node.objects.deregister(node.pk)
            deleted.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=report), threading.Thread(target=delete)]
    for thread in threads:
        thread.start()
    assert reported.wait(timeout=10)
    assert not deleted.wait(timeout=0.5), "the deletion did not wait for the node's row lock"
    release.set()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors, errors
    assert outcome["deleted"] is True and outcome["report"] is not None
    assert not Node.objects.filter(pk=node.pk).exists()
    assert not NodeModel.objects.exists()
    assert ModelLoadInfo.objects.filter(model_name="llama").exists()  # load info outlives nodes
