"""The gateway's Prometheus metrics, per model.

prometheus-client metrics like ``core.metrics``' own: with ``PROMETHEUS_MULTIPROC_DIR`` set
(``scripts/run`` sets it for every process it starts) they are written to per-process files, so
a scrape of the web process's ``/metrics`` sums the gateway's series with everyone else's; the
gateway also answers ``/metrics`` itself (``scrape``). The in-flight gauge counts live processes
only (``livesum``), and ``manage.py gateway`` marks its process dead when it stops.

``model`` is a label only for models the registry knows (a request that was routed, or failed
after routing); a request for an unknown name counts under ``model=""``, so clients cannot grow
the number of series by inventing names.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from core.metrics import LATENCY_BUCKETS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FIRST_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "controlplane_gateway_requests",
    "Gateway requests answered, by model, endpoint and outcome (ok, client_error, unauthorized, "
    "model_not_found, unavailable, backend_error, backend_timeout, cancelled, error).",
    ["model", "endpoint", "outcome"],
)
TOKENS = Counter(
    "controlplane_gateway_tokens",
    "Tokens by model and direction (in: the prompt, out: generated), as the backends count them.",
    ["model", "direction"],
)
FIRST_TOKEN = Histogram(
    "controlplane_gateway_time_to_first_token_seconds",
    "From the request's arrival to the first generated text sent (streams) or the answer (others).",
    ["model", "endpoint"],
    buckets=FIRST_TOKEN_BUCKETS,
)
LATENCY = Histogram(
    "controlplane_gateway_request_duration_seconds",
    "From the request's arrival to its last byte, by model and endpoint.",
    ["model", "endpoint"],
    buckets=LATENCY_BUCKETS + (120.0, 300.0),
)
STREAMS = Gauge(
    "controlplane_gateway_streams_in_flight",
    "Streamed answers being sent now, by model.",
    ["model"],
    multiprocess_mode="livesum",
)


def observe_request(model: str, endpoint: str, outcome: str, seconds: float) -> None:
    REQUESTS.labels(model, endpoint, outcome).inc()
    LATENCY.labels(model, endpoint).observe(seconds)


def observe_tokens(model: str, prompt: int, completion: int) -> None:
    if prompt:
        TOKENS.labels(model, "in").inc(prompt)
    if completion:
        TOKENS.labels(model, "out").inc(completion)


def observe_first_token(model: str, endpoint: str, seconds: float) -> None:
    FIRST_TOKEN.labels(model, endpoint).observe(seconds)


def streams(model: str) -> Gauge:
    return STREAMS.labels(model)


def scrape() -> bytes:
    """Every process's series in multiprocess mode (as the web process's /metrics without the
    fleet gauges, which read the database), else this process's."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_dead() -> None:
    """Drop this process's live gauges from the multiprocess directory (at shutdown)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
