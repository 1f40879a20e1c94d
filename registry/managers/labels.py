"""Label verbs: a node's labels, written under the node's row lock (labels are capacity too:
every write ends the models' cooldowns)."""

from __future__ import annotations

from django.conf import settings
from django.db import models, transaction

from ..labels import validate_labels
from .shared import capacity_changed, registry_model


class TooManyLabels(Exception):
    """A label write would leave a node with more than ``CONTROLPLANE_MAX_LABELS_PER_NODE``
    labels (every source counted: the worker's, the operator's and the auto-labels). Nothing
    was written."""

    def __init__(self, message: str, *, limit: int, count: int):
        super().__init__(message)
        self.limit = limit
        self.count = count


def max_labels_per_node() -> int:
    """The per-node bound on labels, every source counted (``CONTROLPLANE_MAX_LABELS_PER_NODE``)."""
    return int(settings.CONTROLPLANE_MAX_LABELS_PER_NODE)


class NodeLabelManager(models.Manager):
    """Label verbs. Every write takes the node's row lock first, so the writes of one node are
    serialised and the per-node bound (``CONTROLPLANE_MAX_LABELS_PER_NODE``, every source
    counted) is checked against what is really stored: a write that would exceed it raises
    ``TooManyLabels`` and is rolled back whole."""

    def _lock_node(self, node_id) -> None:
        list(registry_model("Node").objects.select_for_update().filter(pk=node_id).values_list("pk", flat=True))

    def _upsert(self, node_id, labels: dict[str, str], source: str) -> None:
        """Upsert on ``(node, key)``; callers hold the node's row lock."""
        if labels:
            self.bulk_create(
                [self.model(node_id=node_id, key=key, value=value, source=source) for key, value in labels.items()],
                update_conflicts=True,
                unique_fields=["node", "key"],
                update_fields=["value", "source"],
            )

    def _check_bound(self, node_id) -> None:
        limit = max_labels_per_node()
        count = self.filter(node_id=node_id).count()
        if count > limit:
            raise TooManyLabels(
                f"the node would carry {count} labels; at most {limit} are allowed per node "
                "(worker, operator and auto-labels together)",
                limit=limit,
                count=count,
            )

    def merge(self, node_id, labels: dict[str, str], *, clear_cooldowns: bool = True, source: str = "operator") -> int:
        """Set each key of ``labels`` on the node as ``source`` (an operator's by default),
        leaving other keys alone (upsert on ``(node, key)``). Returns the number of labels
        written; raises ``TooManyLabels`` (nothing written) past the per-node bound.
        Idiom: the node's row lock, then upsert and count in one transaction."""
        labels = validate_labels(labels)
        if not labels:
            return 0
        with transaction.atomic():
            self._lock_node(node_id)
            self._upsert(node_id, labels, source)
            self._check_bound(node_id)
            if clear_cooldowns:
                capacity_changed()
        return len(labels)

    def replace(self, node_id, labels: dict[str, str]) -> int:
        """Make the node's labels exactly ``labels``, all an operator's. Returns how many labels
        the node now carries; ``TooManyLabels`` past the bound (nothing written). Idiom: the
        node's row lock, then delete the other keys and upsert on ``(node, key)``, in one
        transaction."""
        labels = validate_labels(labels)
        with transaction.atomic():
            self._lock_node(node_id)
            self.filter(node_id=node_id).exclude(key__in=list(labels)).delete()
            self._upsert(node_id, labels, self.model.Source.OPERATOR)
            self._check_bound(node_id)
            capacity_changed()
        return len(labels)

    def apply_registration(self, node_id, worker_labels: dict[str, str], auto: dict[str, str]) -> None:
        """The labels of a (re-)registration, inside ``Node.objects.register``'s transaction
        (which holds the node's row lock): the worker's labels replace those it sent last time
        (so no caller grows a node's labels by registering again), except on keys an operator
        set, which keep the operator's value; the auto-labels are rewritten (one that no longer
        applies, such as ``gpu.vram`` of a node now reporting none, is dropped). ``TooManyLabels``
        past the bound (the caller's transaction rolls back). Returns nothing. Idiom: deletes
        and upserts on ``(node, key)`` inside the caller's transaction, under its row lock."""
        Source = self.model.Source
        worker_labels = validate_labels(worker_labels)
        held = set(self.filter(node_id=node_id, source=Source.OPERATOR).values_list("key", flat=True))
        own = {key: value for key, value in worker_labels.items() if key not in held and key not in auto}
        self.filter(node_id=node_id, source=Source.WORKER).exclude(key__in=list(own)).delete()
        self.filter(node_id=node_id, source=Source.AUTO).exclude(key__in=list(auto)).delete()
        self._upsert(node_id, own, Source.WORKER)
        self._upsert(node_id, auto, Source.AUTO)
        self._check_bound(node_id)

    def remove(self, node_id, key: str) -> bool:
        """Delete one label and end the models' cooldowns. Idiom: conditional delete by
        ``(node, key)``; False when the node had no such key."""
        deleted, _ = self.filter(node_id=node_id, key=key).delete()
        if deleted:
            capacity_changed()
        return deleted > 0

    def as_dict(self, node_id) -> dict[str, str]:
        """The node's labels as ``{key: value}`` (a read)."""
        return dict(self.filter(node_id=node_id).values_list("key", "value"))
