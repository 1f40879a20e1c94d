"""The reconciler's view of the fleet: plain views read in a fixed number of queries.

``take_snapshot`` runs the same seven queries whether the fleet has one model or ten thousand
(nodes, labels, replica rows, scheduling configs, load-info names, conditions, revisions). Everything
downstream (``planning.py``) is pure and works on these objects, so it is unit-tested without a
database and can never issue a query per model or per node.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, partial
from itertools import chain
from operator import itemgetter
from types import MappingProxyType
from typing import NamedTuple
from uuid import UUID

from django.db.models import BooleanField, TextField, Value
from django.db.models.functions import Cast, Coalesce, Length
from django.db.models.lookups import GreaterThan
from django.utils import timezone

from registry import floor_schedule, rules
from registry.labels import selector_matches
from registry.models import ModelLoadInfo, ModelRevision, ModelSchedulingConfig, Node, NodeLabel, NodeModel
from registry.placement import serves_worker_api

from .models import ModelCondition


def _empty() -> Mapping:
    return MappingProxyType({})


@dataclass(frozen=True)
class NodeView:
    id: UUID
    name: str
    status: str
    node_type: str = Node.NodeType.BACKEND
    drained_by: str = Node.DrainedBy.NONE
    address: str = ""
    last_heartbeat: datetime | None = None
    # The reconciler's observation (``Node.objects.observe_heartbeats``): the last_heartbeat
    # value it last saw, and when (its own clock) it saw that value change.
    heartbeat_seen: datetime | None = None
    heartbeat_seen_at: datetime | None = None
    slots: int = 1
    reserved_vram: int = 0
    labels: Mapping[str, str] = field(default_factory=_empty)
    worker_api: str = Node.WorkerApi.AVAILABLE
    worker_api_checked_at: datetime | None = None
    # Consecutive passes whose ListBackends this node's worker has not answered while the
    # node heartbeated (``UnansweredListing``; 0 outside such a streak), and the heartbeat
    # value the streak last counted.
    unanswered_listings: int = 0
    unanswered_heartbeat: datetime | None = None

    @property
    def schedulable(self) -> bool:
        """Healthy backend nodes are the only ones routed to (their replicas count as ready)."""
        return Node.schedulable_with(self.status, self.node_type)

    @property
    def placeable(self) -> bool:
        """Schedulable and answering the worker gRPC service: the only nodes scaled up on
        (``NodeQuerySet.placeable``; a LocalAI worker is kept alive but never sent
        StartBackend)."""
        return self.schedulable and serves_worker_api(self.worker_api)

    @property
    def healthy(self) -> bool:
        return self.status == Node.Status.HEALTHY


class ReplicaView(NamedTuple):
    """One replica row. A named tuple, not a dataclass: a pass builds one per row of the fleet,
    straight from a ``values_list`` tuple (``REPLICA_COLUMNS``, in field order)."""

    id: int
    node_id: UUID
    model_name: str
    replica_index: int = 0
    state: str = NodeModel.State.LOADED
    address: str = ""
    in_flight: int = 0
    last_used: datetime | None = None
    probe_failures: int = 0
    last_probe_at: datetime | None = None
    reserved_vram: int = 0
    has_blob: bool = False
    updated_at: datetime | None = None
    # Written by every registry verb that inserts the row or changes its state (the writer's
    # ``now``); None only on rows written before the column existed.
    state_changed_at: datetime | None = None
    # The config revision it was loaded from (None: unknown, never rolled), and since when the
    # rollout has been draining it (None: routable).
    revision: int | None = None
    draining_since: datetime | None = None

    @property
    def loaded(self) -> bool:
        return self.state == NodeModel.State.LOADED

    @property
    def loading(self) -> bool:
        return self.state == NodeModel.State.LOADING

    @property
    def key(self) -> tuple[str, int]:
        return (self.model_name, self.replica_index)


_NO_SELECTOR: Mapping[str, str] = MappingProxyType({})

_LOADED, _LOADING = NodeModel.State.LOADED.value, NodeModel.State.LOADING.value
# Fields of ``ReplicaView`` rows, and of ``ModelCondition`` rows as ``take_snapshot`` reads them.
_ID, _MODEL_NAME, _MODEL_AND_INDEX = itemgetter(0), itemgetter(2), itemgetter(2, 3)
_CONDITION_KEY, _CONDITION_VALUE = itemgetter(0, 1), itemgetter(2, 3, 4)


class ConditionValue(NamedTuple):
    """A stored condition as the snapshot reads it: compared with a plan's desired value as a
    plain tuple (``(status, reason, message)``), with no object built per condition."""

    status: bool
    reason: str
    message: str = ""


class ConfigView(NamedTuple):
    """One model's scheduling config (a named tuple: one per model per pass)."""

    model_name: str
    min_replicas: int = 0
    max_replicas: int = 0
    node_selector: Mapping[str, str] = _NO_SELECTOR
    unsatisfiable_until: datetime | None = None
    unsatisfiable_ticks: int = 0
    # Load-aware autoscaling (``registry.autoscale``): the settings, then the state the last
    # pass recorded (``ModelSchedulingConfig.objects.record_autoscale``).
    target: int | None = None
    upscale_delay_s: int = 30
    downscale_delay_s: int = 600
    load_avg: float = 0.0
    load_sampled_at: datetime | None = None
    desired_replicas: int | None = None
    desired_since: datetime | None = None
    waiting_at_zero: int = 0
    load_busy_at: datetime | None = None
    # Set when an open window of the model's floor schedule (``registry.floor_schedule``)
    # raised ``min_replicas`` above the stored one for this pass: the window's floor (which
    # ``min_replicas`` then holds), so messages can say why.
    scheduled_floor: int | None = None

    @property
    def autoscaled(self) -> bool:
        return rules.is_autoscaled(self.min_replicas, self.max_replicas, self.target)

    @property
    def floor(self) -> int:
        """Replicas a model keeps even when idle (``registry.rules.replica_floor``)."""
        return rules.replica_floor(self.min_replicas, self.max_replicas, self.target)


@dataclass(frozen=True)
class Snapshot:
    """Everything one pass plans from. Derived indexes are computed once, in memory."""

    taken_at: datetime
    nodes: Mapping[UUID, NodeView] = field(default_factory=_empty)
    replicas: tuple[ReplicaView, ...] = ()
    configs: Mapping[str, ConfigView] = field(default_factory=_empty)
    load_info_models: frozenset[str] = frozenset()
    # {(model_name, type): ConditionValue(status, reason, message)}
    conditions: Mapping[tuple[str, str], ConditionValue] = field(default_factory=dict)
    # {(model_name, revision number): template digest} over every revision, and {model_name:
    # current revision number}: what the rollout compares replicas with.
    templates: Mapping[tuple[str, int], str] = field(default_factory=_empty)
    current_revisions: Mapping[str, int] = field(default_factory=_empty)

    def current_revision(self, model_name: str) -> int | None:
        return self.current_revisions.get(model_name)

    def is_outdated(self, replica: ReplicaView) -> bool:
        """Loaded from a revision whose template (recipe + node selector) is not the current
        one's. A replica of unknown revision, or of a model without revisions, is not."""
        if replica.revision is None:
            return False
        current = self.current_revisions.get(replica.model_name)
        if current is None or replica.revision == current:
            return False
        mine = self.templates.get((replica.model_name, replica.revision))
        return mine is None or mine != self.templates.get((replica.model_name, current))

    @cached_property
    def _outdated_models(self) -> frozenset[str]:
        if not self.current_revisions:
            return frozenset()
        # One pass over the rows; only a row whose revision is not the current number (rare:
        # a rollout in progress) has its template looked up.
        current = self.current_revisions.get
        return frozenset(
            r.model_name
            for r in self.replicas
            if r.revision is not None and r.revision != current(r.model_name) and self.is_outdated(r)
        )

    @cached_property
    def rollout_models(self) -> frozenset[str]:
        """Models with an outdated replica or a draining one: the only ones the rollout plans."""
        draining = frozenset(r.model_name for r in self.replicas if r.draining_since is not None)
        return self._outdated_models | draining if draining else self._outdated_models

    def rolling_out(self, model_name: str) -> bool:
        """Whether any replica row of the model is outdated (``is_outdated``)."""
        return model_name in self._outdated_models

    def rollout_protected(self, model_name: str) -> frozenset[int]:
        """While a model rolls out, the ids of its replicas at the current template: the idle
        scale-down takes outdated replicas only, so it never undoes the rollout's surge."""
        if model_name not in self._outdated_models:
            return frozenset()
        rows = self.replicas_by_model.get(model_name, ())
        return frozenset(r.id for r in rows if not self.is_outdated(r))

    @cached_property
    def replicas_by_model(self) -> Mapping[str, tuple[ReplicaView, ...]]:
        grouped = defaultdict(list)
        for replica in self.replicas:
            grouped[replica.model_name].append(replica)
        return {name: tuple(rows) for name, rows in grouped.items()}

    @cached_property
    def replicas_by_node(self) -> Mapping[UUID, tuple[ReplicaView, ...]]:
        grouped = defaultdict(list)
        for replica in self.replicas:
            grouped[replica.node_id].append(replica)
        return {node_id: tuple(rows) for node_id, rows in grouped.items()}

    @cached_property
    def model_names(self) -> tuple[str, ...]:
        """Every model known from scheduling configs, load info or replica rows, sorted."""
        return tuple(sorted({*self.configs, *self.load_info_models, *map(_MODEL_NAME, self.replicas)}))

    def config_for(self, model_name: str) -> ConfigView:
        """The model's scheduling config, or the not-autoscaled default."""
        return self.configs.get(model_name) or ConfigView(model_name)

    @cached_property
    def _models_with_blob_rows(self) -> frozenset[str]:
        return frozenset(r.model_name for r in self.replicas if r.state == _LOADED and r.has_blob)

    def has_load_info(self, model_name: str) -> bool:
        """Mirrors ``ModelLoadInfo.objects.for_model``: the per-model row, else a loaded replica
        row carrying a blob. The apply step still asks ``for_model`` before scheduling."""
        return model_name in self.load_info_models or model_name in self._models_with_blob_rows

    @cached_property
    def _placeable_by_name(self) -> tuple[NodeView, ...]:
        return tuple(node for node in sorted(self.nodes.values(), key=lambda n: n.name) if node.placeable)

    @cached_property
    def _candidates_by_selector(self) -> dict:
        return {}

    def candidates(self, selector: Mapping[str, str]) -> tuple[NodeView, ...]:
        """Placeable nodes carrying every label of ``selector``, in name order.

        Memoised per selector: most models share a handful of selectors (usually ``{}``), so a
        pass costs O(nodes x distinct selectors), not O(nodes x models).
        """
        return self.candidates_and_ids(selector)[0]

    def candidate_ids(self, selector: Mapping[str, str]) -> tuple[UUID, ...]:
        """The ids of ``candidates(selector)``, memoised with them."""
        return self.candidates_and_ids(selector)[1]

    def candidates_and_ids(self, selector: Mapping[str, str]) -> tuple[tuple[NodeView, ...], tuple[UUID, ...]]:
        """``(candidates(selector), candidate_ids(selector))`` in one memoised lookup."""
        key = tuple(sorted(selector.items())) if selector else ()
        found = self._candidates_by_selector.get(key)
        if found is None:
            wanted = dict(selector)
            nodes = tuple(node for node in self._placeable_by_name if selector_matches(wanted, node.labels))
            found = self._candidates_by_selector[key] = (nodes, tuple(node.id for node in nodes))
        return found

    @cached_property
    def _routable(self) -> Mapping[str, tuple[tuple[ReplicaView, ...], tuple[ReplicaView, ...]]]:
        """``{model: (ready rows, loading rows)}`` on schedulable nodes, in one pass over the rows.
        A replica the rollout is draining is neither: it takes no new route."""
        schedulable = {node_id for node_id, node in self.nodes.items() if node.schedulable}
        ready, loading = defaultdict(list), defaultdict(list)
        for replica in self.replicas:
            if replica.node_id in schedulable and replica.draining_since is None:
                state = replica.state
                if state == _LOADED:
                    ready[replica.model_name].append(replica)
                elif state == _LOADING:
                    loading[replica.model_name].append(replica)
        return {name: (tuple(ready.get(name, ())), tuple(loading.get(name, ()))) for name in ready.keys() | loading}

    def routable(self, model_name: str) -> tuple[tuple[ReplicaView, ...], tuple[ReplicaView, ...]]:
        """``(ready(model_name), loading(model_name))`` in one lookup."""
        return self._routable.get(model_name, _NOTHING_ROUTABLE)

    def ready(self, model_name: str) -> tuple[ReplicaView, ...]:
        """Loaded rows on schedulable nodes: the routable replicas."""
        return self._routable.get(model_name, _NOTHING_ROUTABLE)[0]

    def loading(self, model_name: str) -> tuple[ReplicaView, ...]:
        """Rows still loading on schedulable nodes (a scale-up in progress)."""
        return self._routable.get(model_name, _NOTHING_ROUTABLE)[1]


_NOTHING_ROUTABLE: tuple[tuple, tuple] = ((), ())


NODE_COLUMNS = (
    "id",
    "name",
    "status",
    "node_type",
    "drained_by",
    "address",
    "last_heartbeat",
    "heartbeat_seen",
    "heartbeat_seen_at",
    "max_replicas_per_model",
    "reserved_vram",
    "worker_api",
    "worker_api_checked_at",
    "unanswered_listing__failures",
    "unanswered_listing__counted_heartbeat",
)

# The columns read for ``ReplicaView`` are its fields, in order (``has_blob`` is computed by the
# database, ``_HAS_BLOB``): each row tuple becomes a view as it is (``_as_views``).
REPLICA_COLUMNS = ReplicaView._fields

# The node selector is read as its JSON text: most models share a handful of selectors
# (usually ``{}``), each decoded once (``_selector_view``), not once per model.
CONFIG_COLUMNS = (
    "model_name",
    "min_replicas",
    "max_replicas",
    "selector_text",
    "unsatisfiable_until",
    "unsatisfiable_ticks",
    "target_in_flight_per_replica",
    "upscale_delay_s",
    "downscale_delay_s",
    "load_avg",
    "load_sampled_at",
    "desired_replicas",
    "desired_since",
    "waiting_at_zero",
    "load_busy_at",
    "schedule_text",
)


def _selector_view(text: str | None) -> Mapping[str, str]:
    selector = json.loads(text) if text else None
    return MappingProxyType(dict(selector)) if selector else _NO_SELECTOR


def take_snapshot(*, now: datetime | None = None) -> Snapshot:
    """Read the fleet in seven queries (pinned by a test), whatever its size.

    Each table is read as ``values_list`` tuples and turned into views in one pass (no model
    instances, no per-row dicts): a pass reads every replica row, config and condition of the
    fleet, so per-row overhead is what its cost is made of.
    """
    labels = defaultdict(dict)
    for node_id, key, value in NodeLabel.objects.values_list("node_id", "key", "value"):
        labels[node_id][key] = value
    nodes = {}
    for (
        node_id,
        name,
        status,
        node_type,
        drained_by,
        address,
        last_heartbeat,
        heartbeat_seen,
        heartbeat_seen_at,
        slots,
        reserved_vram,
        worker_api,
        worker_api_checked_at,
        unanswered_listings,
        unanswered_heartbeat,
    ) in Node.objects.order_by("name").values_list(*NODE_COLUMNS):
        nodes[node_id] = NodeView(
            id=node_id,
            name=name,
            status=status,
            node_type=node_type,
            drained_by=drained_by,
            address=address,
            last_heartbeat=last_heartbeat,
            heartbeat_seen=heartbeat_seen,
            heartbeat_seen_at=heartbeat_seen_at,
            slots=slots,
            reserved_vram=reserved_vram,
            labels=MappingProxyType(labels.get(node_id, {})),
            worker_api=worker_api,
            worker_api_checked_at=worker_api_checked_at,
            unanswered_listings=unanswered_listings or 0,
            unanswered_heartbeat=unanswered_heartbeat,
        )
    replicas = tuple(replica_views(NodeModel.objects.all()))
    selectors: dict[str | None, Mapping[str, str]] = {}  # JSON text -> view: decoded once per distinct text
    configs = {}
    taken_at = now or timezone.now()
    for row in ModelSchedulingConfig.objects.annotate(
        selector_text=Cast("node_selector", TextField()), schedule_text=Cast("floor_schedule", TextField())
    ).values_list(*CONFIG_COLUMNS):
        selector_text = row[3]
        selector = selectors.get(selector_text)
        if selector is None:
            selector = selectors[selector_text] = _selector_view(selector_text)
        view = ConfigView(*row[:3], selector, *row[4:-1])
        # The floor in force now: a window of the schedule may raise it (parsed once per
        # distinct text; most configs have none, ``"[]"``).
        windows = floor_schedule.parse_text(row[-1])
        if windows:
            floor = floor_schedule.effective_floor(view.min_replicas, windows, taken_at, max_replicas=view.max_replicas)
            if floor != view.min_replicas:
                view = view._replace(min_replicas=floor, scheduled_floor=floor)
        configs[row[0]] = view
    load_info_models = frozenset(ModelLoadInfo.objects.values_list("model_name", flat=True))
    # {(model, type): (status, reason, message)}, one entry per condition row of the fleet:
    # keys and values are sliced from the row tuples in C.
    rows = list(ModelCondition.objects.values_list("model_name", "type", "status", "reason", "message"))
    conditions = dict(
        zip(map(_CONDITION_KEY, rows), _as_views(ConditionValue, map(_CONDITION_VALUE, rows)), strict=True)
    )
    templates, current_revisions = {}, {}
    for name, number, digest, is_current in ModelRevision.objects.values_list(
        "model_name", "number", "template_digest", "is_current"
    ):
        templates[(name, number)] = digest
        if is_current:
            current_revisions[name] = number
    return Snapshot(
        taken_at=taken_at,
        nodes=MappingProxyType(nodes),
        replicas=replicas,
        configs=MappingProxyType(configs),
        load_info_models=load_info_models,
        conditions=conditions,
        templates=MappingProxyType(templates),
        current_revisions=MappingProxyType(current_revisions),
    )


# Computed by the database (a boolean needs no per-row conversion, unlike a length).
_HAS_BLOB = Coalesce(GreaterThan(Length("model_opts_blob"), 0), Value(False), output_field=BooleanField())


def read_replicas(queryset):
    """Replica rows as ``REPLICA_COLUMNS`` tuples (one query), with whether the row carries a
    blob instead of the blob itself."""
    return (
        queryset.annotate(has_blob=_HAS_BLOB)
        .order_by("model_name", "node_id", "replica_index")
        .values_list(*REPLICA_COLUMNS)
    )


def _as_views(view: type[NamedTuple], rows) -> list:
    """Row tuples whose columns are ``view``'s fields in order, as ``view`` instances: built in
    C (``tuple.__new__``), no Python call per row."""
    return list(map(partial(tuple.__new__, view), rows))


def replica_views(queryset) -> list[ReplicaView]:
    """``read_replicas`` as ``ReplicaView`` objects."""
    return _as_views(ReplicaView, read_replicas(queryset))


def replica_states(queryset) -> list[ReplicaView]:
    """The rows' identity and state only (one query): what ``plan_worker_reconciliation``
    compares with a worker's listing. The other fields keep their defaults."""
    return [
        ReplicaView(id_, node, model, index, state, state_changed_at=changed)
        for id_, node, model, index, state, changed in queryset.order_by(
            "model_name", "node_id", "replica_index"
        ).values_list("id", "node_id", "model_name", "replica_index", "state", "state_changed_at")
    ]


def rows_now(snapshot: Snapshot, node_ids: list, *, refresh: Collection[int] = ()) -> dict[UUID, list[ReplicaView]]:
    """The replica rows of ``node_ids`` as they are now, by node (each in model, index order).

    A row keeps its node, model and replica index for life, so a row the snapshot holds and
    that still exists is the snapshot's copy, unless its id is in ``refresh`` (its state may
    matter). Only the ids are re-read for every row (one query); rows the snapshot does not
    hold and the ``refresh`` ones are read in full (``replica_states``, a second query, only
    when there are any), so a pass in which nothing changed re-reads one integer per row.
    """
    current = set(NodeModel.objects.filter(node_id__in=node_ids).values_list("id", flat=True))
    held_rows = [snapshot.replicas_by_node.get(node_id, ()) for node_id in node_ids]
    held = set(map(_ID, chain.from_iterable(held_rows)))
    reread = (current - held) | current.intersection(refresh)
    if not reread and current == held:
        # Nothing written since the snapshot (a steady pass): its rows as they are, no row
        # may be removed (a candidate is in ``refresh``), so their order does not matter.
        return {node_id: list(rows) for node_id, rows in zip(node_ids, held_rows, strict=True) if rows}
    rows = [row for node_rows in held_rows for row in node_rows if row.id in current and row.id not in reread]
    if reread:
        rows.extend(replica_states(NodeModel.objects.filter(id__in=reread)))
    rows.sort(key=_MODEL_AND_INDEX)
    by_node: dict[UUID, list[ReplicaView]] = {}
    for row in rows:
        found = by_node.get(row.node_id)
        if found is None:
            by_node[row.node_id] = [row]
        else:
            found.append(row)
    return by_node
