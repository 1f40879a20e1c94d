"""LocalAI's restart bug with real processes: the fleet recovers its floor after everything restarts.

web (gunicorn) + qcluster (the scheduled reconciler) + two reference workers on PostgreSQL.
A model with ``min_replicas=2`` is routed once; then the web and qcluster processes are
SIGKILLed, one worker is SIGKILLed, and the control plane stays down long enough that every
node's heartbeat is stale. After web and qcluster start again, the reconciler restores two
loaded replicas on live workers from the stored load info, with no new route call.
"""

import signal
import time

import pytest

from cpclient import ControlPlaneClient
from tests.e2e.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STALE_AFTER = 4.0
INTERVAL = 1.0
# The qcluster's leader process passes from its first second; margin for starting processes
# on a busy machine.
STARTUP_MARGIN = 10.0


def ready_replicas(fleet, model):
    status, body = fleet.api("GET", f"/api/v1/models/{model}")
    return body["ready_replicas"] if status == 200 else 0


def test_floor_is_restored_after_control_plane_restart_with_stale_heartbeats_and_a_dead_worker(fleet, report):
    fleet.settings_env.update(
        CONTROLPLANE_STALE_AFTER=str(STALE_AFTER),
        CONTROLPLANE_RECONCILE_INTERVAL=str(INTERVAL),
        CONTROLPLANE_GRPC_LOAD_TIMEOUT="20",
    )
    web = fleet.start_web()
    qcluster = fleet.start_qcluster()
    survivor = fleet.start_worker("recover-a", slots=2)
    doomed = fleet.start_worker("recover-b", slots=2)
    fleet.wait_nodes({"recover-a", "recover-b"})

    status, body = fleet.api("PUT", "/api/v1/models/tiny/scheduling", {"min_replicas": 2, "max_replicas": 0, "node_selector": {}})
    assert status in (200, 201), body
    # a frontend routes once, through the typed client (the lease is released on exit)
    frontend = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=30)
    with frontend.lease("tiny", backend_type="echo", model_options={"Model": "tiny"}, wait_seconds=30) as lease:
        assert lease.address
    assert frontend.get_model("tiny")["min_replicas"] == 2
    # settled: the qcluster's first pass scales up while the route's load job loads, and a load
    # still running when the qcluster is killed leaves a `loading` row that counts towards the
    # floor until RECONCILE_STALE_LOADING_AFTER (a different scenario: f, f2)
    wait_for(
        lambda: ready_replicas(fleet, "tiny") >= 2
        and not fleet.sql("SELECT 1 FROM registry_nodemodel WHERE state = 'loading'"),
        timeout=STARTUP_MARGIN + 60,
        what="the floor of 2 ready and no load in progress before the restart",
    )

    # everything goes down at once; one worker never comes back
    fleet.stop(web, signal.SIGKILL)
    fleet.stop(qcluster, signal.SIGKILL)
    fleet.stop(doomed, signal.SIGKILL)
    time.sleep(STALE_AFTER * 2)  # nobody receives heartbeats: every node is stale

    restarted = time.monotonic()
    fleet.start_web()
    fleet.start_qcluster()

    def converged():
        # ready = loaded on a healthy backend node; the dead worker must have been reaped
        return fleet.nodes()["recover-b"]["status"] == "offline" and ready_replicas(fleet, "tiny") == 2

    wait_for(converged, timeout=STARTUP_MARGIN + STALE_AFTER + 60, interval=0.5, what="floor restored on live workers")
    elapsed = time.monotonic() - restarted
    report(f"e2e restart recovery: floor of 2 restored {elapsed:.1f}s after web+qcluster restarted")
    assert survivor.alive()
    status, body = fleet.api("GET", "/api/v1/models/tiny/load-info")
    assert status == 200 and body["source"] == "model"
