"""The fleet's admin, built for diagnosis: every page reads annotated querysets (no query per
row) and every button calls a registry verb; nothing here writes a status, a slot count or a
replica row itself.

One module per page family, each registering its models when imported here: ``nodes``,
``replicas``, ``scheduling`` (model scheduling configs and load info), ``jobs`` (load jobs,
leases, load failures); ``display`` and ``base`` hold what they share. What needs the
reconciler (the fleet dashboard, a model's conditions and events, "Reconcile now") lives in
``reconciler/admin/``, which also registers ``ModelSchedulingConfig``'s admin.
"""

from . import jobs, nodes, replicas, scheduling

__all__ = ["jobs", "nodes", "replicas", "scheduling"]
