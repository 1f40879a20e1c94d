"""Heartbeat ingestion: ``POST /api/node/{id}/heartbeat`` through gunicorn against pgbench
running the UPDATE that verb sends, both on the local PostgreSQL, in the same run, with 100,
1,000 and 10,000 registered nodes.

    .venv/bin/python bench/bench_heartbeat.py [--quick] [--sizes 100,1000,10000] [--seconds 10] [--clients 4] [--write]

* API: a throw-away database (migrated), the web process exactly as ``make run`` starts it
  (``gunicorn -c controlplane/gunicorn.conf.py``: its workers, threads and keep-alive, and the
  settings' defaults: persistent, health-checked database connections) on loopback, and a
  bounded load generator: ``--clients`` threads, each with one kept-alive connection (re-opened
  whenever the server closes it), each posting heartbeats for its own share of the nodes, back
  to back, for ``--seconds`` s. Each request is a whole HTTP/1.1 request (``Host``,
  ``Authorization: Bearer <node token>``, ``Content-Type``, ``Content-Length``, a JSON body);
  each answer is read whole and counted only when it is a 200 with the node's status. The
  generator writes prepared request bytes to a socket and parses the answer's head itself
  (``http.client`` cost the shared CPUs about as much as the server did).
* Steady state: before each timed run every node sends one heartbeat (``warm``), as every node
  of a running fleet has: the timed heartbeats are the steady ones, which the web process
  acknowledges into its buffer and writes in batches (``registry/heartbeat_flush.py``), every
  0.2 s one ``UPDATE ... FROM (VALUES ...)`` for all nodes heard from since.
* Nodes: the first through ``Node.objects.register`` (its own node token); the others are
  copies of that row, each with its own id, name and node token (``INSERT ... SELECT`` over
  arrays: registering 10,000 nodes one by one would take minutes). Heartbeats cycle over every
  node of the size, so each one updates another row.
* baseline: ``pgbench -n -T SECONDS -c CLIENTS -f script`` where the script is the exact UPDATE
  the heartbeat sends (``Node.objects.heartbeat_with_token``, captured from Django: the token
  check is part of it), with the node id and its token hash picked at random through a small
  table (``bench_ids``, an index lookup like the verb's ``WHERE id = ...``), at each size.

Prints a Markdown section and, last, ``RATIO heartbeat: <pgbench tps / API req/s>x (goal <= 2x)``
for the headline size (1,000 nodes, or the size nearest to it); ``--write`` appends the
section to ``bench/RESULTS.md``. ``--quick`` (under a minute): 3 s per measurement. The
database is dropped afterwards. ``BENCH_DATABASE_URL`` names the server (default
``postgres://postgres@127.0.0.1:5432/controlplane_bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import runpy
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SERVER = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/controlplane_bench")
DBNAME = f"bench_hb_{uuid.uuid4().hex[:8]}"
DB_URL = SERVER.rsplit("/", 1)[0] + "/" + DBNAME
os.environ["DATABASE_URL"] = DB_URL
os.environ.setdefault("CONTROLPLANE_REGISTRATION_TOKEN", "bench-" + uuid.uuid4().hex)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import psycopg  # noqa: E402

HEADLINE = 1000


def admin():
    url = urlparse(SERVER)
    return psycopg.connect(
        host=url.hostname, port=url.port or 5432, user=url.username or "postgres", dbname="postgres", autocommit=True
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Connection:
    """One kept-alive HTTP/1.1 connection that sends prepared requests and reads whole answers."""

    def __init__(self, port: int):
        self.port = port
        self.sock = None
        self.buffer = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(b":", 1) for line in lines[1:])
        fields = {name.strip().lower(): value.strip() for name, value in fields.items()}
        length = int(fields.get(b"content-length", b"0"))
        self.buffer = rest
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def heartbeat_request(port: int, node_id: str, token: str) -> bytes:
    body = json.dumps({"available_vram": 6 * 2**30}).encode()
    return (
        f"POST /api/node/{node_id}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def load(port: int, nodes: list[tuple[str, str]], clients: int, seconds: float) -> tuple[int, int, list[float]]:
    counts, errors, latencies = [0] * clients, [0] * clients, [[] for _ in range(clients)]
    requests = [heartbeat_request(port, node_id, token) for node_id, token in nodes]
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        mine = requests[index::clients]
        connection = Connection(port)
        i = 0
        while time.monotonic() < deadline:
            request = mine[i % len(mine)]
            i += 1
            started = time.perf_counter()
            try:
                status, body = connection.exchange(request)
                ok = status == 200 and body.startswith(b'{"status":')
            except (OSError, ValueError, IndexError):
                ok = False
                connection.close()
            latencies[index].append(time.perf_counter() - started)
            counts[index] += ok
            errors[index] += not ok
        connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), sum(errors), sorted(x for lat in latencies for x in lat)


def warm(port: int, nodes: list[tuple[str, str]], clients: int) -> None:
    """One heartbeat per node before the timed run, as every node of a running fleet has sent
    one: the web process's token cache then knows each node (``registry/heartbeat_cache.py``)
    and the timed run measures steady heartbeats, coalesced, not first ones."""
    requests = [heartbeat_request(port, node_id, token) for node_id, token in nodes]

    def run(index: int) -> None:
        connection = Connection(port)
        for request in requests[index::clients]:
            try:
                connection.exchange(request)
            except (OSError, ValueError, IndexError):
                connection.close()
        connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def web_cpu_seconds(master: int) -> float:
    """CPU time (user + system) used so far by the gunicorn master's worker processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:  # ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def grow(nodes: list[tuple[str, str]], size: int) -> None:
    """Copy the first (registered) node's row until there are ``size`` nodes, each with its own
    id, name and node token."""
    from django.db import connection

    from core.tokens import hash_token
    from registry.models import Node

    missing = size - len(nodes)
    if missing <= 0:
        return
    new = [(str(uuid.uuid4()), f"cpn_bench_{uuid.uuid4().hex}") for _ in range(missing)]
    names = [f"hb-{len(nodes) + i:06d}" for i in range(missing)]
    meta = Node._meta
    replaced = {"id": "u.id", "name": "u.name", "token_hash": "u.token_hash"}
    columns = [field.column for field in meta.concrete_fields]
    select = ", ".join(replaced.get(column, f"n.{connection.ops.quote_name(column)}") for column in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {meta.db_table} ({', '.join(connection.ops.quote_name(c) for c in columns)}) "
            f"SELECT {select} FROM {meta.db_table} n, "
            "unnest(%s::uuid[], %s::text[], %s::text[]) AS u(id, name, token_hash) WHERE n.id = %s",
            [[i for i, _ in new], names, [hash_token(t) for _, t in new], nodes[0][0]],
        )
        cursor.execute("TRUNCATE bench_ids")
        nodes.extend(new)
        cursor.execute(
            "INSERT INTO bench_ids SELECT row_number() OVER (ORDER BY name), id, token_hash FROM registry_node"
        )
        cursor.execute("ANALYZE registry_node")
        cursor.execute("ANALYZE bench_ids")


def pgbench(script: str, size: int, clients: int, seconds: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script.replace(":size", str(size)))
    url = urlparse(DB_URL)
    result = subprocess.run(
        ["pgbench", "-n", "-f", handle.name, "-T", str(seconds), "-c", str(clients)]
        + ["-h", url.hostname, "-p", str(url.port or 5432), "-U", url.username or "postgres", DBNAME],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(handle.name)
    return float(re.search(r"tps = ([0-9.]+)", result.stdout).group(1))


def start_web(env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "controlplane/gunicorn.conf.py"]  # as make run starts it
        + ["--bind", f"127.0.0.1:{port}", "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
                probe.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if probe.recv(64).startswith(b"HTTP/1.1 200"):
                    return web, port
        except OSError:
            pass
        if time.monotonic() > deadline or web.poll() is not None:
            web.kill()
            raise RuntimeError("the web process did not start")
        time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 s per measurement (the whole run under a minute)")
    parser.add_argument("--sizes", default="100,1000,10000", help="registered nodes, comma-separated")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat interval for the capacity figure")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    seconds = 3 if args.quick else args.seconds
    sizes = sorted(int(size) for size in args.sizes.split(","))
    headline = min(sizes, key=lambda size: abs(size - HEADLINE))
    load_avg = os.getloadavg()
    started = time.monotonic()

    with admin() as connection:
        connection.execute(f'CREATE DATABASE "{DBNAME}"')
    web = None
    rows = []
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO, check=True)
        import django

        django.setup()
        from django.db import connection as dj
        from django.test.utils import CaptureQueriesContext

        from core.tokens import hash_token
        from registry.models import Node

        registration = Node.objects.register(
            name="hb-000000", address="127.0.0.1:40000", total_vram=8 * 2**30, max_replicas_per_model=1
        )
        nodes = [(str(registration.node.pk), registration.node_token)]
        with CaptureQueriesContext(dj) as captured:
            Node.objects.heartbeat_with_token(nodes[0][0], hash_token(nodes[0][1]), available_vram=6 * 2**30)
        update_sql = captured.captured_queries[-1]["sql"]
        assert update_sql.startswith("UPDATE"), update_sql
        with dj.cursor() as cursor:
            cursor.execute("CREATE TABLE bench_ids (i int PRIMARY KEY, id uuid NOT NULL, token_hash text NOT NULL)")
        # the same UPDATE in pgbench: the literal id and token hash become lookups of a random node
        literal = re.sub(r"'[0-9a-f]{32}'|'[0-9a-f-]{36}'", "(SELECT id FROM bench_ids WHERE i = :i)", update_sql)
        literal = re.sub(r"'[0-9a-f]{64}'", "(SELECT token_hash FROM bench_ids WHERE i = :i)", literal)
        script = f"\\set i random(1, :size)\n{literal};\n"

        env = {**os.environ, "CONTROLPLANE_VAR_DIR": tempfile.mkdtemp(prefix="bench-hb-")}
        for name in ("DATABASE_CONN_MAX_AGE", "WEB_WORKERS", "WEB_THREADS", "WEB_KEEPALIVE"):
            env.pop(name, None)  # the shipped defaults
        web, port = start_web(env)
        for size in sizes:
            grow(nodes, size)
            dj.close()
            warm(port, nodes[:size], args.clients)
            load(port, nodes[:size], args.clients, 0.5 if args.quick else 1)  # warm-up
            cpu = web_cpu_seconds(web.pid)
            ok, errors, lat = load(port, nodes[:size], args.clients, seconds)
            cpu = web_cpu_seconds(web.pid) - cpu
            tps = pgbench(script, size, args.clients, int(seconds))
            p50, p99 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000
            rows.append((size, tps, ok / seconds, errors, p50, p99, cpu / max(ok, 1) * 1e6))
        web.terminate()
        web.wait(30)
        web = None
    finally:
        if web is not None:
            web.kill()
        with admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')

    shipped = runpy.run_path(str(REPO / "controlplane" / "gunicorn.conf.py"))
    workers, threads = shipped["workers"], shipped["threads"]
    table = "\n".join(
        f"| {size:,} | {tps:,.0f} | {rps:,.0f} | {p50:.1f} | {p99:.1f} | {cpu_us:,.0f} | {errors} | **{tps / rps:.2f}x** |"
        for size, tps, rps, errors, p50, p99, cpu_us in rows
    )
    head = next(row for row in rows if row[0] == headline)
    ratio = head[1] / head[2]
    command = "--quick" if args.quick else f"--seconds {args.seconds:g}"
    section = f"""
## Heartbeat ingestion

`.venv/bin/python bench/bench_heartbeat.py {command} --sizes {args.sizes} --clients {args.clients}`
on CPython {platform.python_version()}, local PostgreSQL, {os.cpu_count()} shared CPUs (load average
{load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f} over 1 / 5 / 15 min at the start; the load generator, gunicorn
and PostgreSQL share them). The web process as `make run` starts it: gunicorn {workers} workers x {threads} threads,
keep-alive, persistent health-checked database connections, coalesced heartbeats (acknowledged into the
process's buffer, written every 0.2 s by one `UPDATE ... FROM (VALUES ...)`). Every node heartbeats
once before each timed run (steady state). {seconds:g} s per measurement, {args.clients}
clients on both sides; the run took {time.monotonic() - started:.0f} s.

| registered nodes | pgbench tps (the verb's UPDATE) | API heartbeats/s | API p50 ms | API p99 ms | web CPU µs / heartbeat | errors | pgbench / API |
|---:|---:|---:|---:|---:|---:|---:|---:|
{table}

"web CPU µs / heartbeat" is the CPU time (user + system) of gunicorn's worker processes during
the timed run divided by the heartbeats answered: the web tier's own cost, whatever else the
machine runs. At {headline:,} nodes, **pgbench / API = {ratio:.2f}x** (goal: within 2x). At one heartbeat every
{args.interval:g} s the web process as measured ingests heartbeats for about **{head[2] * args.interval:,.0f}
nodes** ({head[1] * args.interval:,.0f} if the web tier cost nothing); more web processes behind a load
balancer scale the web tier. pgbench runs one single-row UPDATE per heartbeat, the cost every
heartbeat had before coalescing; the web process now writes many nodes per statement, so
PostgreSQL is no longer what bounds heartbeat ingestion, the web tier's CPU is.

The pgbench script is the verb's UPDATE as Django sends it, with the node id and its token hash
chosen at random among the registered nodes by a primary-key lookup in a side table:

```sql
{literal};
```
"""
    print(section)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write(section)
    print(f"RATIO heartbeat: {ratio:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
