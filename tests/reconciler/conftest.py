"""Fixtures of the reconciler tests: the fakes (``fakes.py``) and a ``reconcile`` helper that
runs one pass with them."""

from datetime import timedelta

import pytest

from reconciler.reconcile import reconcile_once
from registry.models import ModelLoadInfo, Node
from tests.reconciler.fakes import FakeProber, FakeScheduler


@pytest.fixture
def scheduler():
    return FakeScheduler()


@pytest.fixture
def prober():
    return FakeProber()


@pytest.fixture
def reconcile(scheduler, prober, now):
    """reconcile(at=None, heartbeat=False, **overrides) -> PassSummary: one pass with the fakes
    at ``now`` (or ``at``); ``heartbeat`` first records a heartbeat of every node at that time
    (tests about scaling, not health, keep their nodes fresh that way)."""

    def run(at=None, *, heartbeat=False, **overrides):
        at = at or now
        if heartbeat:
            for node_id in Node.objects.values_list("pk", flat=True):
                Node.objects.heartbeat(node_id, now=at)
        kwargs = {"now": at, "scheduler": scheduler, "prober": prober, **overrides}
        return reconcile_once(**kwargs)

    return run


@pytest.fixture
def watch(reconcile, now):
    """watch(until, alive=(), start=0, step=10) -> {offset: PassSummary}: a pass every ``step``
    seconds from ``now + start`` to ``now + until`` (inclusive), the ``alive`` nodes
    heartbeating through the heartbeat verb just before each pass. The other nodes stay silent,
    so the reconciler's own observations (not a hand-set timestamp) make them stale."""

    def run(until, *, alive=(), start=0, step=10):
        summaries = {}
        for offset in range(start, until + 1, step):
            at = now + timedelta(seconds=offset)
            for node in alive:
                Node.objects.heartbeat(node.pk, now=at)
            summaries[offset] = reconcile(at=at)
        return summaries

    return run


@pytest.fixture
def load_info():
    """load_info(model) stores a load recipe for ``model``."""

    def store(model_name="llama", backend_type="llama-cpp", blob=b"\n\x05llama"):
        return ModelLoadInfo.objects.upsert(model_name, backend_type, blob)

    return store
