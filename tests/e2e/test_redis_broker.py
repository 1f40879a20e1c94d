"""django-q2's Redis broker (``REDIS_URL``), with real processes and the machine's Redis.

The qcluster as ``make run`` starts it, with ``REDIS_URL`` pointing at the tests' own Redis
database (``redis_db``): a cold load's task is a message in Redis (not a row of the ORM
broker's queue table) until a qcluster takes it; the qcluster's leader process runs reconcile
passes (they do not go through the broker) and keeps a model at its floor. The SIGKILL of the
qcluster in the middle of a cold load is ``test_faults.test_f`` (run with both brokers). A Redis
that does not answer makes a route call that must start a cold load a 503 ``broker_unavailable``
(not a 500), and the load runs once Redis is back.
"""

import signal
import time

import pytest

from tests.e2e.harness import fast_settings, wait_for
from tests.e2e.test_qcluster_leader import parent_of
from tests.processes import free_port
from tests.tools import binary

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

# django_q.brokers.redis_broker: the list of cluster "controlplane" (Q_CLUSTER["name"]), and the
# stats each cluster keeps under its own key while it runs (django_q.status.Stat).
QUEUE = "django_q:controlplane:q"
STATS = "django_q:controlplane:cluster:*"


def test_cold_loads_go_through_redis_and_the_qcluster_runs_passes(redis_db, fleet, report):
    import redis

    broker = redis.Redis.from_url(redis_db)
    # a pending job is requeued after LOAD_JOB_STALE_AFTER: longer than this test waits with no qcluster
    fleet.settings_env.update(fast_settings(REDIS_URL=redis_db, Q_WORKERS="1", CONTROLPLANE_LOAD_JOB_STALE_AFTER="60"))
    fleet.start_web()
    fleet.start_worker("redis-a", slots=2)
    fleet.wait_nodes({"redis-a"})

    # no qcluster yet: the route call creates the job and its task waits in Redis
    cold = {"backend_type": "echo", "model_options": {"Model": "via-redis"}}
    status, body = fleet.api("POST", "/api/v1/models/via-redis/route", {**cold, "wait_seconds": 0})
    assert status == 202, body
    job = body["load_job"]["id"]
    assert broker.llen(QUEUE) == 1
    assert fleet.sql("SELECT count(*) FROM django_q_ormq") == [(0,)]
    assert fleet.sql("SELECT state FROM registry_loadjob WHERE id = %s", (job,)) == [("pending",)]

    started = time.monotonic()
    qcluster = fleet.start_qcluster()

    def finished():
        state = fleet.sql("SELECT state FROM registry_loadjob WHERE id = %s", (job,))[0][0]
        return state if state in ("succeeded", "failed") else None

    state = wait_for(finished, timeout=90, interval=0.2, what="the load job run by the qcluster")
    took = time.monotonic() - started
    assert state == "succeeded"
    assert broker.llen(QUEUE) == 0
    assert list(broker.scan_iter(match=STATS)), "the running cluster keeps its stats in this Redis database"
    # django-q2's monitor stores the task's result (in the database, whatever the broker)
    assert fleet.sql("SELECT success FROM django_q_task WHERE name = %s", (f"load-{job}",)) == [(True,)]
    assert [r["state"] for r in fleet.replica_rows("via-redis")] == ["loaded"]

    # the qcluster's leader process runs the passes, and they keep a floor
    fleet.set_floor("floor-redis", 2)
    floor_took = fleet.wait_converged("floor-redis", 2, 60)
    holders = {pid for (pid,) in fleet.sql(
        "SELECT DISTINCT holder_pid FROM reconciler_reconcilepass WHERE outcome = 'ok'"
    )}
    assert holders and all(parent_of(pid) == qcluster.popen.pid for pid in holders), holders
    assert fleet.sql("SELECT count(*) FROM django_q_ormq") == [(0,)]

    code = fleet.stop(qcluster, signal.SIGTERM, timeout=15)
    assert code == 0, fleet.logs()
    fleet.check_invariants()
    report(
        f"e2e redis broker: cold load queued in Redis, done {took:.1f}s after the qcluster started; "
        f"a floor of 2 held {floor_took:.1f}s after it was set (passes in the qcluster's leader process)"
    )


def test_a_redis_outage_is_a_503_and_the_cold_load_runs_once_redis_is_back(fleet, report):
    # A Redis of the test's own (the machine's redis-server binary on a free port), down at first.
    server = binary("redis-server", "redis-server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    fleet.settings_env.update(fast_settings(REDIS_URL=url, Q_WORKERS="1", CONTROLPLANE_LOAD_JOB_STALE_AFTER="5"))
    fleet.start_web()
    fleet.start_worker("outage-a", slots=1)
    fleet.wait_nodes({"outage-a"})

    cold = {"backend_type": "echo", "model_options": {"Model": "outage"}}
    status, body = fleet.api("POST", "/api/v1/models/outage/route", {**cold, "wait_seconds": 0})
    assert status == 503 and body["code"] == "broker_unavailable", (status, body)
    # the job is kept, pending: a retry attaches to it instead of starting another
    (job,) = fleet.sql("SELECT id FROM registry_loadjob WHERE model_name = 'outage' AND state = 'pending'")[0]
    status, body = fleet.api("POST", "/api/v1/models/outage/route", {**cold, "wait_seconds": 0})
    assert status == 202 and body["load_job"]["id"] == str(job), (status, body)

    fleet.spawn("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    back = time.monotonic()
    fleet.start_qcluster()  # its housekeeping sends the pending job again (after 5 s without a runner)

    def routed():
        status, body = fleet.api("POST", "/api/v1/models/outage/route", {**cold, "wait_seconds": 5})
        return body if status == 200 else None

    lease = wait_for(routed, timeout=90, interval=0.5, what="the cold load done once Redis answers")
    took = time.monotonic() - back
    fleet.api("POST", f"/api/v1/leases/{lease['lease_id']}/release")
    assert fleet.sql("SELECT state, attempts FROM registry_loadjob WHERE id = %s", (job,)) == [("succeeded", 1)]
    fleet.check_invariants()
    report(f"e2e redis outage: route 503 broker_unavailable, then routed {took:.1f}s after Redis and a qcluster started")
