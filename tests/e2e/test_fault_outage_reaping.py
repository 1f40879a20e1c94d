"""Scenario i (issue 11, item 3): reaping after the control plane could not observe heartbeats.

PostgreSQL (a private throwaway cluster) is stopped for longer than the stale threshold while
four reference workers heartbeat: two every second, one every 3 s (a slow but healthy worker),
and one that is SIGKILLed during the outage. The database comes back right after the slow
worker's failed heartbeat tick, so its next heartbeat lands about 3 s after the restart, after
the fast workers'. The old rule (``last_heartbeat`` against the pass's clock) then saw two of
four nodes stale (exactly half: no mass-staleness guard) and reaped both, the live slow worker
included. Counting staleness from when observation resumed, nothing live is reaped, and the
killed worker is reaped one stale threshold (plus one pass) after the reconciler's first pass.
"""

import re
import signal
import time

import pytest

from tests.e2e.harness import fast_settings, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STALE_AFTER = 6.0
INTERVAL = 1.0
SLOW_HEARTBEAT = 3.0
OUTAGE = 10.0  # longer than the stale threshold
FAILED_TICK = re.compile(r"heartbeat (refused|failed)")


def node_statuses(fleet) -> dict[str, str]:
    return dict(fleet.sql("SELECT name, status FROM registry_node"))


def test_i_postgresql_down_longer_than_the_stale_threshold_reaps_only_the_worker_that_died(private_fleet, report):
    fleet = private_fleet
    fleet.settings_env.update(
        fast_settings(
            CONTROLPLANE_STALE_AFTER=STALE_AFTER,
            CONTROLPLANE_LOAD_JOB_RUNNER="thread",
            DATABASE_CONNECT_TIMEOUT="2",
        )
    )
    fleet.start_web()
    workers = {name: fleet.start_worker(name, slots=1) for name in ("fast-a", "fast-b", "doomed")}
    workers["slow"] = fleet.start_worker("slow", slots=1, heartbeat=SLOW_HEARTBEAT)
    fleet.wait_nodes(set(workers))
    reconciler = fleet.start_reconciler(INTERVAL)
    time.sleep(2 * SLOW_HEARTBEAT)  # the reconciler watches every worker heartbeat for a while
    assert set(node_statuses(fleet).values()) == {"healthy"}

    fleet.server.stop()
    down = time.monotonic()
    time.sleep(1)
    workers["doomed"].popen.send_signal(signal.SIGKILL)  # dies while nobody can see it
    time.sleep(OUTAGE - 1)
    # Restart right after one of the slow worker's failed ticks: its next heartbeat is the
    # last of the live workers' to arrive, about SLOW_HEARTBEAT seconds after the restart.
    failed_ticks = len(FAILED_TICK.findall(workers["slow"].log()))
    wait_for(
        lambda: len(FAILED_TICK.findall(workers["slow"].log())) > failed_ticks,
        timeout=2 * SLOW_HEARTBEAT,
        interval=0.05,
        what="a failed heartbeat tick of the slow worker",
    )
    fleet.server.start()
    up = time.monotonic()

    offline_at: dict[str, float] = {}

    def doomed_reaped():
        statuses = node_statuses(fleet)
        for name, status in statuses.items():
            if status == "offline":
                offline_at.setdefault(name, time.monotonic() - up)
        return "doomed" in offline_at

    wait_for(doomed_reaped, timeout=STALE_AFTER + 20, interval=0.1, what="the killed worker reaped")
    time.sleep(2 * SLOW_HEARTBEAT)  # and nothing else is reaped afterwards
    doomed_reaped()
    reaped = sorted(event["node_name"] for event in fleet.events("node_offline"))
    restarts = reconciler.log().count("heartbeat observation resumed after a gap")
    report(
        f"e2e i. PostgreSQL down {up - down:.1f}s (stale after {STALE_AFTER:.0f}s), 4 workers, one SIGKILLed during "
        f"the outage: killed worker reaped {offline_at['doomed']:.1f}s after the restart; nodes reaped: {reaped}; "
        f"observation restarts logged: {restarts}"
    )
    assert reaped == ["doomed"], (reaped, offline_at)
    assert all(status == "healthy" for name, status in node_statuses(fleet).items() if name != "doomed")
    # one stale threshold after observation resumed, plus the reconciler's reconnect and a pass
    assert offline_at["doomed"] <= STALE_AFTER + 5, offline_at
    assert restarts >= 1
    assert reconciler.alive()
    fleet.check_invariants()
