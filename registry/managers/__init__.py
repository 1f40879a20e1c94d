"""Registry verbs: every state transition of the fleet's tables, written once.

API views, admin actions, the router and the reconciler all call these. Each verb's docstring
says what it returns, what it locks, and which concurrency idiom keeps it correct when several
web and qcluster processes run against one database:

- *conditional update*: one ``UPDATE ... WHERE <expected state>`` whose row count says whether
  the transition happened (no read-modify-write window);
- *upsert*: one ``INSERT ... ON CONFLICT ... DO UPDATE`` (``bulk_create(update_conflicts=True)``);
- *row lock*: ``select_for_update`` inside a short ``atomic()`` block, never across network I/O.

Every time-dependent verb takes ``now=`` so tests can pass a fixed clock.

The verbs are grouped by table: ``nodes`` (nodes and labels), ``replicas``, ``load_info``,
``scheduling``, ``load_jobs`` (and load failures) and ``leases``.
"""

from .labels import NodeLabelManager, TooManyLabels, max_labels_per_node
from .leases import LeaseManager
from .load_info import ModelLoadInfoManager
from .load_jobs import LoadFailureManager, LoadJobManager, ReapResult
from .nodes import (
    DrainedByOperator,
    NodeCredentialRequired,
    NodeManager,
    NodeQuerySet,
    NodeTokenRequired,
    Registration,
)
from .replicas import NodeModelManager, NodeModelQuerySet
from .scheduling import ModelSchedulingConfigManager, ModelSchedulingConfigQuerySet, validate_scheduling

__all__ = [
    "DrainedByOperator",
    "LeaseManager",
    "LoadFailureManager",
    "LoadJobManager",
    "ModelLoadInfoManager",
    "ModelSchedulingConfigManager",
    "ModelSchedulingConfigQuerySet",
    "NodeCredentialRequired",
    "NodeLabelManager",
    "NodeManager",
    "NodeModelManager",
    "NodeModelQuerySet",
    "NodeQuerySet",
    "NodeTokenRequired",
    "ReapResult",
    "Registration",
    "TooManyLabels",
    "max_labels_per_node",
    "validate_scheduling",
]
