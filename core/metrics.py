"""Prometheus metrics counted in-process: what every process of the control plane counts.

Request counts and latencies, reconcile pass durations and outcomes, gRPC calls, load jobs and
evictions are prometheus-client metrics defined below, incremented by small hooks
(``RequestMetricsMiddleware``, ``observe_reconcile_pass``, ``observe_grpc_call`` installed into
``proto.client``, ``observe_load_job``, ``observe_eviction``). When ``PROMETHEUS_MULTIPROC_DIR``
is set (``scripts/run`` sets it for gunicorn and the qcluster), prometheus-client writes them to
per-process files in that directory and a scrape of any web process sums every process's files.

The gauges read from the database at scrape time and the ``/metrics`` view live in
``controlplane/metrics.py`` (they read the registry's and the reconciler's tables, which this
base app does not import).

Label cardinality stays bounded: request metrics carry the URL pattern's name (never the raw
path), the method (unknown verbs become ``other``) and the status class.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- counted in-process ---------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "controlplane_http_requests",
    "HTTP requests answered, by URL pattern name, method and status class.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "controlplane_http_request_duration_seconds",
    "Time to answer an HTTP request, by URL pattern name and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
RECONCILE_PASSES = Counter(
    "controlplane_reconcile_passes",
    "Reconcile passes by outcome (ok, skipped: another process held the lock, error).",
    ["outcome"],
)
RECONCILE_DURATION = Histogram(
    "controlplane_reconcile_pass_duration_seconds",
    "Duration of reconcile passes that ran (outcome ok or error).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
RECONCILE_ACTIONS = Counter(
    "controlplane_reconcile_actions",
    "What reconcile passes did, by action name (replicas_added, replicas_removed, ...).",
    ["action"],
)
GRPC_CALLS = Counter(
    "controlplane_grpc_calls",
    "gRPC calls made by this control plane, by full method and status code.",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "controlplane_grpc_call_duration_seconds",
    "gRPC call duration by full method.",
    ["method"],
    buckets=LATENCY_BUCKETS + (120.0,),
)
LOAD_JOBS = Counter(
    "controlplane_load_jobs",
    "Cold-load jobs by event: started (a runner took it), succeeded, failed.",
    ["event"],
)
EVICTIONS = Counter("controlplane_evictions", "Idle replicas evicted to make VRAM room for another model.")


def _route_name(request) -> str:
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return match.view_name or match.url_name or "unnamed"


def observe_request(request, status_code: int, seconds: float) -> None:
    observe_answer(_route_name(request), request.method, status_code, seconds)


def observe_answer(route: str, method: str, status_code: int, seconds: float) -> None:
    """Count one answer of ``route`` (a URL pattern name); also used by handlers that answer
    below Django's middleware (the heartbeat's lean path)."""
    method = method if method in _METHODS else "other"
    HTTP_REQUESTS.labels(route, method, f"{status_code // 100}xx").inc()
    HTTP_LATENCY.labels(route, method).observe(seconds)


class RequestMetricsMiddleware:
    """Counts every answer (errors too) by route name, method and status class."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        try:
            observe_request(request, response.status_code, time.perf_counter() - started)
        except Exception:  # metrics must never break a request
            logger.debug("request metrics failed", exc_info=True)
        return response


_RAN = {"ok", "error"}


def observe_reconcile_pass(summary) -> None:
    """Hook called by ``reconciler.reconcile`` once per pass (stored or skipped)."""
    try:
        outcome = str(summary.outcome)
        RECONCILE_PASSES.labels(outcome).inc()
        if outcome in _RAN:
            RECONCILE_DURATION.observe(summary.duration_s)
        for action, n in summary.actions.items():
            RECONCILE_ACTIONS.labels(action).inc(n)
    except Exception:
        logger.debug("reconcile metrics failed", exc_info=True)


def observe_grpc_call(method: str, code: str, seconds: float) -> None:
    """Installed as ``proto.client.call_observer`` by ``install_hooks``."""
    GRPC_CALLS.labels(method, code).inc()
    GRPC_LATENCY.labels(method).observe(seconds)


def observe_load_job(event: str) -> None:
    LOAD_JOBS.labels(event).inc()


def observe_eviction() -> None:
    EVICTIONS.inc()


def install_hooks() -> None:
    """Called from ``CoreConfig.ready``: ``proto`` does not import Django, so the
    control plane hands it the observer instead."""
    from proto import client

    client.call_observer = observe_grpc_call
