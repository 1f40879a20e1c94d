"""Worker death to its replica loaded elsewhere, against a cold load alone, in the same run.

    .venv/bin/python bench/bench_failover.py [--runs 3]

Each run: a fresh database, gunicorn, ``manage.py reconcile --loop --interval 1``, three
reference workers with one replica slot each, ``tiny`` with ``min_replicas=2`` (so one worker is
a spare), stale after 4 s, heartbeats every second (``tests/e2e/harness.py``'s fault settings).

* baseline: a cold load of another model (``POST /route`` with ``wait_seconds``) on a live
  worker: the part of a failover that is loading, not detecting.
* failover: SIGKILL of a worker holding a ``tiny`` replica until ``tiny`` has 2 ready replicas
  again, none on the dead worker (detection = stale threshold + a pass, then the load).

Prints a Markdown section; ``--write`` appends it to ``bench/RESULTS.md``. ``BENCH_DATABASE_URL``
names the PostgreSQL server (default ``postgres://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import ECHO_OPTIONS, Fleet, fast_settings, wait_for  # noqa: E402


def one_run(admin: dict) -> tuple[float, float, float]:
    fleet = Fleet(admin_url=admin, workdir=Path(tempfile.mkdtemp(prefix="bench-failover-")))
    (fleet.workdir / "var").mkdir()
    try:
        fleet.create_database()
        fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread"))
        fleet.start_web()
        workers = {name: fleet.start_worker(name, slots=1) for name in ("fo-a", "fo-b", "fo-c")}
        fleet.wait_nodes(set(workers))
        fleet.start_reconciler(1.0)
        fleet.set_floor("tiny", 2)
        fleet.wait_converged("tiny", 2, 60)

        started = time.monotonic()
        status, body = fleet.api(
            "POST",
            "/api/v1/models/cold/route",
            {**ECHO_OPTIONS, "model_options": {"Model": "cold"}, "wait_seconds": 30},
        )
        assert status == 200, body
        cold = time.monotonic() - started
        fleet.api("POST", f"/api/v1/leases/{body['lease_id']}/release")

        def holders():
            return {r["node"] for r in fleet.replica_rows("tiny") if r["state"] == "loaded"}

        victim = sorted(holders())[0]
        killed = time.monotonic()
        fleet.stop(workers[victim], signal.SIGKILL)
        wait_for(lambda: fleet.nodes()[victim]["status"] == "offline", timeout=30, interval=0.1, what="offline")
        offline = time.monotonic() - killed
        failover = fleet.wait_converged(
            "tiny", 2, 60, since=killed, extra=lambda: victim not in holders() and len(holders()) == 2
        )
        return cold, offline, failover
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    url = urlparse(os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    admin = {"HOST": url.hostname, "PORT": url.port or 5432, "USER": url.username or "postgres"}
    load_avg = os.getloadavg()[0]
    runs = [one_run(admin) for _ in range(args.runs)]
    cold, offline, failover = (sorted(column) for column in zip(*runs, strict=True))

    def cell(values):
        return f"{statistics.median(values):.1f} | {max(values):.1f}"

    section = f"""
## Worker death to replicas loaded elsewhere

`.venv/bin/python bench/bench_failover.py --runs {args.runs}` on CPython {platform.python_version()}, local
PostgreSQL, {os.cpu_count()} shared CPUs (load average {load_avg:.2f} at the start). Real processes:
gunicorn, `reconcile --loop --interval 1`, three reference workers (1 slot each), `tiny` with
`min_replicas=2`; stale after 4 s, heartbeats every second.

| what | median s | max s |
|---|---:|---:|
| baseline: cold load of a model through `POST /route` (no failure) | {cell(cold)} |
| SIGKILL of a worker -> node offline | {cell(offline)} |
| SIGKILL of a worker -> its replica loaded on the spare worker | {cell(failover)} |

Failover = detection (stale threshold 4 s + at most one 1 s pass) + a cold load; the runs
({", ".join(f"{f:.1f}" for f in failover)} s) sit at the threshold plus one pass plus the load.
A node can go offline less than 4 s after the kill: its last heartbeat preceded the kill by up
to a second. With production defaults (stale after 30 s, a pass every 10 s) expect 30-40 s plus
the load.
"""
    print(section)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write(section)


if __name__ == "__main__":
    main()
