"""Reconcile pass time and query count for 100 / 1,000 / 10,000 models on 1,000 nodes.

Steady state, nothing to do: every node is healthy with a fresh heartbeat, every model has
``min_replicas=1``, a load-info row, its first config revision and one loaded, recently probed,
idle replica of that revision; each worker's
``ListBackends`` (a fake prober, no network) reports exactly the rows the database holds.

Baseline, measured in the same run: the raw SQL of the pass's snapshot (the same statements
``take_snapshot`` sends, captured once, replayed with a cursor and ``fetchall``). The ratio
(pass / raw snapshot) is what this benchmark tracks; absolute times depend on the machine.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_reconcile.py [--quick]

It creates and drops its own database (``cp_bench_<random>``). Each size gets one untimed
warm-up pass (the first pass writes every model's conditions), then the timed ones. The last
line is ``RATIO pass: <pass / raw snapshot>x (goal <= 2x)`` for the largest size (10,000 models
unless ``BENCH_MODELS`` says otherwise). ``--quick`` (``make bench``, under a minute): 10,000
models only, 3 timed passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODES = 1000
MODEL_COUNTS = [int(n) for n in os.environ.get("BENCH_MODELS", "100,1000,10000").split(",")]
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
GOAL = 2  # issue 14: a steady pass within 2x of its raw snapshot SQL
QUICK_MODEL_COUNTS, QUICK_REPEATS = [10000], 3


def _setup_database() -> tuple[str, str]:
    import psycopg

    url = urlsplit(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    name = f"cp_bench_{uuid.uuid4().hex[:8]}"
    admin = dict(host=url.hostname, port=url.port or 5432, user=url.username or "postgres", dbname="postgres")
    with psycopg.connect(**admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = f"postgres://{admin['user']}@{admin['host']}:{admin['port']}/{name}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    os.environ.setdefault("CONTROLPLANE_VAR_DIR", f"/tmp/{name}")
    return name, f"host={admin['host']} port={admin['port']} user={admin['user']} dbname=postgres"


def _drop_database(name: str, conninfo: str) -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class SteadyProber:
    """Every probe answers ALIVE; every worker lists exactly the rows the database holds."""

    def __init__(self, listings):
        self.listings = listings

    def probe(self, address, *, timeout=None):
        from proto.client import Probe, ProbeResult

        return ProbeResult(Probe.ALIVE)

    def list_backends(self, address, *, node_id=None, timeout=None):
        from proto import worker_pb2

        return worker_pb2.ListBackendsResponse(
            node_id=node_id or "",
            backends=[
                worker_pb2.BackendProcess(
                    model_name=model, replica_index=index, state=worker_pb2.BackendProcess.RUNNING, address=backend
                )
                for model, index, backend in self.listings.get(address, ())
            ],
        )

    def stop_backend(self, *args, **kwargs):
        raise AssertionError("steady state: nothing should be stopped")

    def unload_model(self, *args, **kwargs):
        raise AssertionError("steady state: nothing should be unloaded")


class NoScheduler:
    def schedule_and_load(self, model_name, candidate_node_ids):
        raise AssertionError(f"steady state: nothing should be scheduled ({model_name})")


def _populate(models: int, now):
    from registry.managers.revisions import load_digest, template_digest
    from registry.models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, Node, NodeModel

    NodeModel.objects.all().delete()
    ModelRevision.objects.all().delete()
    ModelLoadInfo.objects.all().delete()
    ModelSchedulingConfig.objects.all().delete()
    if not Node.objects.exists():
        Node.objects.bulk_create(
            Node(
                name=f"bench-{i:04d}",
                address=f"10.1.{i // 250}.{i % 250}:50051",
                status=Node.Status.HEALTHY,
                total_vram=80 * 1024**3,
                available_vram=80 * 1024**3,
                max_replicas_per_model=4,
                last_heartbeat=now,
            )
            for i in range(NODES)
        )
    nodes = list(Node.objects.order_by("name"))
    ModelSchedulingConfig.objects.bulk_create(
        ModelSchedulingConfig(model_name=f"model-{m:05d}", min_replicas=1) for m in range(models)
    )
    ModelLoadInfo.objects.bulk_create(
        ModelLoadInfo(model_name=f"model-{m:05d}", backend_type="echo", model_opts_blob=b"\x0a\x01m", updated_at=now)
        for m in range(models)
    )
    # Every model at its first config revision, as after the upgrade's migration: the pass reads
    # the revisions and checks every replica's (none is outdated).
    scheduling = {"min_replicas": 1, "max_replicas": 0, "node_selector": {}, "placement": "spread",
                  "disk_bytes": 0, "spread_by": ""}
    ModelRevision.objects.bulk_create(
        (
            ModelRevision(
                model_name=f"model-{m:05d}", number=1, backend_type="echo", model_opts_blob=b"\x0a\x01m",
                has_load_info=True, scheduling=scheduling, load_digest=load_digest("echo", b"\x0a\x01m"),
                template_digest=template_digest("echo", b"\x0a\x01m", scheduling), created_at=now,
            )
            for m in range(models)
        ),
        batch_size=2000,
    )
    listings = {}
    rows = []
    for m in range(models):
        node = nodes[m % NODES]
        backend = f"{node.address.split(':')[0]}:{20000 + m}"
        rows.append(
            NodeModel(
                node=node,
                model_name=f"model-{m:05d}",
                replica_index=0,
                address=backend,
                state=NodeModel.State.LOADED,
                last_used=now,
                last_probe_at=now,
                revision=1,
            )
        )
        listings.setdefault(node.address, []).append((f"model-{m:05d}", 0, backend))
    NodeModel.objects.bulk_create(rows, batch_size=2000)
    return listings


def _snapshot_sql(now):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from reconciler.snapshot import take_snapshot

    with CaptureQueriesContext(connection) as captured:
        take_snapshot(now=now)
    return [query["sql"] for query in captured.captured_queries]


def _time_raw(statements) -> float:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)
            cursor.fetchall()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 models only, 3 timed passes (under a minute)")
    args = parser.parse_args(argv)
    model_counts, repeats = (QUICK_MODEL_COUNTS, QUICK_REPEATS) if args.quick else (MODEL_COUNTS, REPEATS)
    ratio = None
    name, conninfo = _setup_database()
    try:
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection
        from django.test.utils import CaptureQueriesContext
        from django.utils import timezone

        from reconciler.reconcile import reconcile_once

        call_command("migrate", verbosity=0)
        print(f"# reconcile pass, steady state, {NODES} nodes, PostgreSQL, median of {repeats}")
        print("| models | pass (ms) | queries | raw snapshot SQL (ms) | ratio pass/raw |")
        print("|---:|---:|---:|---:|---:|")
        for models in model_counts:
            now = timezone.now()
            listings = _populate(models, now)
            prober, scheduler = SteadyProber(listings), NoScheduler()
            warm_up = reconcile_once(now=now, scheduler=scheduler, prober=prober)
            assert warm_up.outcome == "ok", warm_up
            statements = _snapshot_sql(now)
            passes, raws, queries = [], [], []
            for repeat in range(repeats):
                moment = now + timedelta(seconds=(repeat + 1) * 0.01)
                with CaptureQueriesContext(connection) as captured:
                    started = time.perf_counter()
                    summary = reconcile_once(now=moment, scheduler=scheduler, prober=prober)
                    passes.append(time.perf_counter() - started)
                queries.append(len(captured.captured_queries))
                assert summary.outcome == "ok", summary
                raws.append(_time_raw(statements))
            pass_ms, raw_ms = statistics.median(passes) * 1000, statistics.median(raws) * 1000
            ratio = pass_ms / raw_ms
            print(f"| {models:,} | {pass_ms:.1f} | {max(queries)} | {raw_ms:.1f} | {ratio:.2f} |", flush=True)
    finally:
        _drop_database(name, conninfo)
    if ratio is not None:
        print(f"RATIO pass: {ratio:.2f}x (goal <= {GOAL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
