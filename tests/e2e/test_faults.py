"""Fault injection with real processes (issue 8): each scenario breaks one thing, measures how
long the fleet takes to converge (printed in the "reported numbers" summary), then checks the
fleet's invariants (``Fleet.check_invariants``).

Settings: stale after 4 s, heartbeat 1 s, a reconcile pass every second. The reconciler runs as
``manage.py reconcile --loop --interval 1`` (not the qcluster: django-q2 looks for due schedules
every 30 s, which would dominate every timing), and cold loads run in a thread of the web
process (``CONTROLPLANE_LOAD_JOB_RUNNER=thread``).
"""

import os
import signal
import threading
import time
from collections import Counter

import pytest

from proto import backend_pb2, client, worker_pb2
from tests.e2e.harness import ECHO_OPTIONS, Traffic, backend_token, command_token, fast_settings, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STALE_AFTER = 4.0
INTERVAL = 1.0
# a loaded 2-core machine: a pass, a backend start and a LoadModel each take up to seconds
SLACK = 10.0


def start(fleet, workers, *, slots=1, reconcilers=1, webs=1, **settings):
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread", **settings))
    fleet.start_web()
    for index in range(1, webs):
        fleet.spawn(f"web-{index}", fleet.web_command(_free(), workers=1))
    procs = {name: fleet.start_worker(name, slots=slots) for name in workers}
    fleet.wait_nodes(set(workers))
    for index in range(reconcilers):
        fleet.start_reconciler(INTERVAL, name=f"reconciler-{index}")
    return procs


def _free():
    from tests.processes import free_port

    return free_port()


def holders(fleet, model):
    return sorted(r["node"] for r in fleet.replica_rows(model) if r["state"] == "loaded")


@pytest.mark.parametrize("probe_cache", ["30", "0"], ids=["probe-cache-30s", "probe-cache-off"])
def test_a_sigkill_of_a_worker_under_traffic(fleet, report, probe_cache):
    # probe cache 30 s (the default): routes trust a recent Health probe, so until the dead node
    # is reaped some routes lease its replica (counted and reported); probe cache off: every
    # route probes, an unreachable replica is removed and the route retried at once
    workers = start(fleet, ["kill-a", "kill-b", "kill-c"], slots=1, CONTROLPLANE_ROUTE_PROBE_CACHE_SECONDS=probe_cache)
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    traffic = Traffic(fleet, "tiny", period=0.1)
    traffic.start()
    time.sleep(1.5)

    victim = holders(fleet, "tiny")[0]
    killed = time.monotonic()
    fleet.stop(workers[victim], signal.SIGKILL)

    seen: dict[str, float] = {}

    def both():  # the node reaped, and the floor back without it, each timed when first seen
        now = time.monotonic() - killed
        if "offline" not in seen and fleet.nodes()[victim]["status"] == "offline":
            seen["offline"] = now
        current = holders(fleet, "tiny")
        if (
            "replaced" not in seen
            and len(current) == 2
            and victim not in current
            and fleet.model("tiny")["ready_replicas"] == 2
        ):
            seen["replaced"] = now
        return len(seen) == 2

    wait_for(both, timeout=STALE_AFTER + 2 * INTERVAL + 2 * SLACK, interval=0.1, what=f"{victim} reaped and replaced")
    reaped, elapsed = seen["offline"], seen["replaced"]
    time.sleep(1.5)
    traffic.stop()

    after = [r for r in traffic.records if r[0] > killed]
    converged_at = killed + elapsed
    to_dead = [r for r in after if r[1] == 200 and r[2] == victim]
    late = [r for r in after if r[0] > converged_at and (r[1] != 200 or r[2] == victim or r[4] == "unreachable")]
    report(
        f"e2e a. worker SIGKILL under traffic (route probe cache {probe_cache}s): node offline {reaped:.1f}s, replicas re-placed {elapsed:.1f}s after the kill "
        f"(stale {STALE_AFTER:.0f}s + 2x{INTERVAL:.0f}s passes); routes after kill {len(after)}, "
        f"{len(to_dead)} to the dead replica before it was reaped, {len(late)} bad after convergence"
    )
    assert after and not late, late
    if probe_cache == "0":  # a route that began after the backends died never leases them
        assert not [r for r in to_dead if r[0] > killed + 0.5], to_dead
    assert reaped <= STALE_AFTER + 2 * INTERVAL + SLACK
    assert elapsed - reaped <= 2 * INTERVAL + SLACK  # negative when routes removed the dead replica first
    fleet.check_invariants()


def test_b_stopped_backend_is_busy_not_reaped_then_killed_backend_is_replaced(fleet, report):
    start(fleet, ["probe-a", "probe-b"], slots=1)
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    row = fleet.replica_rows("tiny")[0]
    listing = client.list_backends(
        row["node_address"], node_id=str(row["node_id"]), token=command_token(row["node_id"])
    )
    pid = next(
        b.pid for b in listing.backends if b.model_name == "tiny" and b.state == worker_pb2.BackendProcess.RUNNING
    )

    fleet.pause(pid)
    paused = time.monotonic()
    time.sleep(1)
    result = client.probe(row["address"], token=backend_token(row["node_id"]), timeout=1)
    assert result.outcome is client.Probe.BUSY and result.code.name == "DEADLINE_EXCEEDED", result
    time.sleep(7)  # ~7 passes, each probing it
    rows = {r["id"]: r for r in fleet.replica_rows("tiny")}
    assert row["id"] in rows, "a stopped (busy) backend was reaped"
    failures = fleet.sql("SELECT probe_failures FROM registry_nodemodel WHERE id = %s", (row["id"],))[0][0]
    fleet.resume(pid)
    stopped_for = time.monotonic() - paused

    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    elapsed = fleet.wait_converged(
        "tiny",
        2,
        30,
        since=killed,
        extra=lambda: row["id"] not in {r["id"] for r in fleet.replica_rows("tiny")},
    )
    removed = [e for e in fleet.events("replica_removed") if e.get("model_name") == "tiny"]
    reasons = sorted({(e.get("details") or {}).get("reason", "") for e in removed})
    report(
        f"e2e b. backend SIGSTOP {stopped_for:.1f}s: kept (busy, probe_failures={failures}); "
        f"backend SIGKILL: removed and replaced in {elapsed:.1f}s (reason {', '.join(reasons)})"
    )
    assert removed
    assert failures == 0
    fleet.check_invariants()


def test_b2_killed_backend_of_a_silent_worker_is_reaped_after_three_unreachable_probes(fleet, report):
    # With its worker alive, a dead backend is reported EXITED by ListBackends first (test b).
    # Here the worker is stopped (its ListBackends times out) but not yet stale (stale after
    # 20 s), so only the probes can find out: 3 consecutive UNREACHABLE probes remove the row.
    workers = start(
        fleet, ["silent-a", "silent-b"], slots=1, CONTROLPLANE_STALE_AFTER="20", CONTROLPLANE_GRPC_WORKER_TIMEOUT="1"
    )
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    row = next(r for r in fleet.replica_rows("tiny") if r["node"] == "silent-a")
    listing = client.list_backends(
        row["node_address"], node_id=str(row["node_id"]), token=command_token(row["node_id"])
    )
    pid = next(
        b.pid for b in listing.backends if b.model_name == "tiny" and b.state == worker_pb2.BackendProcess.RUNNING
    )
    fleet.pause(workers["silent-a"])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: row["id"] not in {r["id"] for r in fleet.replica_rows("tiny")},
        timeout=15,
        interval=0.2,
        what="the dead backend's row removed by probes",
    )
    removed = time.monotonic() - killed
    # The pass removes the row, then writes its events when the phase ends (flush_events): the
    # event may land a moment after the row is seen gone.
    event = wait_for(
        lambda: next((e for e in fleet.events("replica_removed") if e.get("node_name") == "silent-a"), None),
        timeout=10,
        interval=0.2,
        what="the replica_removed event of the dead backend",
    )
    assert fleet.nodes()["silent-a"]["status"] == "healthy"  # not reaped as a node: it was the probes
    fleet.resume(workers["silent-a"])
    elapsed = fleet.wait_converged("tiny", 2, 30, since=killed)
    report(
        f"e2e b2. backend SIGKILL behind a stopped worker: row removed {removed:.1f}s after the kill "
        f"(reason {(event.get('details') or {}).get('reason')}), floor back {elapsed:.1f}s after"
    )
    assert (event.get("details") or {}).get("reason") == "probe_unreachable", event
    fleet.check_invariants()


def test_c_graceful_worker_shutdown_replaces_before_staleness(fleet, report):
    workers = start(fleet, ["grace-a", "grace-b", "grace-c"], slots=1)
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    leaving = holders(fleet, "tiny")[0]
    stopped = time.monotonic()
    assert fleet.stop(workers[leaving], signal.SIGTERM) == 0
    shutdown = time.monotonic() - stopped
    assert fleet.nodes()[leaving]["status"] == "offline"  # deregistered, row kept
    elapsed = fleet.wait_converged(
        "tiny",
        2,
        STALE_AFTER + SLACK,
        since=stopped,
        extra=lambda: leaving not in holders(fleet, "tiny") and len(holders(fleet, "tiny")) == 2,
    )
    report(
        f"e2e c. worker SIGTERM: drained+deregistered in {shutdown:.1f}s, replicas re-placed {elapsed:.1f}s after SIGTERM "
        f"(stale threshold {STALE_AFTER:.0f}s)"
    )
    assert not fleet.events("node_offline") or all(e.get("node_name") != leaving for e in fleet.events("node_offline"))
    fleet.check_invariants()


def test_d_mass_staleness_guard_then_lone_stale_node_is_reaped(fleet, report):
    # "more than half" (CONTROLPLANE_RECONCILE_MASS_STALE_FRACTION=0.5, strictly greater): 2 of 3
    # blocked trips the guard; exactly half (2 of 4) does not, by design, and is reaped.
    names = ["mass-a", "mass-b", "mass-c"]
    workers = start(fleet, names, slots=1)
    fleet.set_floor("tiny", 3)
    fleet.wait_converged("tiny", 3, 90)
    before = {r["id"] for r in fleet.replica_rows("tiny")}

    paused = names[:2]
    for name in paused:
        fleet.pause(workers[name])
    blocked = time.monotonic()
    wait_for(lambda: fleet.events("mass_staleness_guard"), timeout=STALE_AFTER + SLACK, what="mass-staleness event")
    guarded = time.monotonic() - blocked
    time.sleep(4)
    nodes = fleet.nodes()
    assert all(nodes[name]["status"] == "healthy" for name in names), nodes
    assert {r["id"] for r in fleet.replica_rows("tiny")} == before, "replicas reaped under the guard"
    held = time.monotonic() - blocked
    for name in paused:
        fleet.resume(workers[name])
    resumed = time.monotonic()
    wait_for(lambda: fleet.events("mass_staleness_cleared"), timeout=SLACK + STALE_AFTER, what="guard cleared")
    fleet.wait_converged("tiny", 3, 30, extra=lambda: not fleet.invariant_violations())
    healthy = time.monotonic() - resumed

    lone = names[2]
    fleet.pause(workers[lone])
    paused_at = time.monotonic()
    wait_for(
        lambda: fleet.nodes()[lone]["status"] == "offline", timeout=STALE_AFTER + SLACK, what="lone stale node reaped"
    )
    reaped = time.monotonic() - paused_at
    report(
        f"e2e d. 2 of 3 heartbeats blocked: guard event after {guarded:.1f}s, nothing reaped for {held:.0f}s; guard cleared "
        f"and all healthy {healthy:.1f}s after resume; a lone stale node reaped {reaped:.1f}s after its heartbeats stopped"
    )
    fleet.resume(workers[lone])
    fleet.wait_nodes(names, timeout=30)
    fleet.wait_converged("tiny", 3, 30)
    fleet.check_invariants()


def test_e_racing_control_planes_load_a_cold_model_once(fleet, report):
    start(fleet, ["race-a", "race-b"], slots=2, reconcilers=3, webs=2)
    bases = [fleet.base_url] + [
        f"http://{p.popen.args[p.popen.args.index('--bind') + 1]}" for p in fleet.processes if p.name.startswith("web-")
    ]
    fleet.wait_nodes({"race-a", "race-b"})
    for base in bases[1:]:
        wait_for(lambda base=base: _answers(base), timeout=30, what=f"{base} up")
    ok_passes = "SELECT count(*) FROM reconciler_reconcilepass WHERE outcome = 'ok'"
    wait_for(lambda: fleet.sql(ok_passes)[0][0] >= 3, timeout=60, what="3 reconcile passes")
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def route(index):
        barrier.wait()
        results[index] = _route(fleet, bases[index % len(bases)], "cold", {**ECHO_OPTIONS, "wait_seconds": 40})

    started = time.monotonic()
    threads = [threading.Thread(target=route, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    elapsed = time.monotonic() - started
    assert all(r is not None and r[0] == 200 for r in results), results
    addresses = {r[1]["address"] for r in results}
    rows = fleet.replica_rows("cold")
    running = []
    for node in fleet.nodes().values():
        listing = client.list_backends(node["address"], node_id=node["id"], token=command_token(node["id"]))
        running += [b for b in listing.backends if b.model_name == "cold"]
    for _status, body in results:
        fleet.api("POST", f"/api/v1/leases/{body['lease_id']}/release")
    passes_then = fleet.sql(ok_passes)[0][0]
    wait_for(lambda: fleet.sql(ok_passes)[0][0] >= passes_then + 3, timeout=60, what="3 more passes")
    overlaps = fleet.sql(
        "SELECT a.id, b.id FROM reconciler_reconcilepass a JOIN reconciler_reconcilepass b ON a.id < b.id"
        " WHERE a.outcome = 'ok' AND b.outcome = 'ok' AND a.started_at < b.finished_at AND b.started_at < a.finished_at"
    )
    passes = fleet.sql("SELECT outcome, count(*) FROM reconciler_reconcilepass GROUP BY outcome")
    report(
        f"e2e e. 8 concurrent cold routes over 2 web processes, 3 reconcilers: 1 replica, {len(running)} backend(s), "
        f"all leased in {elapsed:.1f}s; passes {dict(passes)}, {len(overlaps)} overlapping"
    )
    assert len(addresses) == 1 and len(rows) == 1 and len(running) == 1, (addresses, rows, running)
    assert not overlaps
    fleet.check_invariants()


def _answers(base):
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/livez", timeout=2) as response:
            return response.status < 500
    except OSError:
        return False


def _route(fleet, base, model, body):
    original = fleet.web_port
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{base}/api/v1/models/{model}/route", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {fleet.api_key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
    finally:
        assert fleet.web_port == original


def test_f_sigkill_of_the_qcluster_in_the_middle_of_a_cold_load(broker_fleet, report):
    # cold loads run in the qcluster here (the default runner); the reconcile loop's housekeeping
    # requeues the job once its runner's heartbeat is 5 s stale, and a new qcluster takes it.
    # Both brokers: django-q2's ORM broker, and its Redis broker (REDIS_URL), which hands a task
    # out with no acknowledgement: the killed runner's message is gone, the requeue sends another.
    fleet = broker_fleet
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_STALE_AFTER="5"))
    fleet.start_web()
    qcluster = fleet.start_qcluster()
    fleet.start_worker("takeover-a", slots=1)
    fleet.wait_nodes({"takeover-a"})
    fleet.start_reconciler(INTERVAL)
    slow = {"backend_type": "echo", "model_options": {"Model": "slow", "Options": ["echo.load_delay_s=5"]}}
    status, body = fleet.api("POST", "/api/v1/models/slow/route", {**slow, "wait_seconds": 0})
    assert status == 202, body
    job = body["load_job"]["id"]
    assert job, body

    def loading():
        rows = fleet.sql(
            "SELECT j.state, r.state FROM registry_loadjob j JOIN registry_nodemodel r ON r.id = j.replica_id WHERE j.id = %s",
            (job,),
        )
        return rows and rows[0] == ("running", "loading")

    wait_for(loading, timeout=60, interval=0.1, what="the load job's loading row")
    time.sleep(1.5)  # inside LoadModel (5 s)
    fleet.stop(qcluster, signal.SIGKILL)
    killed = time.monotonic()
    fleet.start_qcluster()

    def done():
        return fleet.sql("SELECT state FROM registry_loadjob WHERE id = %s", (job,))[0][0] in ("succeeded", "failed")

    wait_for(done, timeout=60, interval=0.3, what="the load job finished after the takeover")
    elapsed = time.monotonic() - killed
    state, attempts, progress = fleet.sql(
        "SELECT state, attempts, progress FROM registry_loadjob WHERE id = %s", (job,)
    )[0]
    rows = fleet.replica_rows("slow")
    reserved = fleet.sql("SELECT coalesce(sum(reserved_vram), 0) FROM registry_node")[0][0]
    report(
        f"e2e f. qcluster SIGKILL during a 5 s cold load ({fleet.broker} broker): job {state} {elapsed:.1f}s after the kill "
        f"(attempts {attempts}, load-job stale after 5 s); {len(rows)} replica row(s), reserved VRAM {reserved}"
    )
    assert state == "succeeded", (state, progress)
    assert [r["state"] for r in rows] == ["loaded"], rows
    assert not fleet.sql("SELECT id FROM registry_nodemodel WHERE state = 'loading'")
    assert reserved == 0
    if fleet.broker == "redis":  # nothing went through the ORM broker's queue table
        assert fleet.sql("SELECT count(*) FROM django_q_ormq") == [(0,)]
    status, body = fleet.api("POST", "/api/v1/models/slow/route", {**slow, "wait_seconds": 10})
    assert status == 200 and body["address"] == rows[0]["address"], body
    fleet.api("POST", f"/api/v1/leases/{body['lease_id']}/release")
    fleet.check_invariants()


def test_f2_sigkill_of_the_qcluster_between_start_backend_and_load_model(fleet, report):
    # The loader dies after asking the worker for a backend and before LoadModel: the backend
    # comes up anyway (3 s start-up, ECHO_START_DELAY_S), idle and empty, and says Status READY
    # as LocalAI's backends do. The requeued job gets the same process back (reused) and must
    # load it: adopting it would mark the replica loaded while every Predict fails
    # FAILED_PRECONDITION. A pass every 2 s: the pass that requeues the job discards its loading
    # row, and the next one must find the new runner's row, or it stops the backend as an orphan.
    fleet.settings_env.update(fast_settings(CONTROLPLANE_LOAD_JOB_STALE_AFTER="5", ECHO_START_DELAY_S="3"))
    fleet.start_web()
    qcluster = fleet.start_qcluster()
    worker = fleet.start_worker("abandoned-a", slots=1)
    node = fleet.wait_nodes({"abandoned-a"})["abandoned-a"]
    fleet.start_reconciler(2.0)
    cold = {"backend_type": "echo", "model_options": {"Model": "cold"}}
    status, body = fleet.api("POST", "/api/v1/models/cold/route", {**cold, "wait_seconds": 0})
    assert status == 202, body
    job = body["load_job"]["id"]

    def starting():
        rows = fleet.sql(
            "SELECT j.state, r.state FROM registry_loadjob j JOIN registry_nodemodel r ON r.id = j.replica_id WHERE j.id = %s",
            (job,),
        )
        return rows and rows[0] == ("running", "loading")

    wait_for(starting, timeout=60, interval=0.1, what="the load job's loading row")
    time.sleep(1.0)  # inside StartBackend (the backend takes 3 s to listen)
    fleet.stop(qcluster, signal.SIGKILL)
    killed = time.monotonic()
    fleet.start_qcluster()

    def abandoned_backend():
        listing = client.list_backends(
            f"127.0.0.1:{worker.port}", node_id=node["id"], token=command_token(node["id"]), timeout=5
        )
        running = [b for b in listing.backends if b.model_name == "cold" and b.state == b.RUNNING]
        return running[0] if running else None

    backend = wait_for(abandoned_backend, timeout=30, interval=0.2, what="the abandoned backend running")
    assert (
        client.status(backend.address, token=backend_token(node["id"]), timeout=5).memory.breakdown["echo.loads"] == 0
    )

    def done():
        return fleet.sql("SELECT state FROM registry_loadjob WHERE id = %s", (job,))[0][0] in ("succeeded", "failed")

    wait_for(done, timeout=60, interval=0.3, what="the load job finished after the requeue")
    elapsed = time.monotonic() - killed
    state, attempts, progress = fleet.sql("SELECT state, attempts, progress FROM registry_loadjob WHERE id = %s", (job,))[0]
    rows = fleet.replica_rows("cold")
    status, body = fleet.api("POST", "/api/v1/models/cold/route", {**cold, "wait_seconds": 10})
    assert status == 200, body
    answer = ""
    try:
        reply = client.predict(
            body["address"],
            "still there",
            options=backend_pb2.PredictOptions(ModelIdentity="cold"),
            token=body["backend_token"],
        )
        answer = reply.message.decode()
    except client.GrpcCallError as error:
        answer = f"{error.code.name}: {error.detail}"
    finally:
        fleet.api("POST", f"/api/v1/leases/{body['lease_id']}/release")
    report(
        f"e2e f2. qcluster SIGKILL between StartBackend and LoadModel: job {state} {elapsed:.1f}s after the kill "
        f"(attempts {attempts}); the requeued run got backend pid {backend.pid} back and Predict answered {answer!r}"
    )
    assert state == "succeeded", (state, progress)
    assert [(r["state"], r["address"]) for r in rows] == [("loaded", backend.address)], rows
    assert abandoned_backend().pid == backend.pid  # the same process: reused, not restarted
    assert answer == "still there"
    fleet.check_invariants()


def test_g_postgresql_restart_during_traffic(private_fleet, report):
    fleet = private_fleet
    start(fleet, ["pg-a", "pg-b"], slots=1, DATABASE_CONNECT_TIMEOUT="2")
    reconciler = next(p for p in fleet.processes if p.name.startswith("reconciler"))
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    traffic = Traffic(fleet, "tiny", period=0.1, probe=False)
    traffic.start()
    time.sleep(1)

    fleet.server.stop()
    down = time.monotonic()
    time.sleep(1)
    status, body = fleet.api("GET", "/api/v1/models/tiny", timeout=10)
    assert status == 503 and body["code"] == "database_unavailable", (status, body)
    time.sleep(5)  # longer than the stale threshold: every heartbeat is lost meanwhile
    restarting = time.monotonic()
    fleet.server.start()
    up = time.monotonic()

    def routes_again():
        return any(r[0] > up and r[1] == 200 for r in traffic.records)

    wait_for(routes_again, timeout=30, what="a route answered after the restart")
    resumed = time.monotonic() - up
    elapsed = fleet.wait_converged(
        "tiny", 2, 40, since=up, extra=lambda: all(n["status"] == "healthy" for n in fleet.nodes().values())
    )
    traffic.stop()
    outage = [r for r in traffic.records if down < r[0] < restarting]
    guard = len(fleet.events("mass_staleness_guard"))
    # Not asserted: whether the first pass after the restart reaps a node depends on which
    # heartbeats arrived before it (all stale -> the guard holds; one fresh -> the other, alone
    # stale, is reaped and comes back on its next heartbeat). Reported, see docs/resilience.md.
    reaped = len(fleet.events("node_offline"))
    statuses = Counter(r[1] for r in outage)
    nodes = fleet.nodes()
    report(
        f"e2e g. PostgreSQL down {up - down:.1f}s under traffic: {dict(statuses)} answers during the outage; routes "
        f"again {resumed:.1f}s after restart, fleet healthy {elapsed:.1f}s after (mass-staleness guard events: {guard}, nodes reaped: {reaped}); reconcile loop alive: "
        f"{reconciler.alive()}"
    )
    assert outage and set(statuses) <= {503, 0}, statuses  # 0 = the request timed out client-side
    assert all(n["status"] == "healthy" for n in nodes.values()), nodes
    assert reconciler.alive(), "the reconcile --loop process exited on the outage:\n" + reconciler.log()[-3000:]
    fleet.check_invariants()


def test_g2_postgresql_crash_under_route_traffic_loses_lease_writes_whole(private_fleet, report):
    # Leases commit asynchronously (CONTROLPLANE_LEASE_SYNCHRONOUS_COMMIT off, the default): a
    # crash of PostgreSQL may lose the last lease writes, but each grant with its in-flight
    # increment and each release with its decrement, so after recovery in-flight equals the
    # live leases on every replica, and routing resumes.
    fleet = private_fleet
    start(fleet, ["crash-a", "crash-b"], slots=2, DATABASE_CONNECT_TIMEOUT="2")
    fleet.set_floor("tiny", 2)
    fleet.wait_converged("tiny", 2, 60)
    frontends = [Traffic(fleet, "tiny", period=0.0, probe=False) for _ in range(3)]
    for frontend in frontends:
        frontend.start()
    wait_for(lambda: sum(r[1] == 200 for f in frontends for r in f.records) >= 50, timeout=30, what="routes before")

    fleet.server.crash()
    down = time.monotonic()
    time.sleep(1)
    fleet.server.start()
    up = time.monotonic()

    def every_frontend_routes_again():
        return all(any(r[0] > up and r[1] == 200 for r in f.records) for f in frontends)

    wait_for(every_frontend_routes_again, timeout=30, what="routes answered after the crash recovery")
    for frontend in frontends:
        frontend.stop()
    before = sum(r[0] < down and r[1] == 200 for f in frontends for r in f.records)
    release_errors = [error for f in frontends for error in f.release_errors]
    report(
        f"e2e g2. PostgreSQL crashed (immediate stop) under 3 frontends' route traffic: {before} leases granted "
        f"before, {len(release_errors)} releases answered with an error (a grant the crash lost, or the outage)"
    )
    fleet.check_invariants()


def test_h_control_plane_restart_with_stale_heartbeats_three_models_three_workers(fleet, report):
    # LocalAI's restart bug (a control-plane restart reaps every replica row and loses the load recipe): web and reconciler SIGKILLed, nobody receives
    # heartbeats for twice the stale threshold, then both restart; every model is back at its
    # floor from the stored load info (no route call), and the invariants hold
    from tests.e2e.harness import RESTART_FLOORS, stale_restart, start_stale_restart_fleet

    procs = start_stale_restart_fleet(fleet, RESTART_FLOORS)
    before = {r["id"] for r in fleet.replica_rows()}
    times = stale_restart(fleet, procs, RESTART_FLOORS, down_for=2 * STALE_AFTER, interval=INTERVAL)
    fleet.check_invariants()
    after = {r["id"] for r in fleet.replica_rows()}
    reaped = len(fleet.events("node_offline"))
    guard = len(fleet.events("mass_staleness_guard"))
    report(
        f"e2e h. control-plane restart after {2 * STALE_AFTER:.0f}s without heartbeats (3 models, floors "
        f"{sorted(RESTART_FLOORS.values())}, 3 workers): every floor back {times['restart']:.1f}s after the restart "
        f"(web answering after {times['web']:.1f}s); replica rows kept {len(before & after)} of {len(before)}, "
        f"nodes reaped {reaped}, mass-staleness guard events {guard}"
    )
    assert all(p.alive() for name, p in procs.items() if name.startswith("restart-"))
    assert times["restart"] <= STALE_AFTER + 2 * INTERVAL + 2 * SLACK
