"""The control plane behind PgBouncer in transaction mode (Debian's pgbouncer 1.18), as
deploy/pgbouncer/pgbouncer.ini ships it and ``DATABASE_POOLER=pgbouncer-transaction`` configures it.

A real ``pgbouncer`` runs the shipped file (listen port, database line, log and pid paths
substituted, ``trust`` authentication in place of the shipped ``scram-sha-256`` on this throwaway
loopback port; each substitution must match exactly once) in front of the machine's PostgreSQL
with a pool of 4 server connections, fewer than the processes' client connections, so
transactions of different processes share server sessions. ``migrate_locked``, two gunicorn
workers and a qcluster (leader process: reconcile passes; worker process: a cold load taken from
django-q2's ORM broker) reach the database only through PgBouncer, except the session-level
advisory locks, which go to PostgreSQL directly (``DATABASE_DIRECT_URL``).

Checked: the cold load runs, passes run and keep a floor of two replicas, two frontends' routes
all succeed, and every advisory lock PostgreSQL shows while this runs is held by a session that
is not one of PgBouncer's server connections (``SHOW SERVERS`` on its admin console); no process
logged a prepared-statement or cursor error.
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.harness import ECHO_OPTIONS, ROOT, Fleet, Traffic, fast_settings, wait_for
from tests.processes import free_port
from tests.tools import binary

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SHIPPED = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"


class PgBouncer:
    def __init__(self, fleet: Fleet, executable: str, pool_size: int = 4):
        # Not under pytest's private tmp_path: as root, pgbouncer refuses to run and is started
        # as the postgres user, who must reach its files.
        self.directory = Path(tempfile.mkdtemp(prefix="cp-e2e-pgbouncer-"))
        self.port = free_port()
        admin = fleet.admin_url
        host, port = admin["HOST"], admin["PORT"] or 5432
        text = SHIPPED.read_text()
        replacements = {
            "controlplane = host=10.0.0.20 port=5432 dbname=controlplane":
                f"{fleet.database} = host={host} port={port} dbname={fleet.database}",
            "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
            "listen_port = 6432": f"listen_port = {self.port}",
            "auth_type = scram-sha-256": "auth_type = trust",
            "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {self.directory / 'userlist.txt'}",
            "logfile = /var/log/postgresql/pgbouncer.log": f"logfile = {self.directory / 'pgbouncer.log'}",
            "pidfile = /var/run/postgresql/pgbouncer.pid": f"pidfile = {self.directory / 'pgbouncer.pid'}",
            "default_pool_size = 20": f"default_pool_size = {pool_size}",
            "reserve_pool_size = 5": "reserve_pool_size = 0",
        }
        for old, new in replacements.items():
            assert text.count(old) == 1, f"{SHIPPED.name}: expected {old!r} exactly once"
            text = text.replace(old, new)
        (self.directory / "pgbouncer.ini").write_text(text)
        (self.directory / "userlist.txt").write_text(f'"{admin["USER"]}" ""\n')
        run_as = []
        if os.getuid() == 0:
            shutil.chown(self.directory, "postgres")
            for entry in self.directory.iterdir():
                shutil.chown(entry, "postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        self.process = fleet.spawn("pgbouncer", [*run_as, executable, str(self.directory / "pgbouncer.ini")])
        self.user = admin["USER"]
        self.psql = binary("psql", "postgresql-client")
        wait_for(self._answers, timeout=20, what="pgbouncer accepting")

    def url(self, database: str) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin(self, command: str) -> list[list[str]]:
        """A command on PgBouncer's admin console (psql: the console speaks only the simple
        query protocol), rows as lists of fields."""
        result = subprocess.run(
            [self.psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "pgbouncer",
             "-AtF", "\t", "-c", command],
            capture_output=True, text=True, timeout=10,
        )
        assert result.returncode == 0, result.stderr
        return [line.split("\t") for line in result.stdout.splitlines() if line]

    def _answers(self) -> bool:
        assert self.process.alive(), self.log()
        try:
            self.admin("SHOW VERSION")
            return True
        except AssertionError:
            return False

    def server_pids(self) -> set[int]:
        """PostgreSQL backend pids of PgBouncer's server connections (SHOW SERVERS' remote_pid)."""
        rows = self.admin("SHOW SERVERS")
        header = subprocess.run(
            [self.psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "pgbouncer",
             "-AF", "\t", "-c", "SHOW SERVERS"], capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()[0].split("\t")
        column = header.index("remote_pid")
        return {int(row[column]) for row in rows}

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def advisory_lock_holders(fleet: Fleet) -> dict[int, list[int]]:
    """pid -> the low 32 bits of each advisory lock key it holds (the project's keys are
    0x6370_0000_000N: classid 0x6370, objid N)."""
    holders: dict[int, list[int]] = {}
    for pid, objid in fleet.sql(
        "SELECT l.pid, l.objid::bigint FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.classid = %s AND l.database = (SELECT oid FROM pg_database WHERE datname = %s)",
        (0x6370, fleet.database),
    ):
        holders.setdefault(pid, []).append(objid)
    return holders


def test_web_and_qcluster_work_through_pgbouncer_in_transaction_mode(fleet, report):
    bouncer = PgBouncer(fleet, binary("pgbouncer", "pgbouncer"))
    try:
        fleet.settings_env.update(fast_settings(
            DATABASE_URL=bouncer.url(fleet.database), DATABASE_POOLER="pgbouncer-transaction",
            DATABASE_DIRECT_URL=fleet.database_url, Q_WORKERS="1",
        ))
        fleet.manage("migrate_locked", "-v", "0")  # through PgBouncer, its lock taken directly
        fleet.start_web(workers=2)
        fleet.start_worker("pgb-1", slots=2)
        fleet.start_worker("pgb-2", slots=2)
        fleet.wait_nodes({"pgb-1", "pgb-2"})
        fleet.start_qcluster()

        # a cold load: a LoadJob row, a django-q2 task through the ORM broker, run by the
        # qcluster's worker process, all through PgBouncer
        cold = {"backend_type": "echo", "model_options": {"Model": "pgb-cold"}}
        status, body = fleet.api("POST", "/api/v1/models/pgb-cold/route", {**cold, "wait_seconds": 30})
        assert status == 200, body
        fleet.set_floor("pgb-floor", 2)
        fleet.wait_converged("pgb-floor", 2, 60)

        leader_seen, pooled_holders = set(), []
        frontends = [Traffic(fleet, "pgb-floor", period=0.1, probe=False) for _ in range(2)]
        for frontend in frontends:
            frontend.start()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            servers = bouncer.server_pids()
            for pid, keys in advisory_lock_holders(fleet).items():
                if 3 in keys:
                    leader_seen.add(pid)
                if pid in servers:
                    pooled_holders.append((pid, keys))
            time.sleep(0.3)
        for frontend in frontends:
            frontend.stop()

        routes = [record for frontend in frontends for record in frontend.records]
        assert routes and all(status == 200 for _, status, *_ in routes), [r for r in routes if r[1] != 200]
        assert leader_seen, "no process held the reconcile leader lock"
        assert pooled_holders == [], f"advisory locks held on PgBouncer's server connections: {pooled_holders}"
        assert len(bouncer.server_pids()) <= 4
        (passes,) = fleet.sql("SELECT count(*) FROM reconciler_reconcilepass WHERE outcome = 'ok'")[0]
        assert passes >= 3, passes
        status, body = fleet.api("POST", "/api/v1/models/pgb-floor/route", ECHO_OPTIONS)
        assert status == 200, body

        for process in fleet.processes:
            log = process.log().lower()
            assert "prepared statement" not in log and 'cursor "' not in log, (process.name, process.log()[-3000:])
        report(
            f"e2e pgbouncer: {len(routes)} routes through gunicorn and PgBouncer (transaction mode, "
            f"4 server connections) all 200; {passes} passes by the qcluster's leader, whose lock was held "
            f"by a direct session ({sorted(leader_seen)}), never by a pooled one"
        )
    finally:
        fleet.close()
        bouncer.close()


def test_why_the_locks_go_direct_a_session_lock_through_pgbouncer_is_held_by_two_clients(fleet):
    """The failure the direct alias avoids, shown on the real pooler: with one server connection
    in the pool, two clients' ``pg_try_advisory_lock`` both succeed (each statement ran on the
    same server session, which already held the lock), and once both clients are gone the lock
    is still held, by PgBouncer's server connection, released by nobody. Two reconcile leaders
    would both lead, and a dead leader's lock would never be freed."""
    import psycopg

    bouncer = PgBouncer(fleet, binary("pgbouncer", "pgbouncer"), pool_size=1)
    try:
        url = bouncer.url(fleet.database)
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as first, \
                psycopg.connect(url, autocommit=True, prepare_threshold=None) as second:
            assert first.execute("SELECT pg_try_advisory_lock(%s)", (0x6370_0000_0003,)).fetchone()[0] is True
            assert second.execute("SELECT pg_try_advisory_lock(%s)", (0x6370_0000_0003,)).fetchone()[0] is True
        holders = advisory_lock_holders(fleet)
        assert list(holders) == list(bouncer.server_pids()) and holders[next(iter(holders))] == [3], holders
        # directly, a second session is refused, as the leader loop expects
        with psycopg.connect(fleet.database_url, autocommit=True) as direct, \
                psycopg.connect(fleet.database_url, autocommit=True) as other:
            assert direct.execute("SELECT pg_try_advisory_lock(%s)", (0x6370_0000_0002,)).fetchone()[0] is True
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (0x6370_0000_0002,)).fetchone()[0] is False
    finally:
        fleet.close()
        bouncer.close()
