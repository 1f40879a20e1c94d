"""Factories: each creates one object and the parents it needs, through the registry verbs.

A factory reaches every state the way production does (``Node.objects.register``, ``approve``,
``resume``, ``mark_draining``, ``mark_unhealthy``, ``mark_offline``;
``NodeModel.objects.claim_loading``, ``mark_loaded``, ``record_loaded``, ``increment_in_flight``,
``record_probe_ok``, ``record_probe_unreachable``; the load-job verbs;
``record_unsatisfiable``), never by writing a column by hand: a test must not stand on a row
production could not have written. (Where the other shared test helpers live:
``tests/clients.py``.)
"""

import itertools
from datetime import timedelta

from registry.clock import resolve_now
from registry.models import LoadJob, ModelSchedulingConfig, Node, NodeModel

_sequence = itertools.count(1)
GIB = 1024**3


# The node token last issued per name: calling make_node again with a name re-registers that
# node, which needs its current token (as a restarted worker presents it).
_issued_tokens: dict[str, str] = {}


def make_node(*, name=None, status=Node.Status.HEALTHY, slots=1, total_vram=24 * GIB, labels=None, now=None, **extra):
    """Register a node (so auto-labels and the token exist) and bring it to the status wanted
    through its verb: ``pending`` by registering without auto-approval, ``draining`` by
    ``mark_draining`` (``drained_by``, an operator's by default), ``unhealthy`` by
    ``mark_unhealthy``, ``offline`` by ``mark_offline`` (as the reconciler reaps a silent node),
    all at ``now``."""
    drained_by = extra.pop("drained_by", Node.DrainedBy.OPERATOR)
    if status == Node.Status.PENDING:
        extra.setdefault("auto_approve", False)
    name = name or f"node-{next(_sequence)}"
    registration = Node.objects.register(
        name=name,
        presented_node_token=extra.pop("presented_node_token", _issued_tokens.get(name)),
        address=extra.pop("address", f"127.0.0.1:{50000 + next(_sequence)}"),
        total_vram=total_vram,
        labels=labels,
        max_replicas_per_model=slots,
        now=now,
        **extra,
    )
    node = registration.node
    if registration.node_token:
        _issued_tokens[name] = registration.node_token
    if node.status != status:
        moved = {
            # A returning node an operator drained comes back draining (a pending one, pending):
            # whoever holds it there lets it go.
            Node.Status.HEALTHY: lambda: (
                Node.objects.approve(node.pk, now=now)
                if node.status == Node.Status.PENDING
                else Node.objects.resume(node.pk, by=Node.DrainedBy.OPERATOR, now=now)
            ),
            Node.Status.DRAINING: lambda: Node.objects.mark_draining(node.pk, by=drained_by, now=now),
            Node.Status.UNHEALTHY: lambda: Node.objects.mark_unhealthy(node.pk, now=now),
            Node.Status.OFFLINE: lambda: Node.objects.mark_offline(node.pk, now=now),
        }[status]()
        assert moved, f"no verb brings a new node from {node.status!r} to {status!r}"
        node.refresh_from_db()
    node.token = registration.node_token
    return node


def make_replica(
    node,
    model_name="llama",
    replica_index=0,
    *,
    state=NodeModel.State.LOADED,
    address="",
    backend_type=None,
    model_opts_blob=None,
    reserved_vram=0,
    in_flight=0,
    probe_failures=0,
    last_used=None,
    last_probe_at=None,
):
    """A replica row reached the way production reaches it.

    A ``loading`` row, and any row with ``reserved_vram``, is claimed by the router's verb
    (``claim_loading``: the lowest free index below the node's slots, the VRAM reserved on the
    node), then ``mark_loaded`` when ``loaded``; a plain ``loaded`` row is recorded as a
    frontend reports one (``record_loaded``). ``last_used`` is when it was recorded (``now`` of
    the verbs), ``last_probe_at`` a later probe (``record_probe_ok``), ``in_flight`` that many
    picks (``increment_in_flight``), ``probe_failures`` that many failed probes."""
    State = NodeModel.State
    recorded_at = resolve_now(last_used or last_probe_at)
    if state == State.LOADING or reserved_vram:
        node.refresh_from_db()
        row = NodeModel.objects.claim_loading(
            node.pk,
            model_name,
            slots=node.max_replicas_per_model,
            backend_type=backend_type or "",
            reserved_vram=reserved_vram,
            now=recorded_at,
        )
        assert row is not None and row.replica_index == replica_index, (
            f"claim_loading took index {row and row.replica_index} of {model_name!r}, not {replica_index}: "
            "claim the lower indexes first, or give the node more slots"
        )
        if model_opts_blob is not None:
            NodeModel.objects.set_replica_load_info(node.pk, model_name, replica_index, backend_type or "", model_opts_blob)
        if state == State.LOADED:
            assert NodeModel.objects.mark_loaded(row.pk, address=address, now=recorded_at)
        else:
            assert state == State.LOADING, f"no verb makes a {state!r} replica row"
    else:
        NodeModel.objects.record_loaded(
            node.pk,
            model_name,
            replica_index,
            address=address,
            backend_type=backend_type,
            opts_blob=model_opts_blob,
            now=recorded_at,
        )
    row = NodeModel.objects.get(node=node, model_name=model_name, replica_index=replica_index)
    if last_probe_at is not None and last_probe_at != recorded_at:
        assert NodeModel.objects.record_probe_ok(row.pk, now=last_probe_at)
    for _ in range(in_flight):
        assert NodeModel.objects.increment_in_flight(row.pk, now=recorded_at)
    for _ in range(probe_failures):
        assert NodeModel.objects.record_probe_unreachable(row.pk) is not None
    row.refresh_from_db()
    return row


def make_scheduling(model_name="llama", *, min_replicas=0, max_replicas=0, node_selector=None):
    return ModelSchedulingConfig.objects.upsert(
        model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=node_selector
    )


def make_load_job(model_name="llama", state=LoadJob.State.PENDING, *, runner="factory-runner:1", now=None):
    """A load job in ``state`` through the load-job verbs: ``claim_or_attach`` (pending),
    ``start`` (running), then ``succeed`` with a replica on a new node, or ``fail``; every
    timestamp at ``now``."""
    State = LoadJob.State
    job, created = LoadJob.objects.claim_or_attach(model_name, backend_type="x", opts_blob=b"x", now=now)
    assert created, f"{model_name!r} already has an active load job"
    if state != State.PENDING:
        assert LoadJob.objects.start(job.pk, runner, now=now)
    if state == State.SUCCEEDED:
        assert LoadJob.objects.succeed(job.pk, runner, make_replica(make_node(now=now), model_name), now=now)
    elif state == State.FAILED:
        assert LoadJob.objects.fail(job.pk, code="load_failed", message="LoadModel said no", runner=runner, now=now)
    else:
        assert state in (State.PENDING, State.RUNNING), f"no verb makes a {state!r} load job"
    return LoadJob.objects.get(pk=job.pk)


def trip_breaker(model_name, *, until, now):
    """A pass that found no capacity for ``model_name`` and tripped its circuit breaker: in
    cooldown until ``until`` (``record_unsatisfiable`` with a threshold of one pass)."""
    assert ModelSchedulingConfig.objects.record_unsatisfiable(model_name, threshold=1, cooldown=until - now, now=now)


def count_unsatisfiable(model_name, passes, *, now=None):
    """``passes`` passes that found no capacity for ``model_name``, below any breaker threshold."""
    for _ in range(passes):
        assert not ModelSchedulingConfig.objects.record_unsatisfiable(
            model_name, threshold=passes + 1, cooldown=timedelta(minutes=5), now=now
        )


def make_api_key(role="operator", *, name=None):
    """Create an API key; returns ``(api_key, plaintext)`` (the plaintext is the bearer token)."""
    from core.models import ApiKey

    return ApiKey.objects.create_key(name or f"{role}-{next(_sequence)}", role)
