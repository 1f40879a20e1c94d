"""The fleet dashboard at 1,000 nodes x 1,000 models: time and size of the page (issue 17,
"a dashboard for big fleets": under 1 s and 1 MB).

Baseline, in the same run: the raw SQL of the reconciler's snapshot that the page is built from
(the statements ``take_snapshot`` sends, replayed with a cursor and ``fetchall``). The page is
requested as a staff user through Django's test client (the whole request cycle: session, auth,
view, template), without a socket.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/bench_dashboard.py [--quick]

It creates and drops its own database (``cp_bench_<random>``). The last line is
``BUDGET dashboard: <seconds> s, <KiB> KiB (budget 1 s, 1024 KiB): MET|NOT MET``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_reconcile import _drop_database, _setup_database, _snapshot_sql, _time_raw  # noqa: E402

TIME_BUDGET_S = 1.0
SIZE_BUDGET_BYTES = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 requests instead of 20")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=1000)
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 20
    name, conninfo = _setup_database()
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.test import Client
        from django.urls import reverse
        from django.utils import timezone

        from tests.admin.big_fleet import build_big_fleet

        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
        call_command("migrate", verbosity=0)
        started = time.perf_counter()
        build_big_fleet(nodes=args.nodes, models=args.models)
        built = time.perf_counter() - started
        user = get_user_model().objects.create_superuser("bench", password="bench-dashboard-pw")
        client = Client()
        client.force_login(user)
        url = reverse("admin:fleet_dashboard")
        statements = _snapshot_sql(timezone.now())
        client.get(url)  # warm-up: templates compiled, caches filled
        pages, raws, sizes = [], [], []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get(url)
            pages.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
            sizes.append(len(response.content))
            raws.append(_time_raw(statements))
        searched = []
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get(url, {"model": "model-009", "label": "zone=zone-1", "page": "1"})
            searched.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
    finally:
        _drop_database(name, conninfo)
    page_s, raw_s, search_s = statistics.median(pages), statistics.median(raws), statistics.median(searched)
    size = max(sizes)
    load = os.getloadavg()[0]
    print(
        f"# fleet dashboard, {args.nodes:,} nodes x {args.models:,} models (2 replicas each), built in {built:.1f} s; "
        f"load average {load:.2f}; median of {repeats}"
    )
    print("| what | median ms | page KiB |")
    print("|---|---:|---:|")
    print(f"| baseline: raw snapshot SQL | {raw_s * 1000:.1f} | |")
    print(f"| dashboard, first page | {page_s * 1000:.1f} | {size / 1024:.0f} |")
    print(f"| dashboard, searched (model, label) | {search_s * 1000:.1f} | |")
    print(f"RATIO dashboard: {page_s / raw_s:.2f}x of its raw snapshot SQL")
    met = page_s < TIME_BUDGET_S and size < SIZE_BUDGET_BYTES
    print(
        f"BUDGET dashboard: {page_s:.3f} s, {size / 1024:.0f} KiB (budget {TIME_BUDGET_S:.0f} s, "
        f"{SIZE_BUDGET_BYTES // 1024} KiB): {'MET' if met else 'NOT MET'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
