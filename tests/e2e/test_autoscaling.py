"""Load-aware autoscaling end to end: web (load jobs in a thread), a reconcile loop, two
reference workers with echo backends, routes through cpclient holding leases."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from cpclient import ControlPlaneClient
from tests.e2e.harness import ECHO_OPTIONS, fast_settings, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_a_burst_scales_up_to_the_computed_count_and_back_and_a_model_at_zero_wakes(fleet):
    fleet.settings_env.update(
        fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread", CONTROLPLANE_AUTOSCALE_WINDOW_SECONDS="2")
    )
    fleet.start_web()
    for name in ("as-a", "as-b"):
        fleet.start_worker(name, slots=4)
    fleet.wait_nodes({"as-a", "as-b"})
    fleet.start_reconciler(1.0)
    autoscaling = {"target_in_flight_per_replica": 2, "upscale_delay_s": 1, "downscale_delay_s": 3}
    fleet.set_floor("auto", 1, **autoscaling)
    fleet.wait_converged("auto", 1, 60)

    # A burst: 6 requests in flight at target 2 -> ceil(6 / 2) = 3 replicas.
    frontend = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=30)
    leases = [frontend.route("auto", wait_seconds=30) for _ in range(6)]
    fleet.wait_converged("auto", 3, 60)
    assert fleet.model("auto")["desired_replicas"] == 3
    messages = [event["message"] for event in fleet.events("autoscaled") if event["model_name"] == "auto"]
    assert any("target 2 -> 3 replicas" in message for message in messages), messages

    # The burst ends: after the window and the downscale delay it is back at its floor.
    for lease in leases:
        frontend.release(lease)
    fleet.wait_converged("auto", 1, 60)
    assert fleet.model("auto")["desired_replicas"] == 1

    # Scale to zero, then a burst of routes wakes it through the load-job path: every route
    # that found no replica was counted, and the wake-up is sized from them and the leases
    # they then hold (6 at target 2 -> 3 replicas, not the load job's 1).
    fleet.set_floor("auto", 0, **autoscaling)
    fleet.wait_converged("auto", 0, 60)
    wait_for(lambda: fleet.model("auto")["desired_replicas"] == 0, timeout=30, what="desire 0")

    def route(_):
        return ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=30).route(
            "auto", **ECHO_OPTIONS, wait_seconds=30
        )

    with ThreadPoolExecutor(6) as pool:
        woken = list(pool.map(route, range(6)))
    assert all(lease.address for lease in woken)
    fleet.wait_converged("auto", 3, 60)
    wait_for(lambda: fleet.model("auto")["desired_replicas"] == 3, timeout=30, what="desire 3")
    for lease in woken:
        frontend.release(lease)
