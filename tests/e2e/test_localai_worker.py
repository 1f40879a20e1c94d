"""LocalAI's own workers against the real control plane: real processes on loopback.

gunicorn (PostgreSQL) + ``manage.py reconcile --loop`` + one reference worker + two processes
speaking LocalAI's worker wire exactly (``tests/e2e/localai_worker.py``: the fleet token as
bearer on every call, LocalAI's body shapes, its graceful shutdown). Over several heartbeat
intervals the LocalAI nodes stay healthy (never stale, the mass-staleness guard never trips),
are shown with their credential mode, worker-service state and disk figures, are never placed
on (no StartBackend reaches them), and deregister with 200 on SIGTERM.
"""

import json
import signal
import sys
import time

import pytest

from tests.e2e.harness import TOKEN, fast_settings, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

GIB = 1024**3
OBSERVE_SECONDS = 10.0  # 10 heartbeat intervals, 2.5 times the stale threshold (4 s)


def start_localai_worker(fleet, name: str, *extra: str):
    address = f"127.0.0.1:{free_port()}"
    process = fleet.spawn(
        f"localai-{name}",
        [
            sys.executable,
            "-m",
            "tests.e2e.localai_worker",
            "--frontend",
            fleet.base_url,
            "--token",
            TOKEN,
            "--name",
            name,
            "--address",
            address,
            "--heartbeat-interval",
            "1",
            *extra,
        ],
    )
    process.address = address
    return process


def calls(process) -> list[dict]:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def statuses(process, call: str) -> list[int]:
    return [entry["status"] for entry in calls(process) if entry.get("call") == call]


def test_localai_workers_stay_healthy_are_not_placed_on_and_deregister_with_200(fleet):
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"))
    fleet.start_web()
    fleet.start_worker("reference-1", slots=1)
    fleet.wait_nodes({"reference-1"})
    # "mac": a backend already runs at its advertised port (LocalAI gives the first backend that
    # port) and records every gRPC method called; "cuda": nothing listens at its address yet.
    mac = start_localai_worker(fleet, "mac", "--gpu-vendor", "apple", "--backend-at-address")
    cuda = start_localai_worker(fleet, "cuda", "--gpu-vendor", "nvidia", "--total-vram", str(24 * GIB))
    nodes = fleet.wait_nodes({"reference-1", "mac", "cuda"}, timeout=30)
    assert statuses(mac, "register") == [201] and statuses(cuda, "register") == [201]
    registered = [entry["body"] for entry in calls(mac) if entry.get("call") == "register"][0]
    assert "node_token" not in registered and registered["auth_mode"] == "fleet_token"

    fleet.start_reconciler(1.0)
    fleet.set_floor("tiny", 3)  # more than the reference worker's one slot: the rest must not go to LocalAI

    first_beat = {name: nodes[name]["last_heartbeat"] for name in ("mac", "cuda")}
    deadline = time.monotonic() + OBSERVE_SECONDS
    while time.monotonic() < deadline:
        shown = fleet.nodes()
        assert shown["mac"]["status"] == "healthy" and shown["cuda"]["status"] == "healthy", shown
        time.sleep(0.5)

    shown = fleet.nodes()
    for name, process in (("mac", mac), ("cuda", cuda)):
        node = shown[name]
        assert node["last_heartbeat"] != first_beat[name]
        assert (node["auth_mode"], node["worker_api"]) == ("fleet_token", "missing"), node
        assert process.address in node["worker_api_detail"]
        assert (node["total_disk"], node["available_disk"]) == (2048 * GIB, 900 * GIB)
        beats = statuses(process, "heartbeat")
        assert len(beats) >= OBSERVE_SECONDS - 2 and set(beats) == {200}, beats
    assert shown["mac"]["gpu_vendor"] == "apple"
    assert "UNIMPLEMENTED" in shown["mac"]["worker_api_detail"]
    assert "UNAVAILABLE" in shown["cuda"]["worker_api_detail"]
    assert (shown["reference-1"]["auth_mode"], shown["reference-1"]["worker_api"]) == ("node_token", "available")

    # placed on the reference worker only; the LocalAI nodes were never sent StartBackend
    fleet.wait_converged("tiny", 1, 30)
    rows = fleet.replica_rows("tiny")
    assert {row["node"] for row in rows} == {"reference-1"}, rows
    grpc_calls = {entry["grpc"] for entry in calls(mac) if "grpc" in entry}
    assert grpc_calls == {"/controlplane.worker.v1.Worker/ListBackends"}, grpc_calls
    assert not fleet.sql(
        "SELECT 1 FROM registry_loadfailure f JOIN registry_node n ON n.id = f.node_id WHERE n.name IN ('mac', 'cuda')"
    )
    # nobody went stale: no node marked offline, the mass-staleness guard never tripped
    assert not fleet.events("node_offline") and not fleet.events("mass_staleness_guard")
    summaries = [row[0] for row in fleet.sql("SELECT summary FROM reconciler_reconcilepass")]
    assert summaries and not [s for s in summaries if "mass_staleness" in (s.get("skipped") or {})]

    # SIGTERM: LocalAI's GracefulDeregister, each call answered 200
    assert fleet.stop(mac, signal.SIGTERM) == 0
    assert (statuses(mac, "drain"), statuses(mac, "deregister")) == ([200], [200])
    assert statuses(mac, "models") and set(statuses(mac, "models")) == {200}
    wait_for(lambda: fleet.nodes()["mac"]["status"] == "offline", timeout=5, what="mac offline")
    assert fleet.nodes()["cuda"]["status"] == "healthy"
    assert TOKEN not in mac.log()
