"""Restore drill (issue 12): restore an old ``pg_dump`` of a running fleet while its workers keep
running, and watch the control plane converge by observation alone.

A private PostgreSQL cluster (``PrivatePostgres``) hosts the fleet so that ``pg_dump`` and
``pg_restore`` of the server's own major version are at hand. Three workers (2 slots each) run
three models at their floors: ``keep`` (2), ``shrink`` (2) and ``grow`` (1). The dump is taken
while everything runs. Then the fleet changes through its public verbs: ``grow`` is scaled to 3
(scheduling PUT), a new model ``fresh`` is routed (cold load), ``shrink``'s floor drops to 1 and
the idle replica above it is unloaded, a fourth worker registers, and ``drill-2`` restarts (it
registers again with the node token it kept: same node id). Web and reconciler are
stopped, the old dump is restored over the live database (``pg_restore --clean --if-exists``)
and both start again, the workers untouched throughout.

What the restored database claims and what the workers run now disagree everywhere, and the
control plane must settle it by looking: ``fresh``'s backend (unknown to the dump) and ``grow``'s
extra backends are orphans and stopped; ``shrink``'s unloaded replica, listed by the dump, is
gone from its worker, so its row is removed and the floor of 2 is re-placed; the fourth worker's
node id is unknown, its heartbeat is refused and it registers again; ``drill-2``'s node token is
derived from its node id, so the hash in the dump still matches the token it kept across its
restart and it just goes on heartbeating (a random token rotated at each registration left it
refused for good: found by this drill); the restored
``heartbeat_seen`` columns and pass history are an observation gap, so no live node is reaped;
and ``check_invariants`` holds.
"""

import signal
import subprocess
import time

import pytest

from cpclient import ControlPlaneClient
from tests.e2e.harness import ECHO_OPTIONS, fast_settings, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

FLOORS = {"keep": 2, "shrink": 2, "grow": 1}
WORKERS = ["drill-0", "drill-1", "drill-2"]
LATE_WORKER = "drill-3"
RESTARTED_WORKER = "drill-2"
# a pass every second, stale after 4 s; a busy 2-core machine: allow generous convergence
CONVERGENCE_BOUND = 45.0


def _set_floor(fleet, model, floor):
    status, body = fleet.api(
        "PUT", f"/api/v1/models/{model}/scheduling", {"min_replicas": floor, "max_replicas": 0, "node_selector": {}}
    )
    assert status in (200, 201), body


def _ready(fleet, model):
    return fleet.model(model).get("ready_replicas")


def _pg_tool(fleet, name, *args):
    server = fleet.server
    result = subprocess.run(
        [str(server.bindir / name), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"


def test_restore_of_an_old_dump_converges_by_observation(private_fleet, tmp_path, report):
    fleet = private_fleet
    fleet.settings_env.update(
        fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread", CONTROLPLANE_SCALE_DOWN_IDLE_AFTER="2")
    )
    web = fleet.start_web()
    workers = {name: fleet.start_worker(name, slots=2) for name in WORKERS}
    fleet.wait_nodes(set(WORKERS))
    reconciler = fleet.start_reconciler(1.0)
    for model, floor in FLOORS.items():
        fleet.set_floor(model, floor)
    for model, floor in FLOORS.items():
        fleet.wait_converged(model, floor, 60)
    fleet.check_invariants()
    node_ids_before = {name: node["id"] for name, node in fleet.nodes().items()}

    # ----- the dump, taken while everything runs ----------------------------------------------
    dump = tmp_path / "fleet.dump"
    dumped = time.monotonic()
    _pg_tool(fleet, "pg_dump", "-Fc", "-d", fleet.database, "-f", str(dump))
    dump_seconds = time.monotonic() - dumped

    # ----- the fleet moves on -----------------------------------------------------------------
    _set_floor(fleet, "grow", 3)
    fleet.wait_converged("grow", 3, 60)
    # a worker restarted since the dump: it registered again, so the node token whose hash the
    # dump holds is no longer the one it sends
    assert fleet.stop(workers[RESTARTED_WORKER], signal.SIGTERM) == 0
    fleet.start_worker(RESTARTED_WORKER, slots=2)
    fleet.wait_nodes({RESTARTED_WORKER})
    for model, floor in {**FLOORS, "grow": 3}.items():
        fleet.wait_converged(model, floor, 60)  # its replicas re-placed
    frontend = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=30)
    with frontend.lease("fresh", **ECHO_OPTIONS, wait_seconds=30) as lease:
        assert lease.address
    _set_floor(fleet, "shrink", 1)
    fleet.wait_converged("shrink", 1, 60)  # the replica above the floor, idle for 2 s, unloaded
    fleet.start_worker(LATE_WORKER, slots=2)
    fleet.wait_nodes({LATE_WORKER})
    running_before_restore = fleet.running_backends()
    assert any(model == "fresh" for _, model, _ in running_before_restore)
    assert sum(1 for _, model, _ in running_before_restore if model == "grow") == 3
    assert sum(1 for _, model, _ in running_before_restore if model == "shrink") == 1

    # ----- restore the old dump over the live database, workers untouched ---------------------
    fleet.stop(reconciler, signal.SIGTERM)
    fleet.stop(web, signal.SIGTERM)
    restored = time.monotonic()
    _pg_tool(fleet, "pg_restore", "--clean", "--if-exists", "--single-transaction", "-d", fleet.database, str(dump))
    restore_seconds = time.monotonic() - restored
    assert LATE_WORKER not in {row[0] for row in fleet.sql("SELECT name FROM registry_node")}
    assert {
        row[0]: row[1] for row in fleet.sql("SELECT model_name, min_replicas FROM registry_modelschedulingconfig")
    } == FLOORS

    restarted = time.monotonic()
    fleet.start_web()
    reconciler = fleet.start_reconciler(1.0)

    def restarted_log():
        return next(p for p in reversed(fleet.processes) if p.name == f"worker-{RESTARTED_WORKER}").log()

    not_healthy: list[tuple[float, str, str]] = []
    seen: dict[str, float] = {}

    def converged():
        at = time.monotonic() - restarted
        for name, node in fleet.nodes().items():
            if node["status"] != "healthy":
                not_healthy.append((round(at, 1), name, node["status"]))
        running = fleet.running_backends()
        checks = {
            "fresh stopped": not any(model == "fresh" for _, model, _ in running),
            "grow orphans stopped": sum(1 for _, model, _ in running if model == "grow") == FLOORS["grow"],
            "shrink re-placed": sum(1 for _, model, _ in running if model == "shrink") == FLOORS["shrink"],
            "late worker back": fleet.nodes().get(LATE_WORKER, {}).get("status") == "healthy",
            "restarted worker healthy": fleet.nodes().get(RESTARTED_WORKER, {}).get("status") == "healthy",
            **{f"{model} at floor": _ready(fleet, model) == floor for model, floor in FLOORS.items()},
        }
        for what, holds in checks.items():
            if holds and what not in seen:
                seen[what] = at
        return all(checks.values())

    wait_for(converged, timeout=CONVERGENCE_BOUND, interval=0.3, what="the fleet converged after the restore")
    elapsed = time.monotonic() - restarted
    settle = fleet.check_invariants()

    # the restored pass history ends at the dump: the first pass sees an observation gap and
    # counts staleness from now, whatever the restored heartbeat_seen columns say
    assert "heartbeat observation resumed after a gap" in reconciler.log(), reconciler.log()[-3000:]
    node_ids_after = {name: node["id"] for name, node in fleet.nodes().items()}
    assert not not_healthy, f"a live node was reaped or unhealthy after the restore: {not_healthy}"
    assert not [e for e in fleet.events("node_offline")], fleet.events("node_offline")
    assert {name: node_ids_after[name] for name in WORKERS} == {name: node_ids_before[name] for name in WORKERS}
    assert LATE_WORKER in node_ids_after
    assert "registration refused" not in restarted_log(), restarted_log()[-3000:]
    running = fleet.running_backends()
    assert sum(1 for _, model, _ in running if model == "shrink") == FLOORS["shrink"]
    steps = ", ".join(f"{what} {at:.1f}s" for what, at in sorted(seen.items(), key=lambda item: item[1]))
    report(
        f"e2e restore drill: pg_dump {dump_seconds:.1f}s, pg_restore {restore_seconds:.1f}s; converged {elapsed:.1f}s "
        f"after web+reconciler restarted ({steps}); invariants held {settle:.1f}s later; 0 nodes reaped"
    )
