"""Control-plane restart to every model back at its floor, through the reaping path.

Real processes on loopback, the fault suite's machinery (``tests/e2e/harness.py``): gunicorn,
the qcluster (``manage.py qcluster``: its leader process runs the passes, its workers the load
jobs; ``--reconciler loop`` uses ``manage.py reconcile --loop`` instead), 4 reference workers
(2 slots each) with echo backends, 3 models with floors 2, 1, 2, stale after 4 s, a pass every
second. Each run SIGKILLs web, qcluster and one worker that serves replicas, keeps the control
plane down 8 s (no heartbeat is received: every node is stale, and the killed worker's never
come again), starts qcluster and web again (at once, as ``make run`` does) and times:

* restart -> the dead worker reaped (``offline``);
* restart -> every model at its floor on live workers (after the reaping: the floors count
  ready replicas on healthy nodes only).

A replacement worker joins after each run, so every run starts with 4 live workers. One fleet
(one fresh database) serves all runs.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_restart.py [--runs 3]

Baseline, same run: the time the web process took to answer after its restart (a floor cannot
come back before the control plane answers).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKERS = 4


def start_reconciler(fleet, kind: str):
    return fleet.start_qcluster() if kind == "qcluster" else fleet.start_reconciler(1.0)


def busiest_worker(fleet, names) -> str:
    """The live worker serving the most replicas (its death must cost a floor)."""
    counts = {name: 0 for name in names}
    for row in fleet.replica_rows():
        if row["node"] in counts and row["state"] == "loaded":
            counts[row["node"]] += 1
    return max(counts, key=counts.get)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--down-for", type=float, default=8.0)
    parser.add_argument("--reconciler", choices=("qcluster", "loop"), default="qcluster")
    args = parser.parse_args(argv)

    from tests.e2e.harness import RESTART_FLOORS, Fleet, fast_settings, wait_for

    url = urlsplit(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    admin = {"HOST": url.hostname or "127.0.0.1", "PORT": url.port or 5432, "USER": url.username or "postgres"}
    workdir = Path(tempfile.mkdtemp(prefix="cp-bench-restart-"))
    (workdir / "var").mkdir()
    fleet = Fleet(admin_url=admin, workdir=workdir)
    runner = {} if args.reconciler == "qcluster" else {"CONTROLPLANE_LOAD_JOB_RUNNER": "thread"}
    results = []

    def at_floor():
        return all(fleet.model(model).get("ready_replicas") == floor for model, floor in RESTART_FLOORS.items())

    try:
        fleet.create_database()
        fleet.settings_env.update(fast_settings(**runner))
        started = time.monotonic()
        procs = {"web": fleet.start_web()}
        live = [f"restart-{index}" for index in range(WORKERS)]
        for name in live:
            procs[name] = fleet.start_worker(name, slots=2)
        fleet.wait_nodes(set(live))
        procs["reconciler"] = start_reconciler(fleet, args.reconciler)
        for model, floor in RESTART_FLOORS.items():
            fleet.set_floor(model, floor)
        wait_for(at_floor, timeout=120, what="every model at its floor")
        print(
            f"# fleet up and at its floors in {time.monotonic() - started:.1f}s ({workdir}); "
            f"reconciler: {args.reconciler}; {os.getloadavg()[0]:.2f} load",
            flush=True,
        )
        for run in range(1, args.runs + 1):
            doomed = busiest_worker(fleet, live)
            fleet.stop(procs["web"], signal.SIGKILL)
            fleet.stop(procs["reconciler"], signal.SIGKILL)
            fleet.stop(procs.pop(doomed), signal.SIGKILL)
            live.remove(doomed)
            time.sleep(args.down_for)
            restarted = time.monotonic()
            # both at once, as ``make run`` starts them (start_web returns once the web answers)
            procs["reconciler"] = start_reconciler(fleet, args.reconciler)
            procs["web"] = fleet.start_web()
            web_up = time.monotonic() - restarted
            wait_for(
                lambda name=doomed: fleet.nodes()[name]["status"] == "offline",
                timeout=120,
                interval=0.2,
                what=f"{doomed} reaped",
            )
            reaped = time.monotonic() - restarted
            wait_for(at_floor, timeout=120, interval=0.2, what=f"every model at its floor {RESTART_FLOORS}")
            floors = time.monotonic() - restarted
            settle = fleet.check_invariants()
            results.append({"web": web_up, "reaped": reaped, "floors": floors})
            print(
                f"run {run}: {doomed} reaped {reaped:.2f}s and every floor back {floors:.2f}s after the restart "
                f"(web answering {web_up:.2f}s); invariants held after {settle:.1f}s; "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            replacement = f"restart-{WORKERS + run - 1}"
            procs[replacement] = fleet.start_worker(replacement, slots=2)
            live.append(replacement)
            fleet.wait_nodes({replacement})
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()
    print("| what | median s | max s | runs |\n|---|---:|---:|---:|")
    for key, what in (
        ("reaped", "restart -> dead worker reaped"),
        ("floors", "restart -> every model at its floor"),
        ("web", "baseline: restart -> web answering"),
    ):
        values = [r[key] for r in results]
        print(f"| {what} | {statistics.median(values):.2f} | {max(values):.2f} | {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
