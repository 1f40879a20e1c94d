"""``/livez`` and ``/readyz``: plain Django views, outside the API (no authentication, no
OpenAPI entry), for load balancers and orchestrators.

* ``/livez``: the process answers; touches nothing else. 200 ``{"status": "ok"}``.
* ``/readyz``: this process can do useful work. Checks, each reported by name:

  - ``database``: ``SELECT 1`` answers within ``READYZ_DB_TIMEOUT_MS`` (a PostgreSQL
    ``statement_timeout`` set for this transaction only; the connect timeout is the database
    settings' ``connect_timeout``);
  - ``migrations``: Django's migration executor has nothing left to apply (a positive answer
    is cached for the process's life: code and migrations only change with a restart);
  - ``reconciler`` (when ``READYZ_REQUIRE_RECONCILER``, default on): a successful pass
    finished within ``3 x RECONCILE_INTERVAL``. Skipped during ``READYZ_STARTUP_GRACE``
    seconds after this process started, so a fleet that is just starting (qcluster not yet
    started, or its first pass not yet finished) is not reported unready.

  200 ``{"status": "ok", "checks": {...}}``, else 503 ``application/problem+json`` with
  ``code: "not_ready"``, ``checks`` (each ``{"ok": bool, "detail": str}``) and ``failing``.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.http import JsonResponse
from django.utils import timezone

from core.problems import Problem, problem_response

logger = logging.getLogger(__name__)

PROCESS_STARTED = time.monotonic()
_migrations_applied = False


def check_database() -> str:
    """Raises when the database does not answer ``SELECT 1`` in time."""
    connection = connections[DEFAULT_DB_ALIAS]
    timeout_ms = int(settings.READYZ_DB_TIMEOUT_MS)
    if connection.vendor != "postgresql":
        # No transaction on SQLite: ours are IMMEDIATE, they would take the write lock.
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return f"{connection.vendor} answered"
    with transaction.atomic(using=DEFAULT_DB_ALIAS), connection.cursor() as cursor:
        # is_local=true: the timeout ends with this transaction.
        cursor.execute("SELECT set_config('statement_timeout', %s, true)", [str(timeout_ms)])
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return f"{connection.vendor} answered"


def check_migrations() -> str:
    global _migrations_applied
    if _migrations_applied:
        return "all applied"
    connection = connections[DEFAULT_DB_ALIAS]
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        names = ", ".join(f"{migration.app_label}.{migration.name}" for migration, _ in plan[:5])
        raise NotReady(f"{len(plan)} unapplied: {names}")
    _migrations_applied = True
    return "all applied"


def check_reconciler(now=None) -> str:
    from reconciler.models import ReconcilePass

    interval = float(settings.RECONCILE_INTERVAL)
    max_age = timedelta(seconds=3 * interval)
    now = now or timezone.now()
    last_ok = (
        ReconcilePass.objects.filter(outcome=ReconcilePass.Outcome.OK)
        .order_by("-finished_at")
        .values_list("finished_at", flat=True)
        .first()
    )
    if last_ok is not None and now - last_ok <= max_age:
        return f"last successful pass {(now - last_ok).total_seconds():.1f}s ago"
    uptime = time.monotonic() - PROCESS_STARTED
    grace = float(settings.READYZ_STARTUP_GRACE)
    if uptime < grace:
        return f"in start-up grace ({uptime:.0f}s of {grace:.0f}s)"
    if last_ok is None:
        raise NotReady("no successful reconcile pass stored")
    raise NotReady(
        f"last successful pass {(now - last_ok).total_seconds():.0f}s ago (limit {max_age.total_seconds():.0f}s)"
    )


class NotReady(Exception):
    """A check's failure; its message is the check's detail."""


def run_checks() -> dict[str, dict]:
    checks = {"database": check_database, "migrations": check_migrations}
    if settings.READYZ_REQUIRE_RECONCILER:
        checks["reconciler"] = check_reconciler
    results: dict[str, dict] = {}
    database_ok = True
    for name, check in checks.items():
        if name != "database" and not database_ok:
            results[name] = {"ok": False, "detail": "not checked: the database is unavailable"}
            continue
        try:
            results[name] = {"ok": True, "detail": check()}
        except NotReady as exc:
            results[name] = {"ok": False, "detail": str(exc)}
        except Exception as exc:  # any database or driver error
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}".strip()[:500]}
            if name == "database":
                database_ok = False
                _close_broken_connection()
    return results


def _close_broken_connection() -> None:
    try:
        connections[DEFAULT_DB_ALIAS].close()
    except Exception:
        pass


def livez(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    results = run_checks()
    failing = sorted(name for name, result in results.items() if not result["ok"])
    if not failing:
        return JsonResponse({"status": "ok", "checks": results})
    logger.warning("not ready: %s", ", ".join(f"{name}: {results[name]['detail']}" for name in failing))
    return problem_response(
        Problem(
            status=503,
            code="not_ready",
            title="Not ready",
            detail="Failing checks: " + ", ".join(failing) + ".",
            extra={"checks": results, "failing": failing},
            headers={"Retry-After": "5", "Cache-Control": "no-store"},
        )
    )
