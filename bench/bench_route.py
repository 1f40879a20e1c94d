"""Warm-route benchmark: a frontend's per-request cost (route + release through the API) against
the raw SQL of one warm pick, both on the local PostgreSQL.

    .venv/bin/python bench/bench_route.py [--iterations 2000] [--replicas 4] [--write]

What is timed, sequentially in one process (one request at a time, no network hop to the web
server: Django's test client calls the WSGI handler in-process):

* ``baseline``: ``BEGIN; SELECT id ... ORDER BY in_flight, last_used LIMIT 1 FOR UPDATE SKIP
  LOCKED; UPDATE ... SET in_flight = in_flight + 1; COMMIT`` with psycopg on Django's connection:
  the least a warm pick can cost.
* ``baseline pick + release``: the same plus the decrement transaction.
* ``router.route + release``: the Python API (warm pick + lease in one transaction, probe cache
  hit, lease release), no HTTP.
* ``API route + release``: ``POST /api/v1/models/llama/route`` and ``POST
  /api/v1/leases/{id}/release`` with an API key (auth, DRF, serializers, problem handler).
* ``cpclient ... over HTTP``: the same through the typed frontend client (``cpclient``) and a real
  gunicorn process on loopback.

A throw-away database ``test_<name>`` is created (migrations applied) and dropped afterwards;
``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/controlplane_bench``) names
the server. A fake gRPC backend answers the Health probes the warm path makes once its 30 s cache
expires. ``--write`` replaces the "Warm route" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["DATABASE_URL"] = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/controlplane_bench"
)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
os.environ.setdefault("CONTROLPLANE_REGISTRATION_TOKEN", "bench-registration-token")
os.environ.setdefault("CONTROLPLANE_LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

import grpc  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext, setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from proto import backend_pb2  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
MODEL = "llama"


def _health_server() -> tuple[grpc.Server, str]:
    handler = grpc.method_handlers_generic_handler(
        "backend.Backend",
        {
            "Health": grpc.unary_unary_rpc_method_handler(
                lambda request, context: backend_pb2.Reply(message=b"OK"),
                request_deserializer=backend_pb2.HealthMessage.FromString,
                response_serializer=backend_pb2.Reply.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _fleet(replicas: int, backend_address: str) -> str:
    """``replicas`` nodes with one loaded replica of MODEL each; returns a frontend API key."""
    from core.models import ApiKey
    from registry.models import Node, NodeModel

    now = timezone.now()
    for index in range(replicas):
        node = Node.objects.register(name=f"bench-{index}", address=f"127.0.0.1:{50000 + index}").node
        NodeModel.objects.create(
            node=node, model_name=MODEL, replica_index=0, address=backend_address, state="loaded", last_probe_at=now
        )
    return ApiKey.objects.create_key("bench", ApiKey.Role.FRONTEND)[1]


def _timed(label: str, iterations: int, step) -> dict:
    for _ in range(min(100, iterations)):  # warm-up: connections, caches, plans
        step()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "label": label,
        "mean_ms": statistics.fmean(samples) * 1000,
        "p50_ms": samples[len(samples) // 2] * 1000,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000,
        "per_s": len(samples) / sum(samples),
    }


def _baseline_pick(raw):
    with raw.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(
            "SELECT id FROM registry_nodemodel WHERE model_name = %s AND state = 'loaded' "
            "ORDER BY in_flight, last_used NULLS FIRST, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            [MODEL],
        )
        replica_id = cursor.fetchone()[0]
        cursor.execute(
            "UPDATE registry_nodemodel SET in_flight = in_flight + 1, last_used = now() WHERE id = %s", [replica_id]
        )
        cursor.execute("COMMIT")
    return replica_id


def _baseline_release(raw, replica_id):
    with raw.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(
            "UPDATE registry_nodemodel SET in_flight = in_flight - 1 WHERE id = %s AND in_flight > 0", [replica_id]
        )
        cursor.execute("COMMIT")


def run(iterations: int, replicas: int) -> tuple[list[dict], dict]:
    from registry import router
    from registry.models import Lease, NodeModel

    server, backend_address = _health_server()
    api_key = _fleet(replicas, backend_address)
    connection.ensure_connection()
    raw = connection.connection  # psycopg connection; Django is in autocommit mode

    results = [_timed("baseline: raw SQL warm pick", iterations, lambda: _baseline_pick(raw))]
    NodeModel.objects.update(in_flight=0)
    results.append(
        _timed("baseline: raw SQL pick + release", iterations, lambda: _baseline_release(raw, _baseline_pick(raw)))
    )

    def python_route():
        result = router.route(MODEL)
        Lease.objects.release(result.lease.pk)

    results.append(_timed("router.route + Lease release (no HTTP)", iterations, python_route))

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")

    def api_route():
        response = client.post(f"/api/v1/models/{MODEL}/route", {}, format="json")
        assert response.status_code == 200, response.content
        released = client.post(f"/api/v1/leases/{response.json()['lease_id']}/release")
        assert released.status_code == 200, released.content

    results.append(_timed("API route + release (test client)", iterations, api_route))

    with CaptureQueriesContext(connection) as route_queries:
        response = client.post(f"/api/v1/models/{MODEL}/route", {}, format="json")
    with CaptureQueriesContext(connection) as release_queries:
        client.post(f"/api/v1/leases/{response.json()['lease_id']}/release")
    http_step, stop_web = _http_route(api_key)
    try:
        results.append(_timed("cpclient route + release over HTTP (gunicorn, 1 worker)", iterations, http_step))
    finally:
        stop_web()
    leftover = sum(NodeModel.objects.values_list("in_flight", flat=True))
    server.stop(grace=None)
    return results, {
        "route_queries": len(route_queries),
        "release_queries": len(release_queries),
        "in_flight_after": leftover,
    }


def _http_route(api_key: str):
    """A real frontend's path: the typed client over a socket to gunicorn (one sync worker,
    persistent database connections as production should run) on this run's database.
    Returns ``(step, stop)``."""
    import socket
    import subprocess

    from cpclient import ControlPlaneClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT'] or 5432}/{database['NAME']}",
        "DATABASE_CONN_MAX_AGE": "60",
    }
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "controlplane.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    frontend = ControlPlaneClient(f"http://127.0.0.1:{port}", api_key, timeout=10)
    deadline = time.monotonic() + 30
    while True:
        try:
            frontend.get_model(MODEL)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    def step():
        with frontend.lease(MODEL):
            pass

    def stop():
        web.terminate()
        web.wait(15)

    return step, stop


def _report(results, extra, iterations, replicas, server_version, load) -> str:
    baseline = results[0]["mean_ms"]
    api = results[3]["mean_ms"]
    http = results[4]["mean_ms"]
    lines = [
        "## Warm route",
        "",
        f"`bench/bench_route.py --iterations {iterations} --replicas {replicas}` on "
        f"{platform.python_implementation()} {platform.python_version()}, PostgreSQL {server_version} "
        "(local, 127.0.0.1), one process, one request at a time, "
        f"{replicas} loaded replicas of one model on {replicas} healthy nodes; "
        f"{iterations} timed iterations after 100 warm-up ones. Machine: {os.cpu_count()} CPUs, load "
        f"average {load:.2f} at the start (a shared machine: expect +-30 % from run to run; compare the "
        "ratios, not the milliseconds).",
        "",
        "| what | mean ms | p50 ms | p99 ms | per second |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['label']} | {row['mean_ms']:.3f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['per_s']:.0f} |"
        )
    lines += [
        "",
        f"**API route + release / raw warm pick = {api / baseline:.1f}x** "
        f"(API route + release / raw pick + release = {api / results[1]['mean_ms']:.1f}x). "
        f"Through a real socket with the typed client: **cpclient over HTTP / raw warm pick = "
        f"{http / baseline:.1f}x**.",
        "",
        f"Statements per API call: route {extra['route_queries']} (API-key lookup and its last-used "
        "update, scheduling config, then `BEGIN`, savepoint, `SELECT ... FOR UPDATE SKIP LOCKED`, "
        "`UPDATE in_flight`, release savepoint, lease `INSERT`, `COMMIT`; the node name comes from a "
        f"per-process cache), release {extra['release_queries']} (API key x2, lease read, `BEGIN`, "
        "lease `UPDATE`, `in_flight` decrement, `COMMIT`). In-flight sum after the run: "
        f"{extra['in_flight_after']} (every lease was released).",
        "",
        "Method: the baseline is the SQL a warm pick cannot avoid (`BEGIN; SELECT id ... ORDER BY "
        "in_flight, last_used LIMIT 1 FOR UPDATE SKIP LOCKED; UPDATE ... in_flight + 1; COMMIT`) sent "
        "with psycopg on the same connection. The router rows add the lease row (so in-flight always "
        "equals live leases), the 30 s probe cache check (a Health probe against an in-process fake "
        "backend when it expires) and the release; the API rows add API-key authentication, DRF "
        "parsing/validation/rendering and the problem handler, called in-process through Django's test "
        "client (no socket, no WSGI server). The last row is what a frontend sees: `cpclient`'s "
        "`lease()` context manager (route, then release on exit) over loopback HTTP to gunicorn with "
        "one worker and persistent database connections. A throw-away database is created and dropped "
        "per run.",
        "",
        "Where the router's time goes (cProfile of the no-HTTP row): almost all of it waits on "
        "PostgreSQL round trips (about ten statements per route + release, two of them commits that "
        "flush WAL: the in-flight increment with its lease row, and the release with its decrement), "
        "not in Python. The raw baseline makes four statements and one commit per pick.",
        "",
    ]
    return "\n".join(lines)


def _write(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(r"^## Warm route\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="update the Warm route section of bench/RESULTS.md")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        parser.error("this benchmark needs PostgreSQL (BENCH_DATABASE_URL)")

    load = os.getloadavg()[0]
    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        server_version = connection.cursor().connection.info.server_version
        version = f"{server_version // 10000}.{server_version % 10000}"
        results, extra = run(args.iterations, args.replicas)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    section = _report(results, extra, args.iterations, args.replicas, version, load)
    print(section)
    if args.write:
        _write(section)
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
