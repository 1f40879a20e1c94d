"""The qcluster's leader process: reconcile passes from the qcluster's first second, after any
restart, and from another qcluster within about one interval when the leader's dies.

Real processes on PostgreSQL: ``manage.py qcluster`` as ``make run`` starts it, a pass every
2 s. Before the leader process, passes came from a django-q2 schedule that the cluster looks at
only every 30 s: the first pass came 30-90 s after a (re)start, and a leader run of 50 s was
followed by a pause of up to 30 s.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

INTERVAL = 2.0
# Starting Python and Django and forking the cluster's processes, on a busy machine.
STARTUP = 8.0


def passes(fleet, after_id: int = 0) -> list[tuple[int, int]]:
    """(id, holder pid) of every successful pass stored after ``after_id``, oldest first."""
    return fleet.sql(
        "SELECT id, holder_pid FROM reconciler_reconcilepass WHERE outcome = 'ok' AND id > %s ORDER BY id",
        (after_id,),
    )


def last_id(fleet) -> int:
    return fleet.sql("SELECT coalesce(max(id), 0) FROM reconciler_reconcilepass")[0][0]


def parent_of(pid: int) -> int | None:
    """The parent of a live process; None when it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[1])


def first_pass_after(fleet, since: float, after_id: int, timeout: float) -> tuple[float, int]:
    """Seconds from ``since`` to the first pass stored after ``after_id``, and its holder pid."""
    wait_for(lambda: passes(fleet, after_id), timeout=timeout, interval=0.1, what="a reconcile pass")
    took = time.monotonic() - since
    return took, passes(fleet, after_id)[0][1]


def start_qcluster(fleet, name: str = "qcluster"):
    return fleet.spawn(name, [sys.executable, "manage.py", "qcluster"])


@pytest.fixture
def fast(fleet):
    fleet.settings_env.update(CONTROLPLANE_RECONCILE_INTERVAL=str(INTERVAL), Q_WORKERS="1")
    return fleet


def test_passes_start_with_the_qcluster_and_again_after_a_sigkill(fast, report):
    fleet = fast
    started = time.monotonic()
    qcluster = start_qcluster(fleet)
    first, leader = first_pass_after(fleet, started, 0, timeout=INTERVAL + STARTUP + 30)
    assert first < INTERVAL + STARTUP, first
    assert parent_of(leader) == qcluster.popen.pid  # the qcluster's leader process

    # passes keep coming every interval, with no pause between leader runs
    mark = last_id(fleet)
    time.sleep(5 * INTERVAL)
    assert len(passes(fleet, mark)) >= 4

    # the leader process alone dies: the qcluster starts another one
    os.kill(leader, signal.SIGKILL)
    mark = last_id(fleet)
    killed = time.monotonic()
    respawned, successor = first_pass_after(fleet, killed, mark, timeout=INTERVAL + STARTUP + 30)
    assert successor != leader and parent_of(successor) == qcluster.popen.pid
    assert respawned < INTERVAL + STARTUP, respawned

    # SIGKILL of the qcluster's whole process group, then a restart
    fleet.stop(qcluster, signal.SIGKILL)
    mark = last_id(fleet)
    restarted = time.monotonic()
    qcluster = start_qcluster(fleet, "qcluster-2")
    again, leader = first_pass_after(fleet, restarted, mark, timeout=INTERVAL + STARTUP + 30)
    assert again < INTERVAL + STARTUP, again
    assert parent_of(leader) == qcluster.popen.pid

    # SIGKILL of the qcluster's main process alone (``make run`` kills that pid): its leader
    # process, orphaned, stops after its pass, and a restarted qcluster leads at once
    os.kill(qcluster.popen.pid, signal.SIGKILL)
    wait_for(lambda: parent_of(leader) is None, timeout=INTERVAL + 10, interval=0.1, what="the orphaned leader gone")
    mark = last_id(fleet)
    restarted = time.monotonic()
    replacement = start_qcluster(fleet, "qcluster-3")
    orphaned, leader = first_pass_after(fleet, restarted, mark, timeout=INTERVAL + STARTUP + 30)
    assert orphaned < INTERVAL + STARTUP, orphaned
    assert parent_of(leader) == replacement.popen.pid
    report(
        f"qcluster leader: first pass {first:.1f}s after the qcluster started, {respawned:.1f}s after its leader "
        f"process was SIGKILLed (the qcluster starts another), {again:.1f}s after a restart "
        f"following a SIGKILL of its group, {orphaned:.1f}s after a restart following a SIGKILL of its main "
        f"process (interval {INTERVAL:g}s)"
    )


def test_another_qcluster_leads_within_an_interval_when_the_leaders_dies(fast, report):
    fleet = fast
    clusters = {}
    for name in ("qcluster-a", "qcluster-b"):
        process = start_qcluster(fleet, name)
        clusters[process.popen.pid] = process
    first_pass_after(fleet, time.monotonic(), 0, timeout=INTERVAL + STARTUP + 30)
    time.sleep(4 * INTERVAL)  # both clusters up, their leader processes both trying the lock

    # one pass at a time across both qclusters: every pass so far came from one leader
    holders = {pid for _, pid in passes(fleet)}
    assert len(holders) == 1, holders
    leader = holders.pop()
    leading = clusters.pop(parent_of(leader))
    (standby,) = clusters.values()

    fleet.stop(leading, signal.SIGKILL)
    mark = last_id(fleet)
    killed = time.monotonic()
    took, successor = first_pass_after(fleet, killed, mark, timeout=INTERVAL + 30)
    assert parent_of(successor) == standby.popen.pid
    assert took < INTERVAL + 2.0, took  # the standby's next try, plus the pass itself
    report(f"qcluster leader failover: the other qcluster's first pass {took:.1f}s after the leader's SIGKILL")
