"""Control-plane restart to every model back at its floor (fault scenario h, repeated).

Real processes on loopback, the fault suite's machinery (``tests/e2e/harness.py``:
``start_stale_restart_fleet`` and ``stale_restart``): gunicorn, a ``manage.py reconcile --loop
--interval 1`` process, 3 reference workers (2 slots each) with echo backends, 3 models with
floors 2, 1, 2, stale after 4 s. Each run SIGKILLs web and reconciler, keeps them down 8 s (no
heartbeat is received: every node is stale), starts both again and times the restart -> every
model at its floor; the fleet's invariants are checked after each run. One fleet (one fresh
database) serves all runs, so runs 2.. restart a fleet that has already been restarted.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_restart.py [--runs 3]

Baseline, same run: the time the web process took to answer after its restart (a floor cannot
come back before the control plane answers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--down-for", type=float, default=8.0)
    args = parser.parse_args(argv)

    from tests.e2e.harness import RESTART_FLOORS, Fleet, stale_restart, start_stale_restart_fleet

    url = urlsplit(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    admin = {"HOST": url.hostname or "127.0.0.1", "PORT": url.port or 5432, "USER": url.username or "postgres"}
    workdir = Path(tempfile.mkdtemp(prefix="cp-bench-restart-"))
    (workdir / "var").mkdir()
    fleet = Fleet(admin_url=admin, workdir=workdir)
    results = []
    try:
        fleet.create_database()
        started = time.monotonic()
        procs = start_stale_restart_fleet(fleet, RESTART_FLOORS)
        print(f"# fleet up and at its floors in {time.monotonic() - started:.1f}s ({workdir})", flush=True)
        for run in range(1, args.runs + 1):
            times = stale_restart(fleet, procs, RESTART_FLOORS, down_for=args.down_for)
            settle = fleet.check_invariants()
            reaped = len(fleet.events("node_offline"))
            results.append(times)
            print(
                f"run {run}: every floor back {times['restart']:.2f}s after the restart (web answering "
                f"{times['web']:.2f}s); invariants held after {settle:.1f}s; node_offline events so far {reaped}",
                flush=True,
            )
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()
    restarts = [r["restart"] for r in results]
    webs = [r["web"] for r in results]
    print("| what | median s | max s | runs |\n|---|---:|---:|---:|")
    print(f"| restart -> every model at its floor | {statistics.median(restarts):.2f} | {max(restarts):.2f} | {len(restarts)} |")
    print(f"| baseline: restart -> web answering | {statistics.median(webs):.2f} | {max(webs):.2f} | {len(webs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
