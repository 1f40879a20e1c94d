"""Factories: each creates one object and the parents it needs, through the registry verbs."""

import itertools

from registry.models import ModelSchedulingConfig, Node, NodeModel

_sequence = itertools.count(1)
GIB = 1024**3


# The node token last issued per name: calling make_node again with a name re-registers that
# node, which needs its current token (as a restarted worker presents it).
_issued_tokens: dict[str, str] = {}


def make_node(*, name=None, status=Node.Status.HEALTHY, slots=1, total_vram=24 * GIB, labels=None, now=None, **extra):
    """Register a node (so auto-labels and the token exist) and bring it to the status wanted:
    ``pending`` by registering without auto-approval, ``draining`` through the drain verb
    (``drained_by``, an operator's by default), any other status forced."""
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
    if node.status != status and status == Node.Status.DRAINING:
        Node.objects.mark_draining(node.pk, by=drained_by)
        node.refresh_from_db()
    elif node.status != status:
        Node.objects.filter(pk=node.pk).update(status=status)
        node.refresh_from_db()
    node.token = registration.node_token
    return node


def make_replica(node, model_name="llama", replica_index=0, *, state=NodeModel.State.LOADED, in_flight=0, **fields):
    row = NodeModel.objects.create(
        node=node, model_name=model_name, replica_index=replica_index, state=state, in_flight=in_flight, **fields
    )
    return row


def make_scheduling(model_name="llama", *, min_replicas=0, max_replicas=0, node_selector=None):
    return ModelSchedulingConfig.objects.upsert(
        model_name, min_replicas=min_replicas, max_replicas=max_replicas, node_selector=node_selector
    )


def make_api_key(role="operator", *, name=None):
    """Create an API key; returns ``(api_key, plaintext)`` (the plaintext is the bearer token)."""
    from core.models import ApiKey

    return ApiKey.objects.create_key(name or f"{role}-{next(_sequence)}", role)
