"""Stopping ``make run``, ``make demo`` and a worker the ways operators and supervisors do:
SIGTERM to the whole process group (systemd, supervisors), SIGINT to the group (Ctrl-C in a
terminal), SIGTERM or SIGINT to the leader only. Every process each started (web, qcluster and
its children, workers, echo backends) is gone within 10 s, and workers deregister first.

Real processes on the default SQLite database in a temporary var dir. Before: SIGTERM to the
group left the qcluster logging "stopping" forever, and Ctrl-C on the demo took about 26 s
with workers failing to deregister (the web process had gone first)."""

import os
import re
import signal

import pytest

from .stopping import STOP_BOUND_S, ScriptRun, parent_of

pytestmark = pytest.mark.e2e


def send(run: ScriptRun, how: str) -> None:
    sig = signal.SIGTERM if how.endswith("SIGTERM") else signal.SIGINT
    if how.startswith("group"):
        os.killpg(run.popen.pid, sig)
    else:
        os.kill(run.popen.pid, sig)


@pytest.mark.parametrize("how", ["group SIGTERM", "group SIGINT", "leader SIGTERM", "leader SIGINT"])
def test_make_run_stops_within_10_s(tmp_path, how, report):
    run = ScriptRun("run", tmp_path)
    run.start()
    try:
        run.wait_until(run.answers_livez, timeout=90, what="the web process")
        # The qcluster is up once its workers are (they log "ready for work").
        run.wait_until(lambda: run.log().count("ready for work") >= 2, timeout=60, what="the qcluster")
        started = run.processes()
        assert any("qcluster" in cmd for cmd in started.values()) and any("gunicorn" in cmd for cmd in started.values())
        send(run, how)
        took, left = run.wait_gone(set(started))
        assert not left, f"still running {took:.1f}s after {how}: {left}\n{run.log()[-3000:]}"
        assert took < STOP_BOUND_S, f"{how}: took {took:.1f}s"
        assert run.popen.wait(5) in (0, 130, 143)
        report(f"make run, {how}: all {len(started)} processes gone in {took:.1f} s")
    finally:
        run.close()


def test_make_demo_stops_a_worker_then_everything_in_order_within_10_s(tmp_path, report):
    """SIGINT to one worker's process group (the worker and its echo backends), then SIGTERM to
    the demo's group: each stop ends within 10 s, and every worker deregisters on the way."""
    run = ScriptRun("demo", tmp_path)
    run.start()
    try:
        run.wait_until(lambda: "Demo fleet running" in run.log(), timeout=150, what="the demo fleet")
        processes = run.processes()
        worker = next(pid for pid, cmd in processes.items() if "--name demo-worker-1" in cmd)
        backends = {pid for pid, cmd in processes.items() if "worker.backends.echo" in cmd and parent_of(pid) == worker}
        assert backends, processes

        os.killpg(worker, signal.SIGINT)
        took, left = run.wait_gone({worker, *backends})
        assert not left and took < STOP_BOUND_S, (took, left, run.log()[-3000:])
        assert run.nodes()["demo-worker-1"] == "offline"
        report(
            f"demo worker, SIGINT to its group: worker and {len(backends)} backend(s) gone, deregistered, in {took:.1f} s"
        )

        everything = run.processes()
        os.killpg(run.popen.pid, signal.SIGTERM)
        took, left = run.wait_gone(set(everything))
        log = run.log()
        assert not left, f"still running {took:.1f}s after group SIGTERM: {left}\n{log[-3000:]}"
        assert took < STOP_BOUND_S, f"group SIGTERM: took {took:.1f}s\n{log[-3000:]}"
        assert "demo: stopped" in log and "killing" not in log, log[-3000:]
        # Both workers deregistered while the web process still answered.
        assert log.count("deregister accepted") == 2, log[-3000:]
        report(f"make demo, group SIGTERM: all {len(everything)} processes gone in {took:.1f} s, workers deregistered")
    finally:
        run.close()


def test_make_run_stops_a_running_leader_loop_within_10_s(tmp_path, report):
    """SIGTERM to the group while the qcluster's reconcile leader process runs its loop (it
    starts with the qcluster and runs until stopped): the loop ends after its current pass (it
    is not killed), and everything is gone within 10 s."""
    run = ScriptRun("run", tmp_path)
    run.start()
    try:
        run.wait_until(run.answers_livez, timeout=90, what="the web process")
        run.wait_until(
            lambda: "reconcile leader started" in run.log() and re.search(r"reconcile pass (ok|error)", run.log()),
            timeout=90,
            what="the leader loop's first pass",
        )
        started = run.processes()
        os.killpg(run.popen.pid, signal.SIGTERM)
        took, left = run.wait_gone(set(started))
        log = run.log()
        assert not left and took < STOP_BOUND_S, (took, left, log[-3000:])
        assert "reconcile leader stopped: stopping" in log, log[-3000:]
        assert "killed" not in log, log[-3000:]
        report(f"make run, group SIGTERM during a leader loop: loop ended, all processes gone in {took:.1f} s")
    finally:
        run.close()
