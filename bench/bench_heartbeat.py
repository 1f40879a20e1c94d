"""Heartbeat ingestion: ``POST /api/node/{id}/heartbeat`` through gunicorn against pgbench
running the UPDATE that verb sends, both on the local PostgreSQL, in the same run.

    .venv/bin/python bench/bench_heartbeat.py [--nodes 200] [--seconds 15] [--clients 4] [--web-workers 2]

* API: a throw-away database (migrated), ``--nodes`` nodes registered through the registry verb
  (each with its own node token), ``gunicorn -c controlplane/gunicorn.conf.py --workers 2`` (the shipped configuration: threaded workers, keep-alive) on loopback, and a
  bounded load generator: ``--clients`` threads, each with an ``http.client`` connection
  (re-opened whenever the server closes it), each posting heartbeats for its own share
  of the nodes, back to back, for ``--seconds`` s.
* baseline: ``pgbench -n -T SECONDS -c CLIENTS -f script`` where the script is the exact UPDATE
  the heartbeat sends (``Node.objects.heartbeat_with_token``, captured from Django: the token
  check is part of it), with the node id and its token hash picked at random through a small
  table (``bench_ids``, an index lookup like the verb's ``WHERE id = ...``).

Prints a Markdown section; ``--write`` appends it to ``bench/RESULTS.md``. The database is
dropped afterwards. ``BENCH_DATABASE_URL`` names the server (default
``postgres://postgres@127.0.0.1:5432/controlplane_bench``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
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


def admin():
    url = urlparse(SERVER)
    return psycopg.connect(
        host=url.hostname, port=url.port or 5432, user=url.username or "postgres", dbname="postgres", autocommit=True
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(port: int, nodes: list[tuple[str, str]], clients: int, seconds: float) -> tuple[int, int, list[float]]:
    counts, errors, latencies = [0] * clients, [0] * clients, [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds
    body = json.dumps({"available_vram": 6 * 2**30}).encode()

    def run(index: int) -> None:
        mine = nodes[index::clients]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        i = 0
        while time.monotonic() < deadline:
            node_id, token = mine[i % len(mine)]
            i += 1
            started = time.perf_counter()
            try:
                connection.request(
                    "POST",
                    f"/api/node/{node_id}/heartbeat",
                    body,
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
            latencies[index].append(time.perf_counter() - started)
            counts[index] += ok
            errors[index] += not ok

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), sum(errors), sorted(x for lat in latencies for x in lat)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat interval for the capacity figure")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    with admin() as connection:
        connection.execute(f'CREATE DATABASE "{DBNAME}"')
    web = None
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO, check=True)
        import django

        django.setup()
        from django.db import connection as dj
        from django.test.utils import CaptureQueriesContext

        from registry.models import Node

        nodes = []
        for i in range(args.nodes):
            registration = Node.objects.register(
                name=f"hb-{i:05d}", address=f"127.0.0.1:{40000 + i}", total_vram=8 * 2**30, max_replicas_per_model=1
            )
            nodes.append((str(registration.node.pk), registration.node_token))
        from core.tokens import hash_token

        with CaptureQueriesContext(dj) as captured:
            Node.objects.heartbeat_with_token(nodes[0][0], hash_token(nodes[0][1]), available_vram=6 * 2**30)
        update_sql = captured.captured_queries[-1]["sql"]
        assert update_sql.startswith("UPDATE"), update_sql
        # the API's statements for one heartbeat (auth + verb), through the test client
        from django.test import Client

        with CaptureQueriesContext(dj) as api_captured:
            reply = Client().post(
                f"/api/node/{nodes[0][0]}/heartbeat",
                {"available_vram": 6 * 2**30},
                content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {nodes[0][1]}",
            )
        assert reply.status_code == 200, reply.content
        api_statements = [q["sql"].split()[0] for q in api_captured.captured_queries]
        with dj.cursor() as cursor:
            cursor.execute("CREATE TABLE bench_ids (i int PRIMARY KEY, id uuid NOT NULL, token_hash text NOT NULL)")
            cursor.execute(
                "INSERT INTO bench_ids SELECT row_number() OVER (ORDER BY name), id, token_hash FROM registry_node"
            )
        dj.close()

        load_avg = os.getloadavg()[0]
        api = {}
        for max_age in ("default", "0"):  # as shipped (persistent connections), then one per request
            port = free_port()
            env = {**os.environ, "CONTROLPLANE_VAR_DIR": tempfile.mkdtemp(prefix="bench-hb-")}
            env.pop("DATABASE_CONN_MAX_AGE", None)
            if max_age != "default":
                env["DATABASE_CONN_MAX_AGE"] = max_age
            web = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "controlplane/gunicorn.conf.py",  # the shipped server configuration
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    str(args.web_workers),
                    "--log-level",
                    "warning",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 60
            while True:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/livez")
                    c.getresponse().read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            load(port, nodes, args.clients, 2)  # warm-up
            ok, errors, lat = load(port, nodes, args.clients, args.seconds)
            api[max_age] = (ok / args.seconds, errors, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000)
            web.terminate()
            web.wait(30)
            web = None

        # the same UPDATE in pgbench: Django's %s placeholders become pgbench variables
        literal = re.sub(r"'[0-9a-f]{32}'|'[0-9a-f-]{36}'", "(SELECT id FROM bench_ids WHERE i = :i)", update_sql)
        literal = re.sub(r"'[0-9a-f]{64}'", "(SELECT token_hash FROM bench_ids WHERE i = :i)", literal)
        script = f"\\set i random(1, {args.nodes})\n{literal};\n"
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
            handle.write(script)
        url = urlparse(DB_URL)
        result = subprocess.run(
            [
                "pgbench",
                "-n",
                "-f",
                handle.name,
                "-T",
                str(int(args.seconds)),
                "-c",
                str(args.clients),
                "-h",
                url.hostname,
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                DBNAME,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        pg_tps = float(re.search(r"tps = ([0-9.]+)", result.stdout).group(1))
    finally:
        if web is not None:
            web.kill()
        with admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')

    api_rps, errors, p50, p99 = api["default"]
    section = f"""
## Heartbeat ingestion

`.venv/bin/python bench/bench_heartbeat.py --nodes {args.nodes} --seconds {args.seconds:g} --clients {args.clients} --web-workers {args.web_workers}`
on CPython {platform.python_version()}, local PostgreSQL, {os.cpu_count()} shared CPUs (load average {load_avg:.2f} at the
start; the load generator, gunicorn and PostgreSQL share them).

| what | requests/s | p50 ms | p99 ms | errors |
|---|---:|---:|---:|---:|
| baseline: pgbench, the verb's UPDATE (`-c {args.clients} -T {int(args.seconds)}`) | {pg_tps:.0f} | | | |
| API: `POST /api/node/{{id}}/heartbeat` (as shipped: gunicorn {args.web_workers} workers x 8 threads, keep-alive; persistent, health-checked database connections) | {api_rps:.0f} | {p50:.1f} | {p99:.1f} | {errors} |
| API, the same with `DATABASE_CONN_MAX_AGE=0` (a database connection per request) | {api["0"][0]:.0f} | {api["0"][2]:.1f} | {api["0"][3]:.1f} | {api["0"][1]} |

**pgbench / API = {pg_tps / api_rps:.1f}x** (defaults; {pg_tps / api["0"][0]:.1f}x with a connection per request).
At one heartbeat every {args.interval:g} s, the API as measured ingests heartbeats for about
**{api_rps * args.interval:,.0f} nodes** with the defaults
({pg_tps * args.interval:,.0f} if the web tier cost nothing); more gunicorn workers or machines scale the web tier, PostgreSQL's single-row
UPDATE is the floor.

Method: {args.nodes} nodes registered through `Node.objects.register` (each with its own token);
{args.clients} load-generator threads, each posting heartbeats back to back for its own share of the
nodes over one kept-alive `http.client` connection (re-opened whenever the server closes it);
2 s warm-up,
then {args.seconds:g} s timed. Statements per API heartbeat: {len(api_statements)} ({", ".join(api_statements)}):
the verb's one conditional UPDATE, which checks the node token itself (no authenticating read).
The pgbench script is that UPDATE as Django sends it, with the node id and its token hash chosen
at random by a primary-key lookup in a side table:

```sql
{literal};
```
"""
    print(section)
    if args.write:
        with open(REPO / "bench" / "RESULTS.md", "a") as results:
            results.write(section)


if __name__ == "__main__":
    main()
