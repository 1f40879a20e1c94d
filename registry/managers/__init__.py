"""Registry verbs: every state transition of the fleet's tables, written once.

API views, admin actions, the router and the reconciler all call these; nothing else writes a
registry table (``tests/test_write_discipline.py`` checks it). Each writing verb's docstring
says what it returns and which concurrency idiom keeps it correct when several web and qcluster
processes run against one database:

- *conditional update* (or *conditional delete*): one ``UPDATE``/``DELETE ... WHERE <expected
  state>`` whose row count says whether the transition happened (no read-modify-write window);
- *upsert*: one ``INSERT ... ON CONFLICT ... DO UPDATE`` (``bulk_create(update_conflicts=True)``);
- *insert guarded by a unique constraint*: the database refuses the second of two racing
  inserts (``IntegrityError``), and the loser re-reads or re-plans;
- *row lock*: ``select_for_update`` inside a short ``atomic()`` block, never across network I/O.

Every time-dependent verb takes ``now=`` so tests can pass a fixed clock
(``registry.clock.resolve_now``).

Modules, by table:

- ``nodes``: registration, heartbeats, status transitions (approve, healthy/unhealthy, drain,
  resume, offline), deregistration;
- ``capacity`` (mixed into ``Node.objects``): replica slots (operator override and reset) and
  VRAM admission (reserve, release, credit);
- ``labels``: a node's labels under its row lock, and the per-node bound;
- ``replicas``: replica rows: a reported loaded replica (``record_loaded``, ``report_loaded``), claim a ``loading`` slot with its VRAM
  (``claim_loading``), ``mark_loaded``, ``discard_loading``, ``remove_replica``,
  ``remove_if_idle``, ``forget_node_replicas``, the in-flight counter
  (``increment_in_flight``/``decrement_in_flight``, the only writers of it besides the lease
  sweep), the warm pick and probe results;
- ``load_info``: the per-model load recipe;
- ``scheduling``: scheduling configs and the unsatisfiable circuit breaker;
- ``revisions``: numbered config revisions of a model (every load-info or scheduling change),
  and rollback;
- ``load_jobs``: one durable cold load per model, and the failed-load backoff;
- ``leases``: a frontend's hold on one replica for one request;
- ``shared``: what several of them use (lazy model lookup, the capacity event, free-VRAM and
  per-node replica-row expressions); no verbs.
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
from .revisions import ModelRevisionManager
from .scheduling import ModelSchedulingConfigManager, ModelSchedulingConfigQuerySet, validate_scheduling

__all__ = [
    "DrainedByOperator",
    "LeaseManager",
    "LoadFailureManager",
    "LoadJobManager",
    "ModelLoadInfoManager",
    "ModelRevisionManager",
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
