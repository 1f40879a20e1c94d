"""/livez and /readyz."""

import socket
from datetime import timedelta

import pytest
from django.db import OperationalError, connections
from django.utils import timezone

from controlplane import health
from reconciler.models import ReconcilePass

pytestmark = pytest.mark.django_db


@pytest.fixture
def no_grace(settings):
    settings.READYZ_STARTUP_GRACE = 0
    settings.RECONCILE_INTERVAL = 10


def record_pass(*, ago: float, outcome=ReconcilePass.Outcome.OK):
    started = timezone.now() - timedelta(seconds=ago)
    ReconcilePass.objects.record(
        outcome=outcome,
        started_at=started,
        duration=timedelta(seconds=0.1),
        summary={},
        holder_host="t",
        holder_pid=1,
        keep=100,
    )


def test_livez_answers_ok_without_touching_the_database(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ok_with_a_recent_successful_pass(client, no_grace):
    record_pass(ago=5)
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "migrations", "reconciler"}


def test_readyz_fails_when_the_last_successful_pass_is_older_than_three_intervals(client, no_grace):
    record_pass(ago=31)
    record_pass(ago=1, outcome=ReconcilePass.Outcome.ERROR)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "not_ready"
    assert body["failing"] == ["reconciler"]
    assert body["checks"]["database"]["ok"] is True


def test_readyz_tolerates_no_pass_during_the_start_up_grace(client, settings):
    settings.READYZ_STARTUP_GRACE = 3600
    response = client.get("/readyz")
    assert response.status_code == 200
    assert "grace" in response.json()["checks"]["reconciler"]["detail"]


def test_readyz_skips_the_reconciler_check_when_not_required(client, no_grace, settings):
    settings.READYZ_REQUIRE_RECONCILER = False
    response = client.get("/readyz")
    assert response.status_code == 200
    assert "reconciler" not in response.json()["checks"]


def test_readyz_is_503_while_the_database_fails_and_200_after(client, no_grace, monkeypatch):
    """The database failure is simulated by patching the database check to raise
    OperationalError (the real failure on PostgreSQL is the next test)."""
    record_pass(ago=1)

    def unreachable():
        raise OperationalError("connection refused")

    monkeypatch.setattr(health, "check_database", unreachable)
    monkeypatch.setattr(health, "_close_broken_connection", lambda: None)  # keep the test transaction
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready"
    assert body["checks"]["database"] == {"ok": False, "detail": "OperationalError: connection refused"}
    assert body["checks"]["migrations"]["ok"] is False
    assert set(body["failing"]) == {"database", "migrations", "reconciler"}
    assert response["Retry-After"]

    monkeypatch.undo()
    assert client.get("/readyz").status_code == 200


def test_readyz_reports_unapplied_migrations(client, no_grace, monkeypatch):
    record_pass(ago=1)
    monkeypatch.setattr(health, "_migrations_applied", False)

    class Plan:
        def __init__(self, connection):
            self.loader = type("L", (), {"graph": type("G", (), {"leaf_nodes": lambda self: []})()})()

        def migration_plan(self, targets):
            return [(type("M", (), {"app_label": "registry", "name": "0099_future"})(), False)]

    monkeypatch.setattr(health, "MigrationExecutor", Plan)
    body = client.get("/readyz").json()
    assert body["failing"] == ["migrations"]
    assert "registry.0099_future" in body["checks"]["migrations"]["detail"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_readyz_against_a_real_unreachable_postgresql_then_recovered(client, no_grace, settings):
    record_pass(ago=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    connection = connections["default"]
    original_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = closed_port
    try:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["database"]["ok"] is False
        assert "OperationalError" in response.json()["checks"]["database"]["detail"]
    finally:
        connection.close()
        connection.settings_dict["PORT"] = original_port
    assert client.get("/readyz").status_code == 200
