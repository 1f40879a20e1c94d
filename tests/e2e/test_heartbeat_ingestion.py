"""The ingestion path never loses a heartbeat nor delays one past the stale threshold, across a
web restart (SIGTERM and SIGKILL) in the middle of a stream of heartbeats.

Real processes on PostgreSQL: the web process as ``make run`` starts it (gunicorn, the
heartbeat's lean path, coalescing: ``registry/heartbeat_flush.py``), a reconcile loop passing
every second, a reference worker heartbeating every second, and two heartbeat clients in the
test (a node-token node, whose steady heartbeats are acknowledged into the web process's buffer
and written by its flusher, and a LocalAI-style fleet-token node, written before the answer)
that look for every acknowledged heartbeat in the database. So:

* every heartbeat answered 200 is in the row (the stored ``last_heartbeat`` is at least the
  time the heartbeat was sent) within a few flush windows of its answer; across a SIGTERM the
  stopping web process writes what it buffered, so none is lost; a SIGKILL may lose the ones
  acknowledged in the last flush window before it, and no other;
* while the web process is restarted, heartbeats fail (not acknowledged) and the workers send
  the next one; the recorded ``last_heartbeat`` of every node, sampled five times a second, is
  never older than the stale threshold, and no reconcile pass marks any node offline.

A second test stops the web process while heartbeats of twenty nodes sit in its buffer (a
flush interval of a minute, so only the stop can write them): every one lands.
"""

import signal
import threading
import time
from datetime import UTC, datetime

import pytest

from tests.e2e.harness import TOKEN, wait_for
from worker.control_plane import ControlPlaneClient, ControlPlaneError, ControlPlaneUnreachable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STALE_AFTER = 30.0  # the shipped CONTROLPLANE_STALE_AFTER
GIB = 2**30
# How long an acknowledged heartbeat may take to reach the row: the shipped flush window
# (0.2 s) many times over, for a shared machine; far below the stale threshold all the same.
LANDING_DEADLINE = 5.0
# A SIGKILL loses at most the heartbeats acknowledged within the last flush window (0.2 s)
# before it; on a shared machine the flusher thread may run late (slowest landing seen under
# load: 0.6 s), hence the margin.
KILL_WINDOW = 2.0


class HeartbeatClient(threading.Thread):
    """Heartbeats every ``interval`` s; after each 200 reads the row until it holds that
    heartbeat (``LANDING_DEADLINE``); one that never lands is lost (with when it was answered)."""

    def __init__(self, fleet, node_id: str, token: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.fleet, self.node_id, self.token, self.interval = fleet, node_id, token, interval
        self.client = ControlPlaneClient(fleet.base_url, timeout=5)
        self.acknowledged: list[datetime] = []
        self.refused: list[str] = []
        self.lost: list[tuple[float, str]] = []  # (time.monotonic() of the answer, what)
        self.slowest_landing = 0.0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            sent = datetime.now(UTC)
            try:
                answer = self.client.heartbeat(self.node_id, self.token, {"available_vram": GIB})
            except ControlPlaneUnreachable:
                pass  # not acknowledged: the web process is down; the next one goes out on time
            except ControlPlaneError as exc:
                if exc.status < 500:  # a 503 while the web process starts is not acknowledged either
                    self.refused.append(f"{exc.status} {exc.code}")
            else:
                answered = time.monotonic()
                if answer.get("status") != "healthy":
                    self.lost.append((answered, f"sent {sent.isoformat()}, answered {answer}"))
                stored = self.landed(sent, answered)
                if stored is None or stored < sent:
                    self.lost.append((answered, f"sent {sent.isoformat()}, answered {answer}, stored {stored}"))
                self.acknowledged.append(sent)
            self.stop.wait(self.interval)

    def landed(self, sent: datetime, answered: float):
        while True:
            (stored,) = self.fleet.sql("SELECT last_heartbeat FROM registry_node WHERE id = %s", (self.node_id,))[0]
            if stored is not None and stored >= sent:
                self.slowest_landing = max(self.slowest_landing, time.monotonic() - answered)
                return stored
            if time.monotonic() - answered > LANDING_DEADLINE:
                return stored
            time.sleep(0.05)


class AgeSampler(threading.Thread):
    """Every 0.2 s: each node's status and the age of its recorded heartbeat, by the database's clock."""

    def __init__(self, fleet, names):
        super().__init__(daemon=True)
        self.fleet, self.names = fleet, list(names)
        self.max_age = dict.fromkeys(self.names, 0.0)
        self.statuses: dict[str, set] = {name: set() for name in self.names}
        self.samples = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            rows = self.fleet.sql(
                "SELECT name, status, extract(epoch FROM now() - last_heartbeat) FROM registry_node WHERE name = ANY(%s)",
                (self.names,),
            )
            for name, status, age in rows:
                self.statuses[name].add(status)
                self.max_age[name] = max(self.max_age[name], float(age if age is not None else float("inf")))
            self.samples += 1
            self.stop.wait(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_heartbeat_is_lost_or_delayed_past_the_stale_threshold_across_a_web_restart(fleet, report, sig):
    fleet.settings_env.update(
        CONTROLPLANE_STALE_AFTER=str(STALE_AFTER),
        CONTROLPLANE_HEARTBEAT_INTERVAL="1",
        CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES="true",
    )
    web = fleet.start_web()
    fleet.start_reconciler(interval=1.0)
    fleet.start_worker("ingest-ref", heartbeat=1.0)
    registrar = ControlPlaneClient(fleet.base_url, timeout=20)
    own = registrar.register({"name": "ingest-own", "address": "127.0.0.1:50994", "auth_mode": "node_token"}, TOKEN)
    localai = registrar.register({"name": "ingest-localai", "address": "127.0.0.1:50993"}, TOKEN)
    assert localai["auth_mode"] == "fleet_token"
    fleet.wait_nodes({"ingest-ref", "ingest-own", "ingest-localai"})
    clients = [HeartbeatClient(fleet, own["id"], own["node_token"]), HeartbeatClient(fleet, localai["id"], TOKEN)]
    sampler = AgeSampler(fleet, ["ingest-ref", "ingest-own", "ingest-localai"])
    for thread in (*clients, sampler):
        thread.start()
    try:
        wait_for(lambda: all(len(c.acknowledged) >= 10 for c in clients), timeout=30, what="heartbeats flowing")
        passes_before = fleet.sql("SELECT count(*) FROM reconciler_reconcilepass")[0][0]

        stopped = time.monotonic()
        fleet.stop(web, sig, timeout=30)
        web = fleet.start_web()
        down = time.monotonic() - stopped
        restarted = datetime.now(UTC)
        wait_for(
            lambda: all(sum(sent > restarted for sent in c.acknowledged) >= 10 for c in clients),
            timeout=30,
            what="heartbeats acknowledged after the restart",
        )
        ref_after = fleet.sql("SELECT last_heartbeat FROM registry_node WHERE name = 'ingest-ref'")[0][0]
        wait_for(
            lambda: fleet.sql("SELECT last_heartbeat FROM registry_node WHERE name = 'ingest-ref'")[0][0] > ref_after,
            timeout=10,
            what="the reference worker heartbeating through the new web process",
        )
        wait_for(
            lambda: fleet.sql("SELECT count(*) FROM reconciler_reconcilepass")[0][0] >= passes_before + 3,
            timeout=30,
            what="reconcile passes after the restart",
        )
    finally:
        for thread in (*clients, sampler):
            thread.stop.set()
        for thread in (*clients, sampler):
            thread.join(10)

    report(
        f"heartbeat ingestion across a web restart ({sig.name}): web down {down:.1f}s; "
        f"{sum(len(c.acknowledged) for c in clients)} heartbeats acknowledged, "
        f"{sum(len(c.lost) for c in clients)} not found in the row; slowest to land "
        f"{max(c.slowest_landing for c in clients):.2f}s after its answer; "
        f"oldest recorded heartbeat {max(sampler.max_age.values()):.1f}s (stale after {STALE_AFTER:g}s)"
    )
    for client in clients:
        if sig == signal.SIGTERM:
            assert client.lost == [], client.lost  # acknowledged, not in the row: lost
        else:  # only what the killed process still held, acknowledged just before the kill
            assert all(stopped - KILL_WINDOW <= answered <= stopped + 1.0 for answered, _ in client.lost), client.lost
        assert client.refused == [], client.refused
    assert sampler.samples > 20
    for name, age in sampler.max_age.items():
        assert age < STALE_AFTER, (name, age)
        assert sampler.statuses[name] == {"healthy"}, (name, sampler.statuses[name])
    assert fleet.events("node_offline") == []


def test_heartbeats_in_the_buffer_land_when_the_web_process_stops(fleet, report):
    fleet.settings_env.update(CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS="60")  # only the stop writes
    web = fleet.start_web(workers=1)
    registrar = ControlPlaneClient(fleet.base_url, timeout=20)
    nodes = []
    for i in range(20):
        answer = registrar.register(
            {"name": f"buffered-{i:02d}", "address": f"127.0.0.1:{51000 + i}", "auth_mode": "node_token"}, TOKEN
        )
        nodes.append((answer["id"], answer["node_token"], ControlPlaneClient(fleet.base_url, timeout=20)))
    for node_id, token, client in nodes:
        client.heartbeat(node_id, token, {"available_vram": GIB})  # written: fills the token cache
    for node_id, token, client in nodes:
        assert client.heartbeat(node_id, token, {"available_vram": 2 * GIB})["status"] == "healthy"  # buffered

    def stored() -> list[int]:
        ids = [node_id for node_id, _, _ in nodes]
        return [
            vram for (vram,) in fleet.sql("SELECT available_vram FROM registry_node WHERE id = ANY(%s::uuid[])", (ids,))
        ]

    assert stored() == [GIB] * 20  # acknowledged, in the buffer
    stopping = time.monotonic()
    fleet.stop(web, signal.SIGTERM, timeout=30)
    report(f"20 buffered heartbeats written by the web process's stop ({time.monotonic() - stopping:.1f}s)")
    assert stored() == [2 * GIB] * 20
