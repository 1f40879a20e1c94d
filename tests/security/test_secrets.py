"""Secrets stay secret: not in logs, not in API answers after creation; gRPC services refuse
calls without the fleet token; secrets are compared in constant time."""

import hmac
import io
import logging
import os
import subprocess
import sys
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.test import APIClient

from core import tokens
from proto import client
from tests.clients import client_with
from tests.processes import free_port, wait_for

pytestmark = pytest.mark.django_db


def _windows(secret: str, skip: int = 0, size: int = 12):
    """Every ``size``-character substring of ``secret`` after its first ``skip`` characters (a
    key's displayed prefix is meant to be shown)."""
    return {secret[i : i + size] for i in range(skip, max(skip, len(secret) - size) + 1)}


def _leaks(text: str, secrets: dict[str, tuple[str, int]]) -> list[str]:
    return [name for name, (secret, skip) in secrets.items() if any(w in text for w in _windows(secret, skip))]


@pytest.fixture
def random_registration_token(settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = uuid.uuid4().hex + uuid.uuid4().hex
    return settings.CONTROLPLANE_REGISTRATION_TOKEN


def _register(token: str, name: str) -> dict:
    api = client_with(token)
    response = api.post(
        "/api/node/register",
        {
            "name": name,
            "address": "127.0.0.1:50999",
            "total_vram": 8 * 2**30,
            "max_replicas_per_model": 1,
            "auth_mode": "node_token",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def test_no_secret_in_logs_during_registration_heartbeat_and_key_creation(random_registration_token, caplog):
    caplog.set_level(logging.DEBUG)
    stdout = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        node = _register(random_registration_token, "sec-logs")
        worker = client_with(node['node_token'])
        assert (
            worker.post(f"/api/node/{node['id']}/heartbeat", {"available_vram": 2**30}, format="json").status_code
            == 200
        )
        bad = APIClient()
        bad.credentials(HTTP_AUTHORIZATION=f"Bearer {node['node_token']}x")
        assert bad.post(f"/api/node/{node['id']}/heartbeat", {}, format="json").status_code in (401, 403)
        call_command("create_api_key", "sec-logs", "--role", "operator", stdout=stdout)
        key = stdout.getvalue().strip()
        operator = client_with(key)
        assert operator.get("/api/v1/nodes").status_code == 200
        wrong = client_with(random_registration_token)
        assert wrong.get("/api/v1/nodes").status_code in (401, 403)
    assert key.startswith("cpk_")
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {getattr(r, 'exc_text', '')}" for r in caplog.records)
    assert caplog.records  # the capture works: registration logs something
    secrets = {
        "registration": (random_registration_token, 0),
        "node": (node["node_token"], 0),
        "worker command": (node["worker_token"], 0),
        "backend": (node["backend_token"], 0),
        "api key": (key, 12),
    }
    assert not _leaks(logged, secrets), logged[-2000:]


def test_no_secret_in_api_answers_after_creation(random_registration_token):
    node = _register(random_registration_token, "sec-answers")
    token = node["node_token"]
    stdout = io.StringIO()
    call_command("create_api_key", "sec-answers", "--role", "operator", stdout=stdout)
    key = stdout.getvalue().strip()
    secrets = {
        "registration": (random_registration_token, 0),
        "node": (token, 0),
        "worker command": (node["worker_token"], 0),
        "backend": (node["backend_token"], 0),
        "api key": (key, 12),
        "node hash": (tokens.hash_token(token), 0),
        "key hash": (tokens.hash_token(key), 0),
    }

    operator = client_with(key)
    worker = client_with(token)
    answers = [
        worker.post(f"/api/node/{node['id']}/heartbeat", {"available_vram": 2**30}, format="json"),
        worker.get(f"/api/node/{node['id']}/models"),
        operator.get("/api/v1/nodes"),
        operator.get(f"/api/v1/nodes/{node['id']}"),
        operator.get("/api/v1/events"),
        operator.get("/api/schema/"),
    ]
    for response in answers:
        assert response.status_code == 200, response.content[:300]
        assert not _leaks(response.content.decode(errors="replace"), secrets), response.content[:500]

    # the admin (a superuser) shows neither a plaintext nor a stored hash
    admin = get_user_model().objects.create_superuser("sec-admin", password="x-" + uuid.uuid4().hex)
    browser = APIClient()
    browser.force_login(admin)
    from core.models import ApiKey
    from registry.models import Node

    api_key = ApiKey.objects.get(name="sec-answers")
    for path in (
        "/admin/controlplane/apikey/",
        f"/admin/controlplane/apikey/{api_key.pk}/change/",
        "/admin/registry/node/",
        f"/admin/registry/node/{Node.objects.get(name='sec-answers').pk}/change/",
    ):
        response = browser.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert not _leaks(response.content.decode(errors="replace"), secrets), path


def test_echo_backend_and_worker_service_refuse_calls_without_the_token():
    token = "grpc-" + uuid.uuid4().hex
    port = free_port()
    env = {**os.environ, "LOCALAI_GRPC_AUTH_TOKEN": token}
    backend = subprocess.Popen(
        [sys.executable, "-m", "worker.backends.echo", "--addr", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from worker.processes import BackendSupervisor
    from worker.service import build_server

    supervisor = BackendSupervisor({}, auth_token=token)
    server, worker_port = build_server(supervisor, token=token, bind="127.0.0.1:0")
    try:
        address = f"127.0.0.1:{port}"
        wait_for(
            lambda: client.probe(address, token=token, timeout=1).outcome is client.Probe.ALIVE,
            timeout=20,
            what="echo backend up",
        )
        for presented in (None, "wrong-" + token):
            assert client.probe(address, token=presented, timeout=2).code.name == "UNAUTHENTICATED"
            with pytest.raises(client.GrpcCallError) as refused:
                client.predict(address, "hi", token=presented, timeout=2)
            assert refused.value.code.name == "UNAUTHENTICATED"
            with pytest.raises(client.GrpcCallError) as refused:
                client.list_backends(f"127.0.0.1:{worker_port}", token=presented, timeout=2)
            assert refused.value.code.name == "UNAUTHENTICATED"
            with pytest.raises(client.GrpcCallError) as refused:
                client.start_backend(f"127.0.0.1:{worker_port}", "m", "echo", 0, token=presented, timeout=2)
            assert refused.value.code.name == "UNAUTHENTICATED"
        assert client.probe(address, token=token, timeout=2).outcome is client.Probe.ALIVE
        client.list_backends(f"127.0.0.1:{worker_port}", token=token, timeout=2)
    finally:
        server.stop(0)
        backend.kill()
        backend.wait(10)


def test_secrets_are_compared_in_constant_time(monkeypatch, random_registration_token):
    calls = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    assert tokens.secret_matches("abc", "abc") and not tokens.secret_matches("abd", "abc")
    assert tokens.token_matches("abc", tokens.hash_token("abc")) and not tokens.token_matches(
        "x", tokens.hash_token("abc")
    )
    assert len(calls) == 4
    calls.clear()
    # the registration endpoint goes through it
    _register(random_registration_token, "sec-ct")
    assert any(random_registration_token.encode() in (a, b) for a, b in calls)
    calls.clear()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Bearer " + "0" * 64)
    assert (
        api.post("/api/node/register", {"name": "sec-ct-bad", "address": "127.0.0.1:1"}, format="json").status_code
        == 401
    )
    assert calls
