"""Warm-route benchmark: what a frontend pays per request (``cpclient`` route + release over
HTTP to gunicorn started exactly as ``make run`` starts it) against the raw SQL of a warm pick
and its release, both measured in the same run on the local PostgreSQL.

    .venv/bin/python bench/bench_route.py [--quick] [--iterations 1000] [--write]

What is timed, one request at a time, from this process:

* ``baseline``: raw pick + release with psycopg on one kept connection: ``BEGIN; SELECT id ...
  ORDER BY in_flight, last_used LIMIT 1 FOR UPDATE SKIP LOCKED; UPDATE ... in_flight + 1;
  COMMIT`` then ``BEGIN; UPDATE ... in_flight - 1; COMMIT``: the least a warm pick and its
  release can cost (no lease row, no authentication, no HTTP).
* ``route``: ``ControlPlaneClient.lease(model)`` (``POST /api/v1/models/{model}/route``, then
  ``POST /api/v1/leases/{id}/release`` on exit) over loopback HTTP, one kept connection, to
  ``gunicorn -c controlplane/gunicorn.conf.py --workers 2 --access-logfile - --log-level warning``
  (``scripts/run``'s command line, its defaults: gthread workers, persistent database
  connections, the Prometheus multiprocess directory), with a frontend API key.

The two are measured in alternating blocks, so a change of the machine's load hits both. The
headline is the ratio of the medians (``RATIO route: ...``, the last line printed; the means are
reported too). Growth: the same pair with 1 / 10 / 100 replicas of the routed model, then with
1 / 100 / 1,000 models (one replica each, routing to a random one): the cost per route should
not grow with the fleet. The nodes heartbeat (a thread of this process, every 5 s) so that the
router's 30 s probe cache holds, as in a live fleet; a fake gRPC backend answers the Health
probes made when it does not.

A throw-away database ``test_<name>`` is created (migrations applied) and dropped afterwards;
``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/controlplane_bench``) names
the server. ``--quick`` (under 60 s) is what ``make bench`` runs; ``--write`` replaces the "Warm
route" section of ``bench/RESULTS.md``; ``--profile`` prints a cProfile of route + release
through the WSGI application gunicorn serves, in this process (where the web tier's time goes).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
from django.db import close_old_connections, connection  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402

from proto import backend_pb2  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"

from results_file import replace_section  # noqa: E402  (bench/ is the script's directory)

PROFILE_NOTE = (
    "Where the time goes (`--profile 200`: cProfile of route + release through the WSGI application "
    "gunicorn serves, in one process, no socket): an ordinary warm route and its release are "
    "answered by the lean path (`registry/api/lean_route.py`) below Django's request cycle, so "
    "nearly all of it waits on PostgreSQL (the two statements); URL resolution, the API-key cache, "
    "the JSON body and the answer's rendering are a small part (about 35 µs of CPU per request, "
    "timed one by one). What remains per route + release beyond the raw baseline is two HTTP "
    "requests over one kept connection (`cpclient` keeps one per thread and speaks HTTP/1.1 on the "
    "socket itself, `proto/keepalive.py`): gunicorn's own handling of each request (parsing, the "
    "thread hand-off, the access log) and the client's. The machine's load matters to the ratio: a loaded machine "
    "stretches every database round trip and commit (the baseline is seven statements and two "
    "commits) more than the route's CPU work; the CPU times per call above depend on it far "
    "less (contention for the cores still inflates them)."
)

MODEL = "llama"
GOAL = 3.0


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


class Fleet:
    """Nodes (registered through the verb), replica rows reported as a frontend reports them,
    and a thread heartbeating every node every 5 s."""

    def __init__(self, backend_address: str, nodes: int):
        from registry.models import Node

        self.backend_address = backend_address
        self.nodes = [
            Node.objects.register(
                name=f"bench-{index}", address=f"127.0.0.1:{40000 + index}", max_replicas_per_model=1000
            ).node
            for index in range(nodes)
        ]
        self.replicas: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _heartbeat(self):
        from registry.models import Node

        while not self._stop.wait(5.0):
            for node in self.nodes:
                Node.objects.heartbeat(node.pk)
        close_old_connections()
        connection.close()

    def grow(self, model: str, replicas: int) -> None:
        """Up to ``replicas`` loaded replicas of ``model``, one per node (then more per node)."""
        from registry.models import NodeModel

        now = timezone.now()
        for index in range(self.replicas.get(model, 0), replicas):
            NodeModel.objects.record_loaded(
                self.nodes[index % len(self.nodes)].pk,
                model,
                index // len(self.nodes),
                address=self.backend_address,
                backend_type="llama-cpp",
                opts_blob=b"\x0a" + bytes([len(model)]) + model.encode(),
                now=now,
            )
        self.replicas[model] = max(replicas, self.replicas.get(model, 0))

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def _baseline_step(raw, model: str):
    with raw.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(
            "SELECT id FROM registry_nodemodel WHERE model_name = %s AND state = 'loaded' "
            "ORDER BY in_flight, last_used NULLS FIRST, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            [model],
        )
        replica_id = cursor.fetchone()[0]
        cursor.execute(
            "UPDATE registry_nodemodel SET in_flight = in_flight + 1, last_used = now() WHERE id = %s", [replica_id]
        )
        cursor.execute("COMMIT")
        cursor.execute("BEGIN")
        cursor.execute(
            "UPDATE registry_nodemodel SET in_flight = in_flight - 1 WHERE id = %s AND in_flight > 0", [replica_id]
        )
        cursor.execute("COMMIT")


def _summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "mean_ms": statistics.fmean(samples) * 1000,
        "p50_ms": samples[len(samples) // 2] * 1000,
        "p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)] * 1000,
        "per_s": len(samples) / sum(samples),
    }


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and its descendants so far (Linux /proc):
    the web tier's cost, robust to the machine's load, unlike wall-clock milliseconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # gone meanwhile, or no /proc: counted as nothing
    return total


def measure(route_step, baseline_step, iterations: int, block: int = 25, server_pid: int | None = None):
    """Both steps in alternating blocks of ``block`` iterations, after a short warm-up of each.
    Adds CPU seconds per iteration: this process's during each step's blocks (``cpu_ms``) and,
    with ``server_pid``, the web processes' over the timed loop (``server_cpu_ms``; the
    baseline blocks do not call them)."""
    for _ in range(min(50, max(5, iterations // 4))):
        baseline_step()
        route_step()
    timings = {"baseline": [], "route": []}
    cpu = {"baseline": 0.0, "route": 0.0}
    server_before = _tree_cpu_seconds(server_pid) if server_pid else 0.0
    done = 0
    while done < iterations:
        count = min(block, iterations - done)
        for name, step in (("baseline", baseline_step), ("route", route_step)):
            cpu_started = time.process_time()
            for _ in range(count):
                started = time.perf_counter()
                step()
                timings[name].append(time.perf_counter() - started)
            cpu[name] += time.process_time() - cpu_started
        done += count
    base, routed = _summary(timings["baseline"]), _summary(timings["route"])
    base["cpu_ms"] = cpu["baseline"] / iterations * 1000
    routed["cpu_ms"] = cpu["route"] / iterations * 1000
    if server_pid:
        routed["server_cpu_ms"] = (_tree_cpu_seconds(server_pid) - server_before) / iterations * 1000
    return base, routed


def start_web(var_dir: str) -> tuple[subprocess.Popen, int]:
    """gunicorn as ``scripts/run`` starts it (its command line and environment defaults)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = connection.settings_dict
    prometheus = Path(var_dir) / "prometheus"
    prometheus.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT'] or 5432}/{database['NAME']}",
        "CONTROLPLANE_VAR_DIR": var_dir,
        "PROMETHEUS_MULTIPROC_DIR": str(prometheus),
    }
    for name in ("DATABASE_CONN_MAX_AGE", "WEB_THREADS", "WEB_KEEPALIVE", "CONTROLPLANE_API_KEY_CACHE_SECONDS"):
        env.pop(name, None)  # the shipped defaults, whatever this shell has set
    command = [
        sys.executable, "-m", "gunicorn", "-c", "controlplane/gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}", "--workers", os.environ.get("WEB_WORKERS", "2"),
        "--access-logfile", "-", "--log-level", "warning",
    ]  # fmt: skip
    web = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return web, port


def _client(port: int, api_key: str):
    from cpclient import ControlPlaneClient

    frontend = ControlPlaneClient(f"http://127.0.0.1:{port}", api_key, timeout=10)
    deadline = time.monotonic() + 60
    while True:
        try:
            frontend.get_model(MODEL)
            return frontend
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(iterations: int, growth_iterations: int, replica_steps, model_steps) -> dict:
    from core.models import ApiKey
    from registry.models import Lease, NodeModel

    server, backend_address = _health_server()
    fleet = Fleet(backend_address, max(max(replica_steps), 10))
    api_key = ApiKey.objects.create_key("bench", ApiKey.Role.FRONTEND)[1]
    connection.ensure_connection()
    raw = connection.connection  # psycopg; Django's connection is in autocommit mode
    fleet.grow(MODEL, 4)  # the headline: one model, 4 replicas
    var_dir = tempfile.mkdtemp(prefix="bench-route-")
    web, port = start_web(var_dir)
    try:
        frontend = _client(port, api_key)

        def route_step(model=MODEL):
            with frontend.lease(model):
                pass

        headline = measure(route_step, lambda: _baseline_step(raw, MODEL), iterations, server_pid=web.pid)

        growth = []
        for replicas in replica_steps:
            fleet.grow(MODEL, replicas)
            base, routed = measure(route_step, lambda: _baseline_step(raw, MODEL), growth_iterations)
            growth.append((f"{replicas} replica(s) of one model", base, routed))
        names: list[str] = []  # models of one replica each (MODEL has the replica rows' replicas by now)
        for models in model_steps:
            while len(names) < models:
                names.append(f"model-{len(names)}")
                fleet.grow(names[-1], 1)
            chosen = []

            def random_route(names=names, chosen=chosen):
                chosen.append(random.choice(names))
                route_step(chosen[-1])

            def random_baseline(names=names):
                _baseline_step(raw, random.choice(names))

            base, routed = measure(random_route, random_baseline, growth_iterations)
            growth.append((f"{models} model(s), one replica each, a random one routed", base, routed))
        live = Lease.objects.live().count()
        in_flight = sum(NodeModel.objects.values_list("in_flight", flat=True))
    finally:
        web.terminate()
        try:
            web.wait(15)
        except subprocess.TimeoutExpired:
            web.kill()
        fleet.stop()
        server.stop(grace=None)
    return {"headline": headline, "growth": growth, "live_leases": live, "in_flight": in_flight}


def profile(iterations: int) -> str:
    """cProfile of route + release through the served WSGI application in this process."""
    import cProfile
    import io
    import json
    import pstats

    from django.core.wsgi import get_wsgi_application

    from controlplane.httpserver import served_application
    from core.models import ApiKey

    server, backend_address = _health_server()
    fleet = Fleet(backend_address, 4)
    fleet.grow(MODEL, 4)
    application = served_application(get_wsgi_application())  # what controlplane.wsgi serves
    headers = {
        "HTTP_AUTHORIZATION": f"Bearer {ApiKey.objects.create_key('prof', 'frontend')[1]}",
        "HTTP_ACCEPT": "application/json, application/problem+json",
        "HTTP_HOST": "127.0.0.1",
    }

    def post(path: str, body: bytes) -> bytes:
        environ = {
            **headers,
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json" if body else "",
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
        }
        chunks = application(environ, lambda status, response_headers, exc_info=None: None)
        content = b"".join(chunks)
        if hasattr(chunks, "close"):
            chunks.close()
        return content

    def step():
        lease = json.loads(post(f"/api/v1/models/{MODEL}/route", b'{"wait_seconds": 30.0}'))["lease_id"]
        post(f"/api/v1/leases/{lease}/release", b"")

    for _ in range(50):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iterations):
        step()
    profiler.disable()
    fleet.stop()
    server.stop(grace=None)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "cumulative")).print_stats(40)
    return out.getvalue()


def _row(label: str, base: dict, routed: dict) -> str:
    return (
        f"| {label} | {base['p50_ms']:.2f} | {base['mean_ms']:.2f} | {routed['p50_ms']:.2f} | "
        f"{routed['mean_ms']:.2f} | {routed['p99_ms']:.2f} | {routed['p50_ms'] / base['p50_ms']:.1f}x |"
    )


def report(result: dict, args, server_version: str, load: float, command: str) -> tuple[str, float]:
    base, routed = result["headline"]
    ratio = routed["p50_ms"] / base["p50_ms"]
    lines = [
        "## Warm route",
        "",
        f"`{command}` on {platform.python_implementation()} {platform.python_version()}, PostgreSQL "
        f"{server_version} (local, 127.0.0.1), {os.cpu_count()} CPUs, **load average {load:.2f} at the start** "
        "(a shared machine: compare the ratios, not the milliseconds). One request at a time; the "
        "baseline and the route alternate in blocks of 25.",
        "",
        "| what | p50 ms | mean ms | p99 ms | per second |",
        "|---|---:|---:|---:|---:|",
        f"| baseline: raw SQL pick + release (psycopg, 2 transactions) | {base['p50_ms']:.2f} | {base['mean_ms']:.2f} | "
        f"{base['p99_ms']:.2f} | {base['per_s']:.0f} |",
        f"| cpclient route + release over HTTP (gunicorn as `make run` starts it) | {routed['p50_ms']:.2f} | "
        f"{routed['mean_ms']:.2f} | {routed['p99_ms']:.2f} | {routed['per_s']:.0f} |",
        "",
        f"**route + release / raw pick + release = {ratio:.1f}x** (medians; means: "
        f"{routed['mean_ms'] / base['mean_ms']:.1f}x), goal <= {GOAL:.0f}x. After the run: "
        f"{result['live_leases']} live leases, in-flight sum {result['in_flight']}.",
        "",
        f"CPU per route + release (robust to the machine's load): **client {routed['cpu_ms']:.2f} ms, "
        f"web processes {routed.get('server_cpu_ms', 0.0):.2f} ms**; the baseline's client "
        f"{base['cpu_ms']:.2f} ms.",
        "",
        "Growth (each row: baseline and route alternating, "
        f"{args.growth_iterations} iterations each; the ratio is of the medians):",
        "",
        "| fleet | baseline p50 ms | baseline mean ms | route p50 ms | route mean ms | route p99 ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(_row(label, b, r) for label, b, r in result["growth"]),
        "",
        "Per call the database sees: route, one statement (`WITH pick AS (SELECT ... FOR UPDATE OF r "
        "SKIP LOCKED), bumped AS (UPDATE ... in_flight + 1 RETURNING ...), granted AS (INSERT lease) "
        "SELECT ...`, the model's node selector evaluated inside it); release, one statement (`WITH "
        "released AS (UPDATE lease ... WHERE released_at IS NULL RETURNING replica_id) UPDATE ... "
        "in_flight - 1`); both prepared (parsed and planned once per connection, `core/statements.py`: "
        "planning was 0.25 ms of the grant and 0.1 ms of the release on every call before) and committed "
        "asynchronously (`CONTROLPLANE_LEASE_SYNCHRONOUS_COMMIT`, default off); no health check before them "
        "(the lean path takes a kept connection whose socket has nothing to read as alive, and the statement "
        "is the check). API keys are answered from each web process's memory (re-read every 5 s, "
        "`last_used` written at most once a minute), the node's name from a per-process cache. The "
        "baseline's seven statements are neither prepared nor asynchronous (each of its two commits waits "
        "for the WAL flush).",
        "",
        PROFILE_NOTE,
        "",
    ]
    return "\n".join(lines), ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 60 s), as make bench runs it")
    parser.add_argument("--iterations", type=int, default=None, help="headline iterations (default 1000, quick 150)")
    parser.add_argument("--growth-iterations", type=int, default=None, help="per growth row (default 300, quick 40)")
    parser.add_argument("--replicas", default="1,10,100", help="growth: replicas of one model (comma-separated)")
    parser.add_argument("--models", default="1,100,1000", help="growth: models with one replica each")
    parser.add_argument("--write", action="store_true", help="update the Warm route section of bench/RESULTS.md")
    parser.add_argument("--profile", type=int, metavar="N", help="print a cProfile of N route + release calls")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        parser.error("this benchmark needs PostgreSQL (BENCH_DATABASE_URL)")
    args.iterations = args.iterations or (150 if args.quick else 1000)
    args.growth_iterations = args.growth_iterations or (40 if args.quick else 300)
    replica_steps = [int(n) for n in args.replicas.split(",") if n]
    model_steps = [int(n) for n in args.models.split(",") if n]

    load = os.getloadavg()[0]
    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        server_version = connection.cursor().connection.info.server_version
        version = f"{server_version // 10000}.{server_version % 10000}"
        if args.profile:
            print(profile(args.profile))
            return 0
        result = run(args.iterations, args.growth_iterations, replica_steps, model_steps)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    command = "bench/bench_route.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    section, ratio = report(result, args, version, load, command.strip())
    print(section)
    if args.write:
        replace_section("Warm route", section)
        print(f"wrote {RESULTS.relative_to(REPO)}")
    base, routed = result["headline"]
    print(
        f"CPU per route + release: client {routed['cpu_ms']:.2f} ms, web {routed.get('server_cpu_ms', 0.0):.2f} ms; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(f"RATIO route: {ratio:.1f}x (goal <= {GOAL:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
