"""Scheduling throughput: replicas placed and loaded per second by the reconciler.

A fleet of 50 healthy nodes (80 GiB, 4 slots per model) and N models with ``min_replicas=1``
and stored load info (a 3 GiB ``vram_bytes`` hint, so VRAM admission is exercised and up to 26
replicas fit per node), no replica yet; the reconciler (``reconcile_once`` with the default
``RouterScheduler``: the pass claims every wanted slot through ``registry.bulk_loading.Batch``,
its loads run after the pass on the call's own load pool, and ``reconcile_once`` returns once
they are recorded; the default gRPC prober), with the settings ``make run`` ships
(``CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY`` 16), runs passes until every model has a loaded
replica: the time measured is to "every replica loaded". Counted: passes, wall time, replicas/s,
the CPU time of this process per replica (the reconciler's threads and the in-process fake gRPC
servers; not PostgreSQL's: robust to a loaded machine where wall times are not); for N = 10, 100 and 1,000 (the growth table: the cost per replica should stay
flat), each against its own baseline in the same run.

Workers and backends are **in-process fake gRPC servers** (the pattern of
``tests/router/conftest.py``), not reference worker processes: 50 worker agents and 1,000 echo
backend processes do not fit on the 2 shared cores this runs on, and would measure process
start-up, not scheduling. One Worker server listens on 50 ports (one per node; it tells the
nodes apart by the ``x-node-id`` metadata every worker call carries) and implements
StartBackend / StopBackend / ListBackends; StartBackend hands out one of 128 ports of one Backend
server whose ``LoadModel`` answers success at once (an "instant echo backend") and counts calls
(and how many ran at once). Every call is still a real gRPC call over loopback.

One more run shows the loads overlapping: 100 replicas whose ``LoadModel`` takes 50 ms (one at
a time would need at least 5 s), with the most ``LoadModel`` calls seen running at once.

Baseline, same run, per N: N raw ``INSERT`` (state ``loading``) + ``UPDATE`` (to ``loaded``)
statements of a replica row, each its own autocommit transaction, on one psycopg connection:
the database work a placement cannot avoid.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_schedule.py [--quick]

``--quick`` (under a minute): one run per N; without it, three runs per N and the median. The
last line is ``RATIO placements: <reconciler time / baseline time at 1,000 replicas>x (goal <=
7x)``. It creates and drops its own database (``cp_bench_<random>``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_reconcile import _drop_database, _setup_database  # noqa: E402

NODES = 50
TIERS = (10, 100, 1000)
RATIO_TIER = 1000  # the RATIO line: the largest tier, where a pass's fixed cost weighs least
BACKEND_PORTS = 128
SLOW_MODELS, SLOW_LOAD = 100, 0.05  # one extra run: backends whose LoadModel takes 50 ms
# a vram_bytes placement hint of 3 GiB on 80 GiB nodes: VRAM admission is exercised on every
# claim, and 1,000 replicas fit on 50 nodes (at most 26 per node)
VRAM_HINT = 3 * 1024**3


class FakeFleet:
    """One Worker server (a port per node) and one instant Backend server (a pool of ports)."""

    def __init__(self, nodes: int, backend_ports: int) -> None:
        import grpc

        from proto import backend_pb2, worker_pb2

        self.lock = threading.Lock()
        self.load_calls = 0
        self.loads_running = 0
        self.most_loads_at_once = 0
        self.load_delay = 0.0  # seconds each LoadModel takes (0: an instant backend)
        self.start_calls = 0
        self.backends: dict[str, dict[tuple[str, int], str]] = {}  # node id -> (model, index) -> address
        unary = grpc.unary_unary_rpc_method_handler

        def node_of(context) -> str:
            return dict(context.invocation_metadata()).get("x-node-id", "")

        def start(request, context):
            node = node_of(context)
            with self.lock:
                self.start_calls += 1
                mine = self.backends.setdefault(node, {})
                key = (request.model_name, request.replica_index)
                reused = key in mine
                if not reused:
                    mine[key] = self.backend_addresses[self.start_calls % len(self.backend_addresses)]
                return worker_pb2.StartBackendResponse(address=mine[key], reused=reused, pid=1)

        def stop(request, context):
            with self.lock:
                gone = self.backends.get(node_of(context), {}).pop((request.model_name, request.replica_index), None)
            return worker_pb2.StopBackendResponse(stopped=gone is not None)

        def listing(request, context):
            node = node_of(context)
            with self.lock:
                items = list(self.backends.get(node, {}).items())
            return worker_pb2.ListBackendsResponse(
                node_id=node,
                backends=[
                    worker_pb2.BackendProcess(
                        model_name=model,
                        replica_index=index,
                        address=address,
                        state=worker_pb2.BackendProcess.RUNNING,
                        pid=1,
                        backend_type="echo",
                    )
                    for (model, index), address in items
                ],
            )

        def load(request, context):
            with self.lock:
                self.load_calls += 1
                self.loads_running += 1
                self.most_loads_at_once = max(self.most_loads_at_once, self.loads_running)
            if self.load_delay:
                time.sleep(self.load_delay)
            with self.lock:
                self.loads_running -= 1
            return backend_pb2.Result(success=True, message="loaded")

        def health(request, context):
            return backend_pb2.Reply(message=b"OK")

        worker = grpc.method_handlers_generic_handler(
            "controlplane.worker.v1.Worker",
            {
                "StartBackend": unary(
                    start, worker_pb2.StartBackendRequest.FromString, worker_pb2.StartBackendResponse.SerializeToString
                ),
                "StopBackend": unary(
                    stop, worker_pb2.StopBackendRequest.FromString, worker_pb2.StopBackendResponse.SerializeToString
                ),
                "ListBackends": unary(
                    listing,
                    worker_pb2.ListBackendsRequest.FromString,
                    worker_pb2.ListBackendsResponse.SerializeToString,
                ),
            },
        )
        backend = grpc.method_handlers_generic_handler(
            "backend.Backend",
            {
                "LoadModel": unary(load, backend_pb2.ModelOptions.FromString, backend_pb2.Result.SerializeToString),
                "Health": unary(health, backend_pb2.HealthMessage.FromString, backend_pb2.Reply.SerializeToString),
            },
        )
        self.worker_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.worker_server.add_generic_rpc_handlers((worker,))
        self.worker_addresses = [
            f"127.0.0.1:{self.worker_server.add_insecure_port('127.0.0.1:0')}" for _ in range(nodes)
        ]
        self.backend_server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self.backend_server.add_generic_rpc_handlers((backend,))
        self.backend_addresses = [
            f"127.0.0.1:{self.backend_server.add_insecure_port('127.0.0.1:0')}" for _ in range(backend_ports)
        ]
        self.worker_server.start()
        self.backend_server.start()

    def reset(self) -> None:
        with self.lock:
            self.backends.clear()
            self.load_calls = self.start_calls = self.most_loads_at_once = 0

    def stop(self) -> None:
        self.worker_server.stop(grace=None)
        self.backend_server.stop(grace=None)


def _populate(fleet: FakeFleet, models: int, now) -> None:
    from proto import backend_pb2, codec
    from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node

    Node.objects.bulk_create(
        Node(
            name=f"sched-{i:03d}",
            address=address,
            status=Node.Status.HEALTHY,
            total_vram=80 * 1024**3,
            available_vram=80 * 1024**3,
            max_replicas_per_model=4,
            last_heartbeat=now,
            worker_api=Node.WorkerApi.AVAILABLE,  # as registration records a worker that serves it
        )
        for i, address in enumerate(fleet.worker_addresses)
    )
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(
            model_name=f"model-{m:04d}",
            backend_type="echo",
            model_opts_blob=codec.options_to_blob(
                backend_pb2.ModelOptions(Model=f"model-{m:04d}", Options=[f"vram_bytes={VRAM_HINT}"])
            ),
            updated_at=now,
        )
        for m in range(models)
    )
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=f"model-{m:04d}", min_replicas=1) for m in range(models)
    )


def _empty_tables() -> None:
    """Every table of the registry and the reconciler emptied (nodes, replicas, recipes,
    configs, events, conditions, passes...), in one TRUNCATE."""
    from django.apps import apps
    from django.db import connection

    tables = [m._meta.db_table for label in ("registry", "reconciler") for m in apps.get_app_config(label).get_models()]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")


def _baseline(conninfo: str, node_id, count: int) -> float:
    """``count`` replica rows: INSERT as loading, UPDATE to loaded; autocommit each."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        started = time.perf_counter()
        for index in range(count):
            row = connection.execute(
                "INSERT INTO registry_nodemodel (node_id, model_name, replica_index, address, state, in_flight,"
                " backend_type, reserved_vram, probe_failures, created_at, updated_at)"
                " VALUES (%s, %s, 0, '127.0.0.1:1', 'loading', 0, 'echo', 0, 0, now(), now()) RETURNING id",
                (node_id, f"baseline-{index:04d}"),
            ).fetchone()
            connection.execute(
                "UPDATE registry_nodemodel SET state = 'loaded', updated_at = now() WHERE id = %s AND state = 'loading'",
                (row[0],),
            )
        elapsed = time.perf_counter() - started
        connection.execute("DELETE FROM registry_nodemodel WHERE model_name LIKE 'baseline-%%'")
    return elapsed


def _one_run(fleet: FakeFleet, models: int) -> dict:
    """One placement of ``models`` replicas from an empty fleet, then its baseline."""
    from django.db.models import Count
    from django.utils import timezone

    from reconciler.reconcile import reconcile_once
    from registry.models import Node, NodeModel

    _empty_tables()
    fleet.reset()
    _populate(fleet, models, timezone.now())
    passes, outcomes = 0, []
    started, cpu_started = time.perf_counter(), time.process_time()
    while NodeModel.objects.filter(state=NodeModel.State.LOADED).values("model_name").distinct().count() < models:
        summary = reconcile_once()
        passes += 1
        outcomes.append(str(summary))
        if passes > 20:
            raise RuntimeError(f"not converged after {passes} passes: {outcomes[-3:]}")
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    loaded = NodeModel.objects.filter(state=NodeModel.State.LOADED).count()
    busiest = (
        NodeModel.objects.values("node_id").annotate(n=Count("pk")).order_by("-n").values_list("n", flat=True).first()
    )
    nodes_used = NodeModel.objects.values_list("node_id", flat=True).order_by().distinct().count()
    baseline = _baseline(os.environ["DATABASE_URL"], Node.objects.order_by("name").first().pk, loaded)
    return {
        "replicas": loaded,
        "seconds": elapsed,
        "cpu": cpu,
        "baseline": baseline,
        "passes": passes,
        "outcomes": outcomes,
        "nodes_used": nodes_used,
        "busiest": busiest,
        "start_calls": fleet.start_calls,
        "load_calls": fleet.load_calls,
        "most_at_once": fleet.most_loads_at_once,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per tier (under a minute)")
    args = parser.parse_args()
    runs = 1 if args.quick else 3
    os.environ.setdefault("CONTROLPLANE_STALE_AFTER", "600")  # the nodes' single heartbeat stays fresh
    os.environ.setdefault("CONTROLPLANE_REGISTRATION_TOKEN", "bench-token")
    load = os.getloadavg()[0]
    name, conninfo = _setup_database()
    fleet = None
    try:
        import django

        django.setup()
        import logging

        logging.disable(logging.WARNING)  # one log line per load would dominate the terminal
        from django.conf import settings
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        fleet = FakeFleet(NODES, BACKEND_PORTS)
        print(
            f"# placements by the reconciler: {NODES} nodes, N models (min_replicas=1), in-process fake gRPC; "
            f"load average at start {load:.2f}; CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY="
            f"{settings.RECONCILE_LOAD_CONCURRENCY}; {runs} run(s) per N, median"
        )
        rows = {}
        for models in TIERS:
            measured = sorted(
                (_one_run(fleet, models) for _ in range(runs)), key=lambda r: r["seconds"] / r["baseline"]
            )
            rows[models] = median = measured[len(measured) // 2]
            if median["replicas"] != models or median["load_calls"] != models or median["start_calls"] != models:
                raise RuntimeError(f"{models} replicas wanted, measured {median}")
            print(
                f"N={models}: {median['passes']} pass(es) ({'; '.join(median['outcomes'])}); "
                f"{median['replicas']} replicas on {median['nodes_used']} nodes (at most {median['busiest']} per "
                f"node); StartBackend {median['start_calls']}, LoadModel {median['load_calls']} "
                f"(at most {median['most_at_once']} at once)"
            )
        print()
        print(
            "| replicas | reconciler s | replicas/s | ms per replica | CPU ms per replica | baseline s | "
            "baseline/s | ratio |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for models, r in rows.items():
            print(
                f"| {models:,} | {r['seconds']:.3f} | {r['replicas'] / r['seconds']:.1f} | "
                f"{1000 * r['seconds'] / r['replicas']:.2f} | {1000 * r['cpu'] / r['replicas']:.2f} | "
                f"{r['baseline']:.3f} | "
                f"{r['replicas'] / r['baseline']:.1f} | {r['seconds'] / r['baseline']:.1f}x |"
            )
        fleet.load_delay = SLOW_LOAD
        slow = _one_run(fleet, SLOW_MODELS)
        print(
            f"with a {1000 * SLOW_LOAD:.0f} ms LoadModel: {SLOW_MODELS} replicas in {slow['seconds']:.2f} s "
            f"({slow['passes']} pass(es); one load at a time would take at least {SLOW_MODELS * SLOW_LOAD:.1f} s); "
            f"at most {slow['most_at_once']} LoadModel calls at once"
        )
        r = rows[RATIO_TIER]
        print(f"RATIO placements: {r['seconds'] / r['baseline']:.1f}x (goal <= 7x)")
    finally:
        if fleet is not None:
            from proto import client

            client.close_all_channels()
            fleet.stop()
        _drop_database(name, conninfo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
