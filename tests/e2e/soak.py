"""Soak (issue 12): a fleet under steady traffic while its parts are killed and restarted.

    python -m tests.e2e.soak --duration 180      (what ``make soak DURATION=180`` runs)

The fleet is what ``make run`` ships plus a fast reconciler, on a throwaway database of the
PostgreSQL server at ``TEST_POSTGRES_URL``: gunicorn (2 workers), a qcluster (load jobs and the
scheduled reconciler), ``manage.py reconcile --loop --interval 1`` (a pass every second; the
qcluster's scheduled runs are its hot standby), three reference workers (2 slots per model) and
three models kept at floors 2, 2 and 1, each with its own ``Model`` (so a request that reaches
another model's backend fails ``NOT_FOUND``). Stale after 4 s, heartbeats every second.

Frontends (``--frontends`` threads, one ``cpclient.ControlPlaneClient`` each, no retries inside
an attempt) loop: route a random model, ``Predict`` on the leased replica through
``lease.predict`` (which carries the replica's ``ModelIdentity``), release. Each attempt ends
``served`` or with one failure reason (the route's HTTP status and problem code, or the gRPC
status of the ``Predict``).

A chaos thread acts on a fixed schedule, cycling through a shuffled order of: SIGKILL of a
worker (down for 6 s, longer than the stale threshold, then started again), SIGKILL of one
backend process, a web restart (SIGTERM, then start) and a qcluster restart (SIGTERM, then
start). The recovery time of an action is from the action until every invariant holds again
(``Fleet.invariant_violations``, which includes every floor being met on live workers).

Every ``--check-every`` seconds the invariants that must hold even in the middle of a fault are
checked (no duplicate replica key, ``in_flight`` equals live leases, load info for every model
ever loaded: one SQL snapshot each). At the end the traffic stops, the fleet settles and every
invariant of ``Fleet.check_invariants`` must hold.

Pass/fail (exit status 0/1), with the bounds explained in docs/resilience.md ("Soak"):
- every invariant holds at the end, no chaos-time invariant broke, every action recovered;
- no HTTP 5xx other than 503 from the control plane (a 500 is a bug);
- of the attempts that did not begin while the web process was being restarted (SIGTERM until
  ``/livez`` answers, +-1 s: nothing can answer then), at least ``--min-served`` (default 0.9)
  were served;
- the RSS of the web, the qcluster and the reconciler (each process tree, sampled from 10 s
  after each instance started until it is stopped) grew by at most ``--max-rss-growth``
  (default 10 %) + 16 MiB over each instance's life.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.harness import Fleet, Process, fast_settings, wait_for  # noqa: E402

FLOORS = {"soak-a": 2, "soak-b": 2, "soak-c": 1}
WORKERS = ["soak-0", "soak-1", "soak-2"]
ACTIONS = ("worker_kill", "backend_kill", "web_restart", "qcluster_restart")
WORKER_DOWN_FOR = 6.0  # longer than the stale threshold (4 s): the node is reaped, then returns
RSS_WARMUP = 10.0  # an instance's RSS is first sampled this long after it started
RSS_SLACK_KIB = 16 * 1024
QCLUSTER_STOP_GRACE = 15.0
WEB_WINDOW_MARGIN = 1.0


def echo_options(model: str) -> dict:
    return {"backend_type": "echo", "model_options": {"Model": model}}


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    log: list[tuple[float, str]] = field(default_factory=list)  # (when the attempt began, outcome)
    release_errors: Counter = field(default_factory=Counter)

    def add(self, began: float, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] += 1
            self.log.append((began, outcome))


class Frontend(threading.Thread):
    """Route, predict, release, again; one outcome per attempt."""

    def __init__(self, fleet: Fleet, outcomes: Outcomes, seed: int, period: float):
        from cpclient import ControlPlaneClient

        super().__init__(daemon=True)
        self.fleet, self.outcomes, self.period = fleet, outcomes, period
        self.random = random.Random(seed)
        self.client = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=10, max_retries=0, route_deadline=10)
        self.stopping = threading.Event()

    def run(self) -> None:
        from cpclient import ControlPlaneError, DeadlineExceeded, TransportError
        from proto import client

        while not self.stopping.is_set():
            started = time.monotonic()
            model = self.random.choice(sorted(FLOORS))
            try:
                lease = self.client.route(model, **echo_options(model), wait_seconds=5)
            except DeadlineExceeded:
                self.outcomes.add(started, "route: no lease within 10 s (202 still loading)")
            except TransportError:
                self.outcomes.add(started, "route: no HTTP answer (web down)")
            except ControlPlaneError as error:
                self.outcomes.add(started, f"route: HTTP {error.status} {error.code}")
            else:
                prompt = f"soak {model} {started:.3f}"
                try:
                    reply = lease.predict(prompt, timeout=5)  # the lease's backend token
                except client.GrpcCallError as error:
                    name = error.code.name if error.code is not None else "UNKNOWN"
                    self.outcomes.add(
                        started, f"predict: {name}" + (" (replica unreachable)" if name == "UNAVAILABLE" else "")
                    )
                else:
                    self.outcomes.add(
                        started, "served" if reply.message.decode() == prompt else "predict: wrong answer"
                    )
                try:
                    self.client.release(lease)
                except ControlPlaneError as error:
                    with self.outcomes.lock:
                        self.outcomes.release_errors[f"HTTP {error.status} {error.code}"] += 1
            self.stopping.wait(max(0.0, self.period - (time.monotonic() - started)))


def chaos_time_violations(fleet: Fleet) -> list[str]:
    """The invariants that hold at every instant, faults or not (one SQL snapshot each)."""
    problems = []
    for node, model, index, count in fleet.sql(
        "SELECT node_id, model_name, replica_index, count(*) FROM registry_nodemodel"
        " GROUP BY 1, 2, 3 HAVING count(*) > 1"
    ):
        problems.append(f"duplicate replica key ({node}, {model}, {index}) x{count}")
    for replica_id, in_flight, leases in fleet.sql(
        "SELECT r.id, r.in_flight, (SELECT count(*) FROM registry_lease l WHERE l.replica_id = r.id"
        " AND l.released_at IS NULL) FROM registry_nodemodel r"
    ):
        if in_flight != leases:
            problems.append(f"replica {replica_id}: in_flight {in_flight} != live leases {leases}")
    for (model,) in fleet.sql(
        "SELECT DISTINCT r.model_name FROM registry_nodemodel r LEFT JOIN registry_modelloadinfo l"
        " ON l.model_name = r.model_name WHERE l.model_name IS NULL"
    ):
        problems.append(f"{model}: a replica row but no ModelLoadInfo")
    return problems


class Soak:
    def __init__(self, fleet: Fleet, *, duration: float, frontends: int, period: float, check_every: float, seed: int):
        self.fleet, self.duration, self.check_every = fleet, duration, check_every
        self.random = random.Random(seed)
        self.seed = seed
        self.outcomes = Outcomes()
        self.frontend_count, self.period = frontends, period
        self.frontends: list[Frontend] = []
        self.procs: dict[str, Process] = {}
        self.actions: list[dict] = []
        self.chaos_violations: list[tuple[float, list[str]]] = []
        self.rss: dict[str, list[tuple[int, float, int]]] = {"web": [], "qcluster": [], "reconciler": []}
        self.started_at: dict[int, float] = {}
        self.retired: set[int] = set()
        self.checks = 0

    # ----- fleet ------------------------------------------------------------------------------

    def start_fleet(self) -> None:
        fleet = self.fleet
        fleet.settings_env.update(fast_settings())
        self._started("web", fleet.start_web())
        self._started("qcluster", fleet.start_qcluster())
        for name in WORKERS:
            self.procs[name] = fleet.start_worker(name, slots=2)
        fleet.wait_nodes(set(WORKERS))
        self._started("reconciler", fleet.start_reconciler(1.0))
        for model, floor in FLOORS.items():
            status, body = fleet.api("PUT", f"/api/v1/models/{model}/load-info", echo_options(model))
            assert status in (200, 201), body
            status, body = fleet.api(
                "PUT",
                f"/api/v1/models/{model}/scheduling",
                {"min_replicas": floor, "max_replicas": 0, "node_selector": {}},
            )
            assert status in (200, 201), body
        for model, floor in FLOORS.items():
            fleet.wait_converged(model, floor, 90)
        fleet.check_invariants(timeout=30)

    def _started(self, role: str, process: Process) -> None:
        self.procs[role] = process
        self.started_at[process.popen.pid] = time.monotonic()

    def sample_rss(self) -> None:
        now = time.monotonic()
        for role in self.rss:
            process = self.procs[role]
            pid = process.popen.pid
            if process.alive() and pid not in self.retired and now - self.started_at[pid] >= RSS_WARMUP:
                self.rss[role].append((process.popen.pid, now, self.fleet.rss_kib(process)))

    # ----- chaos ------------------------------------------------------------------------------

    def act(self, kind: str) -> dict:
        fleet, at = self.fleet, time.monotonic()
        action = {"kind": kind, "at": at}
        if kind == "worker_kill":
            name = self.random.choice(WORKERS)
            fleet.stop(self.procs[name], signal.SIGKILL)
            time.sleep(WORKER_DOWN_FOR)
            self.procs[name] = fleet.start_worker(name, slots=2)
            action["target"] = name
        elif kind == "backend_kill":
            running = fleet.running_backends()
            if running:
                key = self.random.choice(sorted(running))
                try:
                    os.kill(running[key], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                action["target"] = f"{key[1]}#{key[2]} on {key[0]}"
        elif kind == "web_restart":
            action["stop_s"], action["stop_killed"] = self._stop_gracefully(self.procs["web"])
            self._started("web", fleet.start_web())
            action["down_s"] = time.monotonic() - at  # from SIGTERM until /livez answered again
        elif kind == "qcluster_restart":
            action["stop_s"], action["stop_killed"] = self._stop_gracefully(self.procs["qcluster"])
            self._started("qcluster", fleet.start_qcluster())
        return action

    def _stop_gracefully(self, process: Process, grace: float = QCLUSTER_STOP_GRACE) -> tuple[float, bool]:
        """SIGTERM to the main process only (as a process manager stops a service), SIGKILL of
        the group after ``grace`` s; returns (seconds to stop, whether it had to be killed)."""
        began = time.monotonic()
        self.retired.add(process.popen.pid)  # its RSS while stopping says nothing about growth
        try:
            os.kill(process.popen.pid, signal.SIGTERM)
            process.popen.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.fleet.stop(process, signal.SIGKILL)
            return time.monotonic() - began, True
        self.fleet.stop(process, signal.SIGKILL)  # stragglers of its group, if any
        return time.monotonic() - began, False

    def wait_recovered(self, action: dict, deadline: float) -> None:
        """Until every invariant holds (floors on live workers included), within ``deadline``."""
        waited_on: list[str] = []

        def whole() -> bool:
            problems = self.fleet.invariant_violations()
            if problems and not waited_on:
                waited_on.extend(problems)
            return not problems

        try:
            wait_for(whole, timeout=deadline, interval=0.5, what="recovery")
        except AssertionError:
            action["recovered"] = None
            action["violations"] = self.fleet.invariant_violations()
        else:
            action["recovered"] = time.monotonic() - action["at"]
        action["waited_on"] = waited_on[:4]

    # ----- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        self.start_fleet()
        self.sample_rss()
        # built once the web process listens: the client keeps the base URL it was given
        self.frontends = [
            Frontend(self.fleet, self.outcomes, self.seed + i, self.period) for i in range(self.frontend_count)
        ]
        for frontend in self.frontends:
            frontend.start()
        began = self.began = time.monotonic()
        end = began + self.duration
        settle_room = min(30.0, self.duration / 4)  # the last actions must have room to recover
        schedule = self._schedule(began, end - settle_room)
        stop_checks = threading.Event()
        checker = threading.Thread(target=self._check_loop, args=(stop_checks,), daemon=True)
        checker.start()
        for kind, when in schedule:
            time.sleep(max(0.0, when - time.monotonic()))
            action = self.act(kind)
            self.wait_recovered(action, deadline=max(20.0, end - time.monotonic()))
            action["at"] -= began
            self.actions.append(action)
        time.sleep(max(0.0, end - time.monotonic()))
        for frontend in self.frontends:
            frontend.stopping.set()
        for frontend in self.frontends:
            frontend.join(30)
        stop_checks.set()
        checker.join(30)
        self.sample_rss()
        final: list[str] = []
        try:
            settle = self.fleet.check_invariants(timeout=60)
        except AssertionError as error:
            final, settle = str(error).splitlines()[1:], None
        return self.report(time.monotonic() - began, settle, final)

    def _schedule(self, start: float, last: float) -> list[tuple[str, float]]:
        """Actions evenly spread over [start + 10 s, last], each kind once per shuffled round."""
        spacing = 15.0
        count = max(len(ACTIONS), int((last - start - 10.0) // spacing))
        kinds: list[str] = []
        while len(kinds) < count:
            round_ = list(ACTIONS)
            self.random.shuffle(round_)
            kinds.extend(round_)
        step = max(1.0, (last - start - 10.0) / count)
        return [(kind, start + 10.0 + i * step) for i, kind in enumerate(kinds[:count])]

    def _check_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.check_every):
            try:
                problems = chaos_time_violations(self.fleet)
            except Exception as exc:  # the database is never stopped here: report, do not hide
                problems = [f"check failed: {exc}"]
            self.checks += 1
            if problems:
                self.chaos_violations.append((time.monotonic(), problems))
            self.sample_rss()

    # ----- report -----------------------------------------------------------------------------

    def rss_instances(self) -> dict[str, list[dict]]:
        """Per role, per process instance: first and last RSS sample (KiB) and its life (s)."""
        out: dict[str, list[dict]] = {}
        for role, samples in self.rss.items():
            by_pid: dict[int, list[tuple[float, int]]] = {}
            for pid, at, kib in samples:
                by_pid.setdefault(pid, []).append((at, kib))
            out[role] = [
                {"pid": pid, "first_kib": s[0][1], "last_kib": s[-1][1], "sampled_for_s": round(s[-1][0] - s[0][0], 1)}
                for pid, s in by_pid.items()
            ]
        return out

    def report(self, elapsed: float, settle: float | None, final: list[str]) -> dict:
        counts = dict(self.outcomes.counts)
        attempts = sum(counts.values())
        served = counts.get("served", 0)
        began = self.began
        # Attempts that began while the web process was being restarted (SIGTERM until /livez
        # answered, plus a second for requests already in flight) cannot be answered by design.
        windows = [
            (began + a["at"] - WEB_WINDOW_MARGIN, began + a["at"] + a["down_s"] + WEB_WINDOW_MARGIN)
            for a in self.actions
            if "down_s" in a
        ]
        outside = [(t, o) for t, o in self.outcomes.log if not any(lo <= t <= hi for lo, hi in windows)]
        outside_served = sum(1 for _, o in outside if o == "served")
        return {
            "seed": self.seed,
            "duration_s": round(elapsed, 1),
            "attempts": attempts,
            "served": served,
            "served_ratio": round(served / attempts, 4) if attempts else 0.0,
            "web_restart_windows_s": round(sum(hi - lo for lo, hi in windows), 1),
            "attempts_outside_web_restarts": len(outside),
            "served_ratio_outside_web_restarts": round(outside_served / len(outside), 4) if outside else 0.0,
            "failed_outside_web_restarts": dict(Counter(o for _, o in outside if o != "served").most_common()),
            "failed": {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if k != "served"},
            "release_errors": dict(self.outcomes.release_errors),
            "actions": [
                {
                    "kind": a["kind"],
                    "target": a.get("target", ""),
                    "at_s": round(a["at"], 1),
                    "recovered_s": None if a["recovered"] is None else round(a["recovered"], 1),
                    "waited_on": a.get("waited_on", []),
                    **({"stop_s": round(a["stop_s"], 1), "stop_killed": a["stop_killed"]} if "stop_s" in a else {}),
                    **({"violations": a["violations"]} if a.get("violations") else {}),
                }
                for a in self.actions
            ],
            "chaos_checks": self.checks,
            "chaos_violations": [problems for _, problems in self.chaos_violations],
            "final_invariants_settled_s": None if settle is None else round(settle, 1),
            "final_violations": final,
            "rss": self.rss_instances(),
        }


def verdict(result: dict, *, min_served: float, max_rss_growth: float) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    failures = []
    if result["final_violations"]:
        failures.append("invariants broken at the end: " + "; ".join(result["final_violations"]))
    if result["chaos_violations"]:
        failures.append(f"{len(result['chaos_violations'])} chaos-time invariant check(s) failed")
    unrecovered = [a for a in result["actions"] if a["recovered_s"] is None]
    if unrecovered:
        failures.append(f"{len(unrecovered)} action(s) never recovered: {unrecovered}")
    server_errors = {k: v for k, v in result["failed"].items() if k.startswith("route: HTTP 5") and "503" not in k}
    if server_errors:
        failures.append(f"server errors: {server_errors}")
    if result["served_ratio_outside_web_restarts"] < min_served:
        failures.append(
            f"served ratio outside web restarts {result['served_ratio_outside_web_restarts']:.3f} < {min_served}"
        )
    for role in ("web", "qcluster", "reconciler"):
        for instance in result["rss"][role]:
            bound = instance["first_kib"] * (1 + max_rss_growth) + RSS_SLACK_KIB
            if instance["last_kib"] > bound:
                failures.append(
                    f"{role} pid {instance['pid']}: RSS {instance['first_kib']} -> {instance['last_kib']} KiB"
                )
    return failures


def print_report(result: dict, failures: list[str]) -> None:
    print()
    print(f"soak: {result['duration_s']} s, seed {result['seed']}")
    print(f"  attempts {result['attempts']}, served {result['served']} ({100 * result['served_ratio']:.1f} %)")
    for reason, count in result["failed"].items():
        print(f"  failed {count:6d}  {reason}")
    print(
        f"  outside the web restarts ({result['web_restart_windows_s']} s in all): "
        f"{result['attempts_outside_web_restarts']} attempts, "
        f"{100 * result['served_ratio_outside_web_restarts']:.1f} % served"
    )
    for reason, count in result["failed_outside_web_restarts"].items():
        print(f"    failed {count:6d}  {reason}")
    if result["release_errors"]:
        print(f"  release errors: {result['release_errors']}")
    print("  actions (recovered = every invariant holds again, floors included):")
    for action in result["actions"]:
        recovered = "NEVER" if action["recovered_s"] is None else f"{action['recovered_s']:.1f} s"
        stopped = ""
        if "stop_s" in action:
            stopped = f" (stopped in {action['stop_s']:.1f} s{', SIGKILLed' if action['stop_killed'] else ''})"
        print(
            f"    t={action['at_s']:6.1f}s {action['kind']:<17} {action['target']:<28} recovered {recovered}{stopped}"
        )
        for problem in action["waited_on"][:2]:
            print(f"        first seen broken: {problem}")
    print(f"  chaos-time checks {result['chaos_checks']}, violations {len(result['chaos_violations'])}")
    print(f"  final invariants held after {result['final_invariants_settled_s']} s")
    for role, instances in result["rss"].items():
        for instance in instances:
            print(
                f"  RSS {role:<10} pid {instance['pid']:>7}: {instance['first_kib'] / 1024:6.1f} MiB -> "
                f"{instance['last_kib'] / 1024:6.1f} MiB over {instance['sampled_for_s']} s"
            )
    print("soak: PASSED" if not failures else "soak: FAILED\n  " + "\n  ".join(failures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic and chaos")
    parser.add_argument("--frontends", type=int, default=3)
    parser.add_argument("--period", type=float, default=0.1, help="seconds between a frontend's attempts")
    parser.add_argument("--check-every", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-served", type=float, default=0.9, help="served ratio outside web restarts")
    parser.add_argument("--max-rss-growth", type=float, default=0.1)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)

    import tempfile

    url = urlsplit(os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/controlplane"))
    admin = {"HOST": url.hostname or "127.0.0.1", "PORT": url.port or 5432, "USER": url.username or "postgres"}
    workdir = Path(tempfile.mkdtemp(prefix="cp-soak-"))
    (workdir / "var").mkdir()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    fleet = Fleet(admin_url=admin, workdir=workdir)
    fleet.create_database()
    failures = ["did not finish"]
    try:
        soak = Soak(
            fleet,
            duration=args.duration,
            frontends=args.frontends,
            period=args.period,
            check_every=args.check_every,
            seed=seed,
        )
        result = soak.run()
        failures = verdict(result, min_served=args.min_served, max_rss_growth=args.max_rss_growth)
        print_report(result, failures)
        if args.json:
            args.json.write_text(json.dumps({**result, "failures": failures}, indent=2))
    finally:
        if failures:
            print(fleet.logs())
        fleet.close()
        if args.keep or failures:
            print(f"soak: logs kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
