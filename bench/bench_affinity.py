"""Affinity-routing benchmark: how often a session's turns land on the replica of its first turn,
with ``affinity_key`` (consistent hashing with bounded load) against plain least in-flight, at
even and at skewed load, on the local PostgreSQL.

    .venv/bin/python bench/bench_affinity.py [--quick] [--replicas 8] [--sessions 300] [--write]

The workload, in this process (``registry.router.route`` and ``Lease.objects.release``, no HTTP,
as ``bench_route.py``'s raw rows): ``--sessions`` conversations of ``--turns`` turns each.
``--clients`` threads play frontends: each takes the next session that is ready for a turn,
routes it (with the session id as ``affinity_key``, or without), holds the lease for a random
``--hold-ms`` (the request being served), releases it and puts the session back at the end of
the queue until its turns are done; so ``--clients`` requests are in flight at any time, the
turns of a session never overlap and sessions interleave. The model has ``--replicas`` loaded
replicas, one per node. Skewed load: before the clients start, ``--busy`` replicas are held busy
by leases that are not released during the run (``--busy-leases`` each, granted on those nodes
only), as a few long generations would.

Reported per scenario (even / skewed x plain / affinity):

* **home share**: turns after a session's first that land on the replica its first turn got
  (what a KV cache of the conversation on that replica would serve); plain least in-flight
  lands there about 1 in ``--replicas`` times.
* **spill rate** (affinity): routed requests that did not get the key's first choice (the
  highest rendezvous score), because it was at the bound (or, rarely, locked by a concurrent
  pick at that instant).
* **busiest / average**: requests served by the busiest replica (the held leases not counted)
  over the average per replica: what the bound costs in balance.
* the route + release time (median) seen by the clients.

Nodes are registered and replicas recorded through the registry verbs. No backend runs: the
router's probe cache is set long (``CONTROLPLANE_ROUTE_PROBE_CACHE_SECONDS``, and the heartbeat
interval it checks against) so every pick is trusted without a Health probe; the benchmark
measures placement, not probes. A throw-away database ``test_<name>`` is created (migrations
applied) and dropped afterwards; ``BENCH_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/controlplane_bench``) names the server. ``--write``
replaces the "Affinity routing" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import queue
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["DATABASE_URL"] = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/controlplane_bench"
)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
os.environ.setdefault("CONTROLPLANE_REGISTRATION_TOKEN", "bench-registration-token")
os.environ.setdefault("CONTROLPLANE_LOG_LEVEL", "WARNING")
# No backend processes: trust every replica row (see the docstring).
os.environ["CONTROLPLANE_ROUTE_PROBE_CACHE_SECONDS"] = "86400"
os.environ["CONTROLPLANE_HEARTBEAT_INTERVAL"] = "86400"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"

from results_file import replace_section  # noqa: E402  (bench/ is the script's directory)

MODEL = "chat"


def build_fleet(replicas: int) -> list:
    """``replicas`` nodes with one loaded replica of MODEL each; returns the replica rows."""
    from registry.models import Node, NodeModel

    now = timezone.now()
    rows = []
    for index in range(replicas):
        node = Node.objects.register(name=f"bench-{index}", address=f"127.0.0.1:{41000 + index}").node
        rows.append(
            NodeModel.objects.record_loaded(
                node.pk,
                MODEL,
                0,
                address=f"127.0.0.1:{42000 + index}",
                backend_type="llama-cpp",
                opts_blob=b"\x0a\x04chat",
                now=now,
            )
        )
    return list(NodeModel.objects.filter(model_name=MODEL).order_by("pk"))


def hold_busy(rows: list, busy: int, leases_each: int) -> list:
    """Leases on the first ``busy`` replicas, kept for the whole scenario."""
    from registry.models import Lease

    held = []
    for row in rows[:busy]:
        for _ in range(leases_each):
            held.append(Lease.objects.pick_and_grant(MODEL, ttl=3600, node_ids=[row.node_id]))
    return held


def run_scenario(args, rows: list, *, keyed: bool, skewed: bool, seed: int) -> dict:
    from registry import affinity, router
    from registry.models import Lease, NodeModel

    held = hold_busy(rows, args.busy, args.busy_leases) if skewed else []
    candidates = [affinity.Candidate(r.pk, r.node_id, r.replica_index, 0) for r in rows]
    rng = random.Random(seed)
    sessions = [f"session-{seed}-{i}" for i in range(args.sessions)]
    ready: queue.Queue = queue.Queue()
    for session in rng.sample(sessions, len(sessions)):
        ready.put(session)
    turns_left = {session: args.turns for session in sessions}
    first_replica: dict[str, object] = {}
    lock = threading.Lock()
    stats = collections.Counter()
    served = collections.Counter()
    timings: list[float] = []
    remaining = [len(sessions)]

    def client(index: int) -> None:
        local = random.Random(seed * 1000 + index)
        try:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                try:
                    session = ready.get(timeout=0.05)
                except queue.Empty:
                    continue
                started = time.perf_counter()
                result = router.route(MODEL, affinity_key=session if keyed else None)
                picked = time.perf_counter() - started
                replica = result.lease.replica_id
                time.sleep(local.uniform(*args.hold_ms) / 1000)
                started = time.perf_counter()
                Lease.objects.release(result.lease.pk)
                released = time.perf_counter() - started
                with lock:
                    timings.append(picked + released)
                    served[replica] += 1
                    if keyed and replica != affinity.preference(session, candidates)[0].pk:
                        stats["spilled"] += 1
                    home = first_replica.setdefault(session, replica)
                    if turns_left[session] < args.turns:
                        stats["follow_ups"] += 1
                        stats["home"] += int(replica == home)
                    stats["requests"] += 1
                    turns_left[session] -= 1
                    if turns_left[session] == 0:
                        remaining[0] -= 1
                    else:
                        ready.put(session)
        finally:
            for conn in connections.all():
                conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started

    for lease in held:
        Lease.objects.release(lease.pk)
    in_flight = sum(NodeModel.objects.filter(model_name=MODEL).values_list("in_flight", flat=True))
    live = Lease.objects.live().count()
    counts = [served[row.pk] for row in rows]
    return {
        "requests": stats["requests"],
        "home_share": stats["home"] / max(1, stats["follow_ups"]),
        "spill_rate": stats["spilled"] / max(1, stats["requests"]) if keyed else None,
        "busiest": max(counts) / (sum(counts) / len(counts)),
        "route_release_p50_ms": statistics.median(timings) * 1000,
        "elapsed_s": elapsed,
        "in_flight_after": in_flight,
        "live_after": live,
    }


def report(results: dict, args, server_version: str, load: float, command: str) -> str:
    def row(label, result):
        spill = "-" if result["spill_rate"] is None else f"{result['spill_rate'] * 100:.1f} %"
        return (
            f"| {label} | {result['requests']} | **{result['home_share'] * 100:.1f} %** | {spill} | "
            f"{result['busiest']:.2f} | {result['route_release_p50_ms']:.1f} |"
        )

    lines = [
        "## Affinity routing",
        "",
        f"`{command}` on {platform.python_implementation()} {platform.python_version()}, PostgreSQL "
        f"{server_version} (local, 127.0.0.1), {os.cpu_count()} CPUs, **load average {load:.2f} at the start** "
        "(a shared machine: the shares do not depend on it, the milliseconds do). In-process "
        "(`registry.router.route` + `Lease.objects.release`, no HTTP), "
        f"{args.replicas} replicas of one model, {args.sessions} sessions of {args.turns} turns, "
        f"{args.clients} concurrent clients each holding its lease {args.hold_ms[0]:.0f}-{args.hold_ms[1]:.0f} ms; "
        f"skewed: {args.busy} replicas held busy by {args.busy_leases} leases each for the whole run; "
        f"`CONTROLPLANE_ROUTE_AFFINITY_LOAD_FACTOR` {settings.ROUTE_AFFINITY_LOAD_FACTOR}.",
        "",
        "| scenario | requests | home share (turns 2+ on the first turn's replica) | spill rate | busiest / average replica | route + release p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
        row("even load, least in-flight (no key)", results["even", False]),
        row("even load, affinity_key = session", results["even", True]),
        row("skewed load, least in-flight (no key)", results["skewed", False]),
        row("skewed load, affinity_key = session", results["skewed", True]),
        "",
        f"Plain least in-flight lands a follow-up turn on its session's replica about 1 in {args.replicas} "
        "times (the least busy replica at that instant, whichever it is). With the key, a turn goes to its "
        "session's first choice unless that replica is at the bound (in-flight `ceil(factor x average with "
        "this request) + 1`); the spill rate counts the requests that did not get the first choice. At even "
        f"load the spills are the moments when several of the {args.clients} sessions in flight hash to the "
        "same replica; a spilled turn goes to the session's second choice, so a session whose first turn "
        "spilled and whose next turn went home counts as away once. Under skew, the sessions whose first "
        "choice is a held replica spill to their second choice every time, consistently, so their turns "
        "still stay together (hence a home share above the even case, and a spill rate near the share of "
        "held replicas); the price is balance: the second choices of the held replicas serve more "
        "(busiest / average: the requests the busiest replica served over the average of all replicas, held "
        "ones included, held leases not counted; under skew the held replicas serve little, so even a perfect "
        f"spread of the rest gives {args.replicas}/{args.replicas - args.busy} = {args.replicas / (args.replicas - args.busy):.2f}). "
        "A keyed pick costs more than a plain one: its statement computes the cap over the candidates and "
        "the scores before it locks one row, and when a concurrent pick holds that row it waits for it "
        "(a plain pick skips to another row); the route + release medians above are from "
        f"{args.clients} client threads "
        "in one Python process on a loaded machine. After every scenario in-flight equals the live leases "
        "(in-flight sum / live leases once the held leases are released: "
        + ", ".join(f"{r['in_flight_after']}/{r['live_after']}" for r in results.values())
        + ").",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (60 sessions of 3 turns)")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=None, help="default 300 (quick 60)")
    parser.add_argument("--turns", type=int, default=None, help="turns per session (default 5, quick 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (requests in flight)")
    parser.add_argument("--hold-ms", type=float, nargs=2, default=(20.0, 60.0), help="lease held, uniform range")
    parser.add_argument("--busy", type=int, default=2, help="skewed: replicas held busy")
    parser.add_argument("--busy-leases", type=int, default=4, help="skewed: leases held on each busy replica")
    parser.add_argument("--write", action="store_true", help="update the Affinity routing section of bench/RESULTS.md")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        parser.error("this benchmark needs PostgreSQL (BENCH_DATABASE_URL)")
    args.sessions = args.sessions or (60 if args.quick else 300)
    args.turns = args.turns or (3 if args.quick else 5)

    load = os.getloadavg()[0]
    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        server_version = connection.cursor().connection.info.server_version
        version = f"{server_version // 10000}.{server_version % 10000}"
        rows = build_fleet(args.replicas)
        results = {}
        for seed, (load_kind, keyed) in enumerate(
            [("even", False), ("even", True), ("skewed", False), ("skewed", True)], start=1
        ):
            results[load_kind, keyed] = run_scenario(args, rows, keyed=keyed, skewed=load_kind == "skewed", seed=seed)
            print(load_kind, "affinity" if keyed else "plain", results[load_kind, keyed], flush=True)
    finally:
        for conn in connections.all():
            if conn.alias != connection.alias:
                conn.close()
        connection.creation.destroy_test_db(old_name, verbosity=0)
    command = "bench/bench_affinity.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    section = report(results, args, version, load, command.strip())
    print(section)
    if args.write:
        replace_section("Affinity routing", section)
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
