"""Scheduling throughput: replicas placed and loaded per second by the reconciler.

100 models with ``min_replicas=1`` and stored load info (a 30 GiB ``vram_bytes`` hint, so at
most 2 fit on each 80 GiB node and all 50 nodes are used), 50 healthy nodes, no replica yet; the
reconciler (``reconcile_once`` with the default ``RouterScheduler``, i.e. ``router.schedule_and_load``
for every missing replica, and the default gRPC prober) runs passes until every model has a
loaded replica. Counted: passes, wall time, replicas/s.

Workers and backends are **in-process fake gRPC servers** (the pattern of
``tests/router/conftest.py``), not 50 reference worker processes: 50 worker agents plus 100
echo backend processes do not fit on the 2 shared cores this runs on, and would measure process
start-up, not scheduling. One Worker server listens on 50 ports (one per node; it tells the nodes
apart by the ``x-node-id`` metadata every worker call carries) and implements StartBackend /
StopBackend / ListBackends; StartBackend hands out one of 128 ports of one Backend server whose
``LoadModel`` answers success at once (an "instant echo backend") and counts calls. Every call
is still a real gRPC call over loopback.

Baseline, same run: the same number of raw ``INSERT`` (state ``loading``) + ``UPDATE`` (to
``loaded``) statements of a replica row, each its own autocommit transaction, on one psycopg
connection: the database work a placement cannot avoid.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_schedule.py

It creates and drops its own database (``cp_bench_<random>``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_reconcile import _drop_database, _setup_database  # noqa: E402

NODES = int(os.environ.get("BENCH_NODES", "50"))
MODELS = int(os.environ.get("BENCH_MODELS", "100"))
BACKEND_PORTS = 128
# a vram_bytes placement hint of 30 GiB on 80 GiB nodes: at most 2 replicas fit per node, so
# 100 models need all 50 (the hint keeps the measured work equal across runs: without it, spread
# placement now also spreads by replica count, but VRAM would not bound it)
VRAM_HINT = 30 * 1024**3


class FakeFleet:
    """One Worker server (a port per node) and one instant Backend server (a pool of ports)."""

    def __init__(self, nodes: int, backend_ports: int) -> None:
        import grpc

        from proto import backend_pb2, worker_pb2

        self.lock = threading.Lock()
        self.load_calls = 0
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
            return backend_pb2.Result(success=True, message="loaded")

        def health(request, context):
            return backend_pb2.Reply(message=b"OK")

        worker = grpc.method_handlers_generic_handler(
            "controlplane.worker.v1.Worker",
            {
                "StartBackend": unary(start, worker_pb2.StartBackendRequest.FromString,
                                      worker_pb2.StartBackendResponse.SerializeToString),
                "StopBackend": unary(stop, worker_pb2.StopBackendRequest.FromString,
                                     worker_pb2.StopBackendResponse.SerializeToString),
                "ListBackends": unary(listing, worker_pb2.ListBackendsRequest.FromString,
                                      worker_pb2.ListBackendsResponse.SerializeToString),
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
        self.worker_addresses = [f"127.0.0.1:{self.worker_server.add_insecure_port('127.0.0.1:0')}" for _ in range(nodes)]
        self.backend_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.backend_server.add_generic_rpc_handlers((backend,))
        self.backend_addresses = [
            f"127.0.0.1:{self.backend_server.add_insecure_port('127.0.0.1:0')}" for _ in range(backend_ports)
        ]
        self.worker_server.start()
        self.backend_server.start()

    def stop(self) -> None:
        self.worker_server.stop(grace=None)
        self.backend_server.stop(grace=None)


def _populate(fleet: FakeFleet, now) -> None:
    from proto import backend_pb2, codec
    from registry.models import ModelLoadInfo, ModelSchedulingConfig, Node

    nodes = Node.objects.bulk_create(
        Node(
            name=f"sched-{i:03d}",
            address=address,
            status=Node.Status.HEALTHY,
            total_vram=80 * 1024**3,
            available_vram=80 * 1024**3,
            max_replicas_per_model=4,
            last_heartbeat=now,
        )
        for i, address in enumerate(fleet.worker_addresses)
    )
    assert len(nodes) == NODES
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(
            model_name=f"model-{m:03d}",
            backend_type="echo",
            model_opts_blob=codec.options_to_blob(
                backend_pb2.ModelOptions(Model=f"model-{m:03d}", Options=[f"vram_bytes={VRAM_HINT}"])
            ),
            updated_at=now,
        )
        for m in range(MODELS)
    )
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=f"model-{m:03d}", min_replicas=1) for m in range(MODELS)
    )


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


def main() -> int:
    os.environ.setdefault("CONTROLPLANE_STALE_AFTER", "600")  # the nodes' single heartbeat stays fresh
    os.environ.setdefault("CONTROLPLANE_REGISTRATION_TOKEN", "bench-token")
    name, conninfo = _setup_database()
    fleet = None
    try:
        import django

        django.setup()
        import logging

        logging.disable(logging.INFO)  # one log line per load would dominate the terminal
        from django.core.management import call_command
        from django.utils import timezone

        from proto import client
        from reconciler.reconcile import reconcile_once
        from registry.models import Node, NodeModel

        call_command("migrate", verbosity=0)
        fleet = FakeFleet(NODES, BACKEND_PORTS)
        _populate(fleet, timezone.now())

        passes, outcomes = 0, []
        started = time.perf_counter()
        while NodeModel.objects.filter(state=NodeModel.State.LOADED).values("model_name").distinct().count() < MODELS:
            summary = reconcile_once()
            passes += 1
            outcomes.append(str(summary))
            if passes > 50:
                raise RuntimeError(f"not converged after {passes} passes: {outcomes[-3:]}")
        elapsed = time.perf_counter() - started
        loaded = NodeModel.objects.filter(state=NodeModel.State.LOADED).count()
        per_node = NodeModel.objects.values_list("node_id", flat=True).order_by().distinct().count()
        db_conninfo = os.environ["DATABASE_URL"]
        baseline = _baseline(db_conninfo, Node.objects.order_by("name").first().pk, loaded)
        client.close_all_channels()

        print(f"# scheduling throughput: {MODELS} models (min_replicas=1) on {NODES} nodes, in-process fake gRPC")
        print(f"passes: {passes} ({'; '.join(outcomes)})")
        print(f"replicas loaded: {loaded} on {per_node} distinct nodes; StartBackend calls {fleet.start_calls}, "
              f"LoadModel calls {fleet.load_calls}")
        print("| what | seconds | replicas/s |")
        print("|---|---:|---:|")
        print(f"| reconciler: schedule_and_load via passes | {elapsed:.2f} | {loaded / elapsed:.1f} |")
        print(f"| baseline: raw INSERT loading + UPDATE loaded | {baseline:.3f} | {loaded / baseline:.1f} |")
        print(f"ratio (reconciler / baseline time): {elapsed / baseline:.1f}x")
    finally:
        if fleet is not None:
            fleet.stop()
        _drop_database(name, conninfo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
