"""Affinity routing end to end (issue 16, third part): gunicorn, a reconcile loop and three
reference workers with the ``echo`` backend; a frontend (``cpclient``) routes with
``affinity_key`` and calls ``Predict`` on every leased replica.

While load is even every turn of a session lands on one replica, and the sessions spread over
the replicas. When the session's replica is held busy (leases of its own hot session kept open),
the next turns spill to another replica, which answers them; once those leases are released the
session is back on its replica.
"""

import pytest

from tests.e2e.harness import fast_settings

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

WORKERS = ["aff-a", "aff-b", "aff-c"]
SESSIONS = 12
TURNS = 4


def test_affinity_keeps_a_session_on_its_replica_while_load_is_even_and_spills_when_it_is_not(fleet, report):
    from cpclient import ControlPlaneClient

    fleet.settings_env.update(
        fast_settings(CONTROLPLANE_LOAD_JOB_RUNNER="thread", CONTROLPLANE_ROUTE_AFFINITY_LOAD_FACTOR="1.25")
    )
    fleet.start_web()
    for name in WORKERS:
        fleet.start_worker(name, slots=1)
    fleet.wait_nodes(set(WORKERS))
    fleet.start_reconciler(1.0)
    fleet.set_floor("tiny", 3)
    fleet.wait_converged("tiny", 3, 90)
    frontend = ControlPlaneClient(fleet.base_url, fleet.api_key, timeout=10)

    def turn(session: str, text: str) -> str:
        with frontend.lease("tiny", affinity_key=session) as lease:
            assert lease.predict(text).message == text.encode()
            return lease.node_name

    # Even load: one request at a time, every turn of a session on the replica of its first.
    homes = {}
    for number in range(SESSIONS):
        session = f"chat-{number}"
        nodes = [turn(session, f"{session} turn {index}") for index in range(TURNS)]
        assert len(set(nodes)) == 1, (session, nodes)
        homes[session] = nodes[0]
    assert len(set(homes.values())) >= 2, homes  # the keys spread over the replicas

    # Skewed: the session's own concurrent requests hold its replica (3 replicas, nothing else in
    # flight: the cap is ceil(1.25 x (held + 1) / 3) + 1, so the fourth request spills).
    session = "chat-0"
    home = homes[session]
    held = []
    try:
        while True:
            lease = frontend.route("tiny", affinity_key=session)
            held.append(lease)
            if lease.node_name != home:
                break
            assert len(held) <= 4, [lease.node_name for lease in held]
        spilled_to = held[-1].node_name
        assert [lease.node_name for lease in held[:-1]] == [home] * (len(held) - 1) and len(held) == 4
        # The spilled request is served by the other replica.
        assert held[-1].predict("spilled turn").message == b"spilled turn"
        rows = {row["node"]: row["in_flight"] for row in fleet.replica_rows("tiny")}
        assert rows[home] == 3 and rows[spilled_to] == 1, rows
    finally:
        for lease in held:
            frontend.release(lease)

    # Load even again: the session is back on its replica.
    assert turn(session, "after the burst") == home
    rows = fleet.replica_rows("tiny")
    assert sum(row["in_flight"] for row in rows) == 0, rows
    report(
        f"e2e affinity: {SESSIONS} sessions x {TURNS} turns each on one replica at even load "
        f"({len(set(homes.values()))} replicas used); with {home} holding 3 leases the session spilled to {spilled_to} "
        "and came back once they were released"
    )
    fleet.check_invariants()
