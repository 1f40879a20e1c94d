"""The ingestion path never loses a heartbeat nor delays one past the stale threshold, across a
web restart (SIGTERM and SIGKILL) in the middle of a stream of heartbeats.

Real processes on PostgreSQL: the web process as ``make run`` starts it (gunicorn, the
heartbeat's lean path), a reconcile loop passing every second, a reference worker heartbeating
every second, and two heartbeat clients in the test (a node-token node and a LocalAI-style
fleet-token node) that check every acknowledged heartbeat in the database at once. There is no
buffer between the answer and the database: a 200 is sent after the UPDATE committed. So:

* every heartbeat answered 200 is already in the row when the answer arrives (the stored
  ``last_heartbeat`` is at least the time the heartbeat was sent);
* while the web process is restarted, heartbeats fail (not acknowledged) and the workers send
  the next one; the recorded ``last_heartbeat`` of every node, sampled five times a second, is
  never older than the stale threshold, and no reconcile pass marks any node offline.
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


class HeartbeatClient(threading.Thread):
    """Heartbeats every ``interval`` s; after each 200 reads the row: it must hold that heartbeat."""

    def __init__(self, fleet, node_id: str, token: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.fleet, self.node_id, self.token, self.interval = fleet, node_id, token, interval
        self.client = ControlPlaneClient(fleet.base_url, timeout=5)
        self.acknowledged: list[datetime] = []
        self.refused: list[str] = []
        self.lost: list[str] = []
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
                (stored,) = self.fleet.sql("SELECT last_heartbeat FROM registry_node WHERE id = %s", (self.node_id,))[0]
                if answer.get("status") != "healthy" or stored is None or stored < sent:
                    self.lost.append(f"sent {sent.isoformat()}, answered {answer}, stored {stored}")
                self.acknowledged.append(sent)
            self.stop.wait(self.interval)


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
        f"{sum(len(c.acknowledged) for c in clients)} heartbeats acknowledged and each found in the row; "
        f"oldest recorded heartbeat {max(sampler.max_age.values()):.1f}s (stale after {STALE_AFTER:g}s)"
    )
    for client in clients:
        assert client.lost == [], client.lost  # acknowledged, not in the row: lost
        assert client.refused == [], client.refused
    assert sampler.samples > 20
    for name, age in sampler.max_age.items():
        assert age < STALE_AFTER, (name, age)
        assert sampler.statuses[name] == {"healthy"}, (name, sampler.statuses[name])
    assert fleet.events("node_offline") == []
