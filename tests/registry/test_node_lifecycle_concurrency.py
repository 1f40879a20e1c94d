"""Drain ownership and label bounds under real concurrency (threads with their own PostgreSQL
connections; SQLite serialises every writer, so these prove something on PostgreSQL only)."""

import pytest

from registry.managers import DrainedByOperator, TooManyLabels
from registry.models import Node, NodeLabel
from tests.concurrency import run_in_threads
from tests.factories import make_node

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROUNDS = 15


def test_a_nodes_resume_racing_an_operators_drain_never_loses_the_operators_drain(close_thread_connections):
    """Each round: the node drained itself; then its own resume and an operator's drain run at
    once. Whatever the order, the operator's drain stands at the end (the resume either landed
    first and the drain applied after, or matched nothing and was told so)."""
    node = make_node(name="racer")
    refused = 0
    for _ in range(ROUNDS):
        assert Node.objects.mark_draining(node.pk, by=Node.DrainedBy.NODE)

        def act(i):
            if i == 0:
                return Node.objects.mark_draining(node.pk, by=Node.DrainedBy.OPERATOR)
            try:
                return Node.objects.resume(node.pk, by=Node.DrainedBy.NODE)
            except DrainedByOperator:
                return "refused"

        results = run_in_threads(act, close_thread_connections, count=2)
        refused += results[1] == "refused"
        node.refresh_from_db()
        assert (node.status, node.drained_by) == (Node.Status.DRAINING, Node.DrainedBy.OPERATOR), results
        assert Node.objects.resume(node.pk, by=Node.DrainedBy.OPERATOR)
    node.refresh_from_db()
    assert node.status == Node.Status.HEALTHY


def test_concurrent_label_merges_never_exceed_the_per_node_bound(close_thread_connections, settings):
    """Eight operators each add 10 new keys at once to a node that has room for 40 more: the
    node's row lock serialises the writes, so the bound holds exactly and every refused write
    left nothing behind."""
    node = make_node(name="labelled")
    held = NodeLabel.objects.filter(node=node).count()
    settings.CONTROLPLANE_MAX_LABELS_PER_NODE = held + 40

    def merge(i):
        try:
            return NodeLabel.objects.merge(node.pk, {f"team-{i}-{k}": "x" for k in range(10)})
        except TooManyLabels:
            return "refused"

    results = run_in_threads(merge, close_thread_connections)

    assert results.count(10) == 4 and results.count("refused") == 4
    labels = NodeLabel.objects.as_dict(node.pk)
    assert len(labels) == held + 40
    written = {key.split("-")[1] for key in labels if key.startswith("team-")}
    for i, result in enumerate(results):
        assert (str(i) in written) == (result == 10)
