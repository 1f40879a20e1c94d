"""Concurrent API calls against PostgreSQL (SQLite serialises writers and ignores row locks)."""

import threading

import pytest
from rest_framework.test import APIClient

from registry.models import Node
from tests.api.conftest import REGISTRATION_TOKEN

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
