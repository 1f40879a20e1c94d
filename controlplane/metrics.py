"""The ``/metrics`` view: every process's counters (``core.metrics``) plus the fleet's truth
read from the database at scrape time.

``FleetCollector`` reads nodes by status, replicas desired vs ready per configured model,
heartbeat ages and the last successful reconcile pass. The database is shared by every process
on every machine, so these gauges are the fleet's truth whichever web process is scraped; the
collector runs a constant number of queries (pinned in tests/ops). Per-model series exist only
for models with a scheduling config; no series carries a node id.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from functools import lru_cache

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from core.auth import ApiKeyAuthentication
from core.models import ApiKey
from core.problems import Problem, problem_response
from reconciler.models import ReconcilePass
from registry.models import ModelSchedulingConfig, Node, NodeModel

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_AGE_BUCKETS = (1.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


# --- read from the database at scrape time ---------------------------------------------------


class FleetCollector:
    """Fleet gauges computed from the database at scrape time, in a constant number of queries
    (five), whatever the number of nodes and models."""

    def collect(self):
        try:
            families = list(self._families())
        except DatabaseError as exc:
            logger.warning("fleet metrics unavailable: %s", exc)
            families = []
        up = GaugeMetricFamily(
            "controlplane_fleet_metrics_up", "1 when the fleet gauges could be read from the database."
        )
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families

    def _families(self):
        now = timezone.now()

        nodes = GaugeMetricFamily("controlplane_nodes", "Registered nodes by status.", labels=["status"])
        counts = dict(Node.objects.values("status").annotate(n=Count("pk")).values_list("status", "n"))
        for status in Node.Status.values:
            nodes.add_metric([status], counts.get(status, 0))
        yield nodes

        configs = list(ModelSchedulingConfig.objects.values_list("model_name", "min_replicas", "max_replicas"))
        names = [name for name, _, _ in configs]
        ready = dict(
            NodeModel.objects.ready()
            .filter(model_name__in=names)
            .values("model_name")
            .annotate(n=Count("pk"))
            .values_list("model_name", "n")
        )
        desired = GaugeMetricFamily(
            "controlplane_model_replicas_desired", "min_replicas of each configured model.", labels=["model"]
        )
        maximum = GaugeMetricFamily(
            "controlplane_model_replicas_max",
            "max_replicas of each configured model (0 = unlimited).",
            labels=["model"],
        )
        ready_family = GaugeMetricFamily(
            "controlplane_model_replicas_ready",
            "Loaded replicas on schedulable nodes of each configured model.",
            labels=["model"],
        )
        for name, low, high in configs:
            desired.add_metric([name], low)
            maximum.add_metric([name], high)
            ready_family.add_metric([name], ready.get(name, 0))
        yield desired
        yield maximum
        yield ready_family

        heartbeats = Node.objects.exclude(status=Node.Status.OFFLINE).values_list("last_heartbeat", flat=True)
        ages = [max((now - beat).total_seconds(), 0.0) for beat in heartbeats if beat is not None]
        oldest = GaugeMetricFamily(
            "controlplane_node_heartbeat_age_max_seconds", "Oldest heartbeat among nodes that are not offline."
        )
        oldest.add_metric([], max(ages) if ages else 0.0)
        yield oldest
        buckets, cumulative = [], 0
        for bound in HEARTBEAT_AGE_BUCKETS:
            cumulative = sum(1 for age in ages if age <= bound)
            buckets.append((_bound(bound), cumulative))
        buckets.append(("+Inf", len(ages)))
        histogram = HistogramMetricFamily(
            "controlplane_node_heartbeat_age_seconds", "Heartbeat ages of nodes that are not offline, at scrape time."
        )
        histogram.add_metric([], buckets, sum(ages))
        yield histogram

        last_ok = (
            ReconcilePass.objects.filter(outcome=ReconcilePass.Outcome.OK)
            .order_by("-finished_at")
            .values_list("finished_at", flat=True)
            .first()
        )
        last = GaugeMetricFamily(
            "controlplane_reconcile_last_success_timestamp_seconds",
            "Unix time the last successful reconcile pass finished (any process); 0 when none is stored.",
        )
        last.add_metric([], last_ok.timestamp() if last_ok else 0.0)
        yield last


def _bound(value: float) -> str:
    return str(float(value))


class _ProcessRegistry:
    """This process's default registry, as a collector of the scrape registry."""

    def collect(self):
        yield from REGISTRY.collect()


def scrape_registry() -> CollectorRegistry:
    """A fresh registry for one scrape: every process's counters (multiprocess mode) or this
    process's, plus the fleet gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessRegistry())
    registry.register(FleetCollector())
    return registry


# --- access and the view ----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _networks(spec: str):
    networks = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            networks.append(ipaddress.ip_network(part, strict=False))
    return tuple(networks)


def scrape_allowed(request) -> bool:
    """``/metrics`` answers a client whose address (``REMOTE_ADDR``: the peer, never a
    forwarded header) is in ``METRICS_ALLOW`` (comma-separated CIDRs; default loopback), or
    one that presents an operator API key."""
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        address = None
    if address is not None:
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        if any(address in network for network in _networks(settings.METRICS_ALLOW)):
            return True
    return _has_operator_key(request)


def _has_operator_key(request) -> bool:
    try:
        result = ApiKeyAuthentication().authenticate(request)
    except Exception:
        return False
    if not result:
        return False
    key = result[1]
    return getattr(key, "role", None) == ApiKey.Role.OPERATOR


def metrics_view(request):
    if not scrape_allowed(request):
        return problem_response(
            Problem(
                status=403,
                code="metrics_forbidden",
                title="Permission denied",
                detail="/metrics answers addresses in METRICS_ALLOW or an operator API key.",
            )
        )
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
