"""The worker's side of the node API (register, heartbeat, drain/deregister) against a fake
control plane that records requests. Everything runs in-process; no backend processes."""

import logging
import threading
import time

import pytest

from tests.processes import free_port
from tests.worker.conftest import TOKEN, problem
from worker.agent import WorkerAgent
from worker.config import WorkerConfig
from worker.control_plane import (
    ControlPlaneClient,
    RegistrationAborted,
    RegistrationFailed,
    register_with_retry,
)


class StubSupervisor:
    """Stands in for BackendSupervisor: reports a memory figure, has nothing to stop."""

    def __init__(self, in_use: int | None = 0):
        self.in_use = in_use
        self.stopped = False

    def memory_in_use(self, timeout: float = 1.0):
        return self.in_use

    def stop_all(self):
        self.stopped = True
        return 0


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded (the backoff delays)."""

    def __init__(self, stop_after: int | None = None):
        super().__init__()
        self.waits: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.stop_after is not None and len(self.waits) >= self.stop_after


def make_agent(url, supervisor=None, **options) -> WorkerAgent:
    options.setdefault("total_vram", 24_000_000_000)
    options.setdefault("register_base_delay", 0.01)
    options.setdefault("drain_poll_interval", 0.02)
    config = WorkerConfig(
        registration_token=TOKEN,
        name="gpu-box-1",
        advertise_host="10.0.0.7",
        port=50051,
        control_plane=url,
        labels={"zone": "eu"},
        max_replicas_per_model=2,
        **options,
    )
    return WorkerAgent(config, supervisor=supervisor or StubSupervisor())


# ----- registration ---------------------------------------------------------------------------


def test_registration_sends_the_documented_body_and_keeps_the_node_token(control_plane):
    agent = make_agent(control_plane.url)
    agent.register(tries=1)
    [call] = control_plane.calls("register")
    assert (call.method, call.path, call.authorization) == ("POST", "/api/node/register", f"Bearer {TOKEN}")
    assert call.body == {
        "name": "gpu-box-1",
        "node_type": "backend",
        "address": "10.0.0.7:50051",
        "token": TOKEN,
        "total_vram": 24_000_000_000,
        "available_vram": 24_000_000_000,
        "gpu_vendor": "unknown",
        "labels": {"zone": "eu"},
        "max_replicas_per_model": 2,
        "auth_mode": "node_token",
        "serves_worker_api": True,
    }
    assert agent.node_id == "node-1"

    assert agent.heartbeat_once()
    [beat] = control_plane.calls("heartbeat")
    assert (beat.path, beat.authorization) == ("/api/node/node-1/heartbeat", "Bearer node-token-1")


def test_a_ram_only_worker_registers_ram(control_plane):
    agent = make_agent(control_plane.url, total_vram=None, total_ram=64_000_000_000)
    agent.register(tries=1)
    body = control_plane.calls("register")[0].body
    assert (body["total_ram"], body["available_ram"]) == (64_000_000_000, 64_000_000_000)
    assert "total_vram" not in body and "available_vram" not in body


def test_registration_retries_with_backoff_doubling_to_the_cap(control_plane):
    control_plane.script[("POST", "register")] = [(503, problem(503, "unavailable", "starting up"))] * 4 + [
        (429, problem(429, "throttled", "slow down"))
    ]
    stop = RecordingStop()
    client = ControlPlaneClient(control_plane.url)
    answer = register_with_retry(client, {"name": "n"}, TOKEN, base_delay=2.0, max_delay=10.0, stop=stop)
    assert answer["id"] == "node-1"
    assert stop.waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert len(control_plane.calls("register")) == 6


def test_registration_gives_up_after_the_configured_tries(control_plane):
    control_plane.script[("POST", "register")] = [(500, problem(500, "boom", "database down"))] * 10
    client = ControlPlaneClient(control_plane.url)
    with pytest.raises(RegistrationFailed, match="after 3 tries.*database down"):
        register_with_retry(client, {"name": "n"}, TOKEN, tries=3, stop=RecordingStop())
    assert len(control_plane.calls("register")) == 3


def test_registration_retries_an_unreachable_control_plane():
    client = ControlPlaneClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    stop = RecordingStop()
    with pytest.raises(RegistrationFailed, match="after 2 tries"):
        register_with_retry(client, {"name": "n"}, TOKEN, tries=2, base_delay=0.01, stop=stop)
    assert stop.waits == [0.01]


def test_a_bad_token_is_not_retried_and_the_problem_is_reported(control_plane, caplog):
    control_plane.script[("POST", "register")] = [(401, problem(401, "invalid_token", "registration token rejected"))]
    with pytest.raises(RegistrationFailed) as info:
        register_with_retry(ControlPlaneClient(control_plane.url), {"name": "n"}, TOKEN, stop=RecordingStop())
    assert "invalid_token" in str(info.value) and "registration token rejected" in str(info.value)
    assert len(control_plane.calls("register")) == 1


def test_shutdown_during_the_backoff_aborts_registration(control_plane):
    control_plane.script[("POST", "register")] = [(503, problem(503, "x", "y"))] * 5
    with pytest.raises(RegistrationAborted):
        register_with_retry(ControlPlaneClient(control_plane.url), {}, TOKEN, stop=RecordingStop(stop_after=1))


# ----- heartbeats -----------------------------------------------------------------------------


def test_heartbeat_reports_total_minus_what_backends_use(control_plane):
    agent = make_agent(control_plane.url, supervisor=StubSupervisor(in_use=4_000_000_000))
    agent.register(tries=1)
    agent.heartbeat_once()
    assert control_plane.calls("heartbeat")[-1].body == {"available_vram": 20_000_000_000}


def test_heartbeat_omits_an_unknown_available_value(control_plane):
    agent = make_agent(control_plane.url, supervisor=StubSupervisor(in_use=None))
    agent.register(tries=1)
    assert "available_vram" not in control_plane.calls("register")[0].body
    agent.heartbeat_once()
    assert control_plane.calls("heartbeat")[-1].body == {}

    unconfigured = make_agent(control_plane.url, total_vram=None)
    unconfigured.register(tries=1)
    unconfigured.heartbeat_once()
    assert control_plane.calls("heartbeat")[-1].body == {}


@pytest.mark.parametrize("status", [404, 401])
def test_a_forgotten_node_registers_again_and_uses_the_new_identity(control_plane, status):
    agent = make_agent(control_plane.url)
    agent.register(tries=1)
    control_plane.script[("POST", "heartbeat")] = [(status, problem(status, "gone", "who are you"))]
    assert agent.heartbeat_once()
    assert agent.node_id == "node-2"
    agent.heartbeat_once()
    assert control_plane.verbs() == ["register", "heartbeat", "register", "heartbeat"]
    last = control_plane.calls("heartbeat")[-1]
    assert (last.path, last.authorization) == ("/api/node/node-2/heartbeat", "Bearer node-token-2")


def test_a_heartbeat_answer_naming_another_address_makes_the_worker_register_again(control_plane):
    # A database restored from a backup taken before the worker's last registration holds its
    # old address: the worker registers again (presenting its kept node token) to correct it.
    agent = make_agent(control_plane.url)
    agent.register(tries=1)
    control_plane.script[("POST", "heartbeat")] = [(200, {"status": "healthy", "address": "127.0.0.1:1"})]
    assert agent.heartbeat_once()
    assert control_plane.verbs() == ["register", "heartbeat", "register"]
    assert control_plane.calls("register")[-1].body["address"] == agent.config.address


def test_network_errors_are_logged_and_never_raised(control_plane, caplog):
    agent = make_agent(control_plane.url)
    agent.register(tries=1)
    control_plane.close()
    with caplog.at_level(logging.WARNING):
        assert agent.heartbeat_once() is False
    assert "heartbeat failed" in caplog.text


def test_tokens_never_appear_in_logs(control_plane, caplog):
    agent = make_agent(control_plane.url)
    with caplog.at_level(logging.DEBUG):
        agent.register(tries=1)
        control_plane.script[("POST", "heartbeat")] = [(500, problem(500, "x", "y"))]
        agent.heartbeat_once()
        control_plane.script[("POST", "heartbeat")] = [(404, problem(404, "x", "y"))]
        control_plane.script[("POST", "register")] = [(401, problem(401, "bad", "no"))]
        agent.heartbeat_once()
        agent.shutdown()
    assert caplog.text
    assert TOKEN not in caplog.text and "node-token-1" not in caplog.text


# ----- graceful shutdown -----------------------------------------------------------------------


def test_shutdown_drains_waits_for_in_flight_then_deregisters(control_plane):
    supervisor = StubSupervisor()
    agent = make_agent(control_plane.url, supervisor=supervisor)
    agent.register(tries=1)
    row = {"model_name": "m", "replica_index": 0, "state": "loaded", "address": "10.0.0.7:50100"}
    control_plane.models_answers = [[{**row, "in_flight": 2}], [{**row, "in_flight": 1}], [{**row, "in_flight": 0}]]
    agent.shutdown()
    assert control_plane.verbs() == ["register", "drain", "models", "models", "models", "deregister"]
    assert all(c.authorization == "Bearer node-token-1" for c in control_plane.calls()[1:])
    assert [c.method for c in control_plane.calls("models")] == ["GET"] * 3
    assert supervisor.stopped


def test_shutdown_stops_waiting_after_the_drain_timeout(control_plane):
    agent = make_agent(control_plane.url, drain_timeout=0.2)
    agent.register(tries=1)
    control_plane.models_answers = [[{"model_name": "m", "replica_index": 0, "in_flight": 1}]]
    agent.shutdown()
    verbs = control_plane.verbs()
    assert verbs[:3] == ["register", "drain", "models"] and verbs[-1] == "deregister"
    assert 3 <= verbs.count("models") <= 20


def test_shutdown_still_stops_backends_when_the_control_plane_is_gone(control_plane):
    supervisor = StubSupervisor()
    agent = make_agent(control_plane.url, supervisor=supervisor, drain_timeout=0.1)
    agent.register(tries=1)
    control_plane.close()
    agent.shutdown()
    assert supervisor.stopped


def test_shutdown_does_not_wait_the_drain_timeout_when_the_control_plane_is_unreachable(control_plane):
    supervisor = StubSupervisor()
    agent = make_agent(control_plane.url, supervisor=supervisor, drain_timeout=30)
    agent.register(tries=1)
    control_plane.close()
    began = time.monotonic()
    agent.shutdown()
    assert time.monotonic() - began < 3 and supervisor.stopped
