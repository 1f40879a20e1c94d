"""Place and load many replicas at once: the reconciler's scale-up.

:class:`Batch` is what a pass uses (through ``reconciler.reconcile.RouterScheduler``) for
every replica its scaling plans want. The sequence keeps the rules of
:func:`registry.loading.schedule_and_load`, batched and with the network calls in parallel:

1. **Read once per batch** (a fixed number of queries, whatever the number of replicas): the
   models' recipes, their scheduling configs, the candidate nodes with their load and free
   VRAM, every replica row of these models on them (which indexes are taken) and their recent
   load failures (backoff). Placement is then decided in memory with the one placement formula
   (``placement.choose_node``), the in-memory state updated after each choice so the next one
   sees it.
2. **Claim in the database before any network call**: ``NodeModel.objects.claim_loading``
   inserts the replica's ``loading`` row with its VRAM reservation, both or neither, in one
   short transaction. The unique ``(node, model, index)`` constraint and the conditional VRAM
   admission are what guarantee one loader per replica slot, across this pass, a route's cold
   load and any other process; the in-memory plan only proposes. A refused claim (someone else
   took the slot or the VRAM since the read) sends the model's remaining replicas to the
   re-reading path (step 4).
3. **Network, then record**: each claimed slot is a :class:`Load`: ``Load.network``
   (``StartBackend`` on the worker, ``LoadModel`` on the backend: ``loading.start_and_load``)
   touches no database and runs on a pool thread, no transaction and no row lock open while
   it waits on gRPC: the claim committed before, the record commits after. :func:`record_loads`
   records the outcomes of the loads that finished together through the verbs: the successful
   ones in one ``mark_loaded_many`` (with the per-replica recipe; a row removed or reassigned
   during its load is not marked), a failure with ``loading.abandon`` (the row and its
   reservation discarded by ``discard_loading``, the backend stopped, the node backed off).
4. **What the batch cannot decide** (not enough VRAM anywhere: eviction; a lost claim race)
   goes through :func:`load_one_by_one`: ``schedule_and_load`` one replica at a time, which
   re-reads the placement state and evicts when needed.

Who runs the loads: the reconciler claims under its reconcile lock (``Batch.claim``, at most as
many slots as its load pool takes) and hands the loads to its pool (``reconciler.load_pool``),
which runs and records them after the pass, outside the lock; :func:`load_many` (tests, direct
callers) runs the same steps itself, a slot claimed only when one of its ``concurrency``
threads is free for it, and returns when every load is recorded.

If the process dies mid-load (a qcluster SIGKILL), its threads die with it and nothing else is
lost than with one load at a time: the claimed ``loading`` rows stay with their reservations,
they count as replicas (no second loader takes their slot), and, no longer kept alive by their
pool (``NodeModel.objects.keep_loading``), a later pass's housekeeping discards each once it is
older than ``CONTROLPLANE_RECONCILE_STALE_LOADING_AFTER`` (event ``vram_reservation_released``);
a backend the worker started for one is then an orphan the pass stops. A claim whose network
call had not started when the scale-up budget ran out is discarded at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime

from proto import client

from . import loading, placement
from .clock import resolve_now
from .managers.shared import budget_used, free_vram
from .models import LoadFailure, ModelLoadInfo, ModelRevision, ModelSchedulingConfig, Node, NodeLabel, NodeModel

logger = logging.getLogger(__name__)

#: A pool thread's answer for a claim whose network call was not started (budget spent).
NOT_STARTED = object()


@dataclass(frozen=True)
class Want:
    """``count`` more replicas of ``model_name`` on ``candidate_node_ids`` (the planner's
    selector matches; the model's selector is applied again to the current labels)."""

    model_name: str
    count: int
    candidate_node_ids: tuple = ()


@dataclass
class ModelResult:
    """What :func:`load_many` did for one model: the ``loaded`` rows it added, the first error
    (a :class:`loading.RouterError`, or another exception of a load), and ``skipped``
    (``scale_up_budget``: replicas not started because the budget ran out)."""

    model_name: str
    loaded: list = field(default_factory=list)
    error: Exception | None = None
    skipped: str = ""
    wanted: int = 0

    @property
    def done(self) -> bool:
        """No further replica of this model is to be started."""
        return self.error is not None or bool(self.skipped)


@dataclass
class _Model:
    """One model's recipe and placement inputs, read once."""

    name: str
    backend_type: str
    opts_blob: bytes
    needed: int
    strategy: str
    candidate_ids: list
    from_replica_copy: bool  # the recipe came from a replica row: store it per model after a load
    disk_bytes: int = 0  # ModelSchedulingConfig.disk_bytes (0 = unknown)
    spread_by: str = ""  # ModelSchedulingConfig.spread_by (label key, "" = off)
    revision: int | None = None  # the config revision current before the recipe was read


def load_many(wants, *, concurrency: int, deadline: float | None = None, now: datetime | None = None, clock=None):
    """Place, start and load the replicas ``wants`` asks for and wait for them; returns
    ``{model_name: ModelResult}``. ``concurrency`` bounds the loads in flight; ``deadline`` (a
    ``clock()`` value, default ``time.monotonic``) is when no further load is started. See the
    module's docstring for the sequence and why it is safe; never raises for one model's
    failure (it is that model's ``error``), only for a failure of the database itself."""
    clock = clock or time.monotonic
    batch = Batch(wants, now=now)
    if not batch.models:
        return batch.results
    limit = max(1, int(concurrency))
    with ThreadPoolExecutor(max_workers=min(limit, len(batch.queue)), thread_name_prefix="load") as pool:
        running: dict = {}
        try:
            while batch.queue or running:
                # Slots are claimed only for the pool threads free to load them, in one batch.
                for load in batch.claim(limit - len(running), deadline=deadline, clock=clock):
                    running[pool.submit(load.network, deadline, clock)] = load
                if not running:
                    continue
                block = not batch.queue or len(running) >= limit
                done, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
                finished = [(running.pop(future), outcome_of(future)) for future in done]
                for result in record_loads(finished, now=now):  # those that finished together, at once
                    batch.merge(result)
        finally:
            # Only reached with loads still running on an error of this thread (the database):
            # their rows stay ``loading`` and the stale-loading sweep of a later pass takes them.
            for future in running:
                future.cancel()
    for name, left in batch.slow.items():
        if not batch.results[name].done:
            batch.merge(load_one_by_one(batch.models[name], left, deadline=deadline, clock=clock, now=now))
    return batch.results


def outcome_of(future) -> tuple:
    """``(value, error)`` of a finished ``Load.network`` future."""
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)


class Batch:
    """One scale-up's placement: the models and the placement state read once (step 1), the
    replicas still to place (round robin over the models), and the per-model results. ``claim``
    decides and claims (step 2) as many slots as it is asked for; the caller runs the returned
    :class:`Load` objects (step 3), where it wants: ``load_many`` on its own pool, the
    reconciler on its process's load pool (``reconciler.load_pool``), after its pass."""

    def __init__(self, wants, *, now: datetime | None = None):
        wants = [w for w in wants if w.count > 0]
        self.now = now
        self.results = {w.model_name: ModelResult(w.model_name, wanted=w.count) for w in wants}
        self.models = _read_models(wants, self.results) if wants else {}
        self.state = _State.read(self.models) if self.models else None
        self.queue = deque(_round_robin({name: self.results[name].wanted for name in self.models}))
        self.slow: dict[str, int] = defaultdict(int)  # model -> replicas left to schedule_and_load

    def claim(self, count: int, *, deadline: float | None = None, clock=None) -> list[Load]:
        """Decide and claim up to ``count`` slots (``claim_loading_many``, one transaction);
        returns their loads, to be run. A model whose decision fails gets its ``error``, one
        short of VRAM (or whose claim lost a race) goes to ``slow``; once ``deadline`` has
        passed the rest is ``skipped``."""
        clock = clock or time.monotonic
        picks = []
        while self.queue and len(picks) < count:
            name = self.queue.popleft()
            result = self.results[name]
            if result.done:
                continue
            if self.slow[name]:
                self.slow[name] += 1
                continue
            if deadline is not None and clock() >= deadline:
                result.skipped = "scale_up_budget"
                continue
            pick = _choose(self.models[name], self.state, self.now, result, self.slow)
            if pick is not None:
                picks.append(pick)
        return [
            Load(row, self.state.addresses[row.node_id], self.models[row.model_name], self.state)
            for row in _claim(picks, self.state, self.slow, self.now)
        ]

    def record_loads(self, finished) -> list[ModelResult]:
        """Record the claimed loads that finished (``(load, outcome)`` pairs) at once:
        :func:`record_loads`."""
        return record_loads(finished, now=self.now)

    def merge(self, result: ModelResult) -> None:
        """Add one load's (or the re-reading path's) result to its model's."""
        into = self.results[result.model_name]
        into.loaded.extend(result.loaded)
        into.error = into.error or result.error
        into.skipped = into.skipped or result.skipped


# --------------------------------------------------------------------------------------------
# Reading once
# --------------------------------------------------------------------------------------------


def _read_models(wants, results) -> dict[str, _Model]:
    """Current revisions, recipes and configs of every wanted model (three queries, plus one per
    model whose recipe only a replica row holds, and one per distinct non-empty node selector)."""
    names = [w.model_name for w in wants]
    # Read before the recipes: a change in between stamps the older number, and the rollout
    # replaces the replica once more, rather than never.
    revisions = ModelRevision.objects.head_numbers(names)
    infos = {
        info.model_name: info
        for info in ModelLoadInfo.objects.filter(model_name__in=names).only(
            "model_name", "backend_type", "model_opts_blob"
        )
    }
    configs = {
        row["model_name"]: row
        for row in ModelSchedulingConfig.objects.filter(model_name__in=names).values(
            "model_name", "node_selector", "placement", "disk_bytes", "spread_by"
        )
    }
    by_selector: dict[str, list] = defaultdict(list)
    models = {}
    for want in wants:
        info = infos.get(want.model_name)
        if info is None:
            try:  # rows written before the per-model table existed
                info = ModelLoadInfo.objects.for_model(want.model_name)
            except ModelLoadInfo.DoesNotExist:
                results[want.model_name].error = loading.NoLoadInfo(f"model {want.model_name!r} has no load info")
                continue
        blob = bytes(info.model_opts_blob)
        config = configs.get(want.model_name) or {}
        selector = config.get("node_selector") or {}
        models[want.model_name] = _Model(
            name=want.model_name,
            backend_type=info.backend_type or "",
            opts_blob=blob,
            needed=loading.estimate_vram(want.model_name, blob),
            strategy=config.get("placement") or placement.SPREAD,
            disk_bytes=config.get("disk_bytes") or 0,
            spread_by=config.get("spread_by") or "",
            candidate_ids=list(want.candidate_node_ids),
            from_replica_copy=info.source == ModelLoadInfo.Source.REPLICA,
            revision=revisions.get(want.model_name),
        )
        if selector:
            by_selector[json.dumps(selector, sort_keys=True)].append(want.model_name)
    for key, names_ in by_selector.items():
        ids = {node_id for name in names_ for node_id in models[name].candidate_ids}
        matching = set(Node.objects.candidates(json.loads(key), ids).values_list("pk", flat=True))
        for name in names_:
            models[name].candidate_ids = [i for i in models[name].candidate_ids if i in matching]
    return models


@dataclass
class _State:
    """The placement state of the candidate nodes, read once, updated in memory as replicas
    are claimed: per node a ``NodeCandidate`` without model-specific fields, per (node, model)
    the taken indexes and the backoff."""

    nodes: dict  # node id -> NodeCandidate (model_rows 0, no backoff)
    addresses: dict  # node id -> worker address
    indexes: dict  # (node id, model) -> set of taken replica indexes
    backoff: dict  # (node id, model) -> retry_after

    @classmethod
    def read(cls, models: dict[str, _Model]) -> _State:
        ids = {node_id for model in models.values() for node_id in model.candidate_ids}
        names = list(models)
        rows = (
            Node.objects.candidates(None, ids)
            .with_load()
            .annotate(free_vram_bytes=free_vram(), budget_used_bytes=budget_used())
            .values(
                "pk",
                "name",
                "address",
                "max_replicas_per_model",
                "free_vram_bytes",
                "in_flight_total",
                "replica_count",
                "worker_api",
                "vram_budget",
                "budget_used_bytes",
                "available_disk",
                "total_disk",
            )
        )
        nodes, addresses = {}, {}
        spread_keys = {model.spread_by for model in models.values() if model.spread_by}
        labels = defaultdict(list)
        for node_id, key, value in NodeLabel.objects.filter(node_id__in=list(ids), key__in=spread_keys).values_list(
            "node_id", "key", "value"
        ):
            labels[node_id].append((key, value))
        for row in rows:
            nodes[row["pk"]] = loading.candidate_from_row(row, sorted(labels.get(row["pk"], ())))
            addresses[row["pk"]] = row["address"]
        indexes = defaultdict(set)
        for node_id, name, index in NodeModel.objects.filter(model_name__in=names, node_id__in=list(nodes)).values_list(
            "node_id", "model_name", "replica_index"
        ):
            indexes[(node_id, name)].add(index)
        backoff = {
            (node_id, name): retry_after
            for node_id, name, retry_after in LoadFailure.objects.filter(
                model_name__in=names, node_id__in=list(nodes)
            ).values_list("node_id", "model_name", "retry_after")
        }
        return cls(nodes, addresses, indexes, backoff)

    def candidates(self, model: _Model) -> list:
        out = []
        for node_id in model.candidate_ids:
            node = self.nodes.get(node_id)
            if node is None:
                continue
            taken = self.indexes.get((node_id, model.name))
            retry = self.backoff.get((node_id, model.name))
            if taken or retry is not None:
                node = replace(node, model_rows=len(taken or ()), failure_backoff_until=retry)
            out.append(node)
        return out

    def free_index(self, node_id, model_name: str, slots: int) -> int | None:
        taken = self.indexes.get((node_id, model_name), ())
        return next((i for i in range(max(1, slots)) if i not in taken), None)

    def claimed(self, node_id, model_name: str, index: int, vram: int) -> None:
        self.indexes[(node_id, model_name)].add(index)
        node = self.nodes[node_id]
        self.nodes[node_id] = replace(
            node,
            replica_count=node.replica_count + 1,
            free_vram=node.free_vram - max(0, vram),
            budget_used=node.budget_used + max(0, vram),
        )

    def released(self, node_id, model_name: str, index: int, vram: int) -> None:
        self.indexes[(node_id, model_name)].discard(index)
        node = self.nodes.get(node_id)
        if node is not None:
            self.nodes[node_id] = replace(
                node,
                replica_count=max(0, node.replica_count - 1),
                free_vram=node.free_vram + max(0, vram),
                budget_used=max(0, node.budget_used - max(0, vram)),
            )


def _round_robin(counts: dict[str, int]) -> list[str]:
    """One replica of each model, then a second of each, ...: a budget that runs out leaves
    every model with its share, not the first model with all of it."""
    order, left = [], dict(counts)
    while left:
        for name in list(left):
            order.append(name)
            left[name] -= 1
            if left[name] <= 0:
                del left[name]
    return order


# --------------------------------------------------------------------------------------------
# Claim, load, record
# --------------------------------------------------------------------------------------------


def _choose(model: _Model, state: _State, now, result: ModelResult, slow) -> dict | None:
    """Choose a node in memory for one replica of ``model`` and note the slot as taken in the
    in-memory state; returns the claim to make, or None (``result.error`` set, or the model
    moved to the re-reading path ``slow``)."""
    decision = placement.choose_node(
        state.candidates(model),
        needed_vram=model.needed,
        needed_disk=model.disk_bytes,
        now=resolve_now(now),
        strategy=model.strategy,
        spread_by=model.spread_by,
    )
    if decision.node is None:
        if decision.reason in (placement.NO_CANDIDATES, placement.NO_WORKER_SERVICE):
            result.error = loading.NoMatchingNodes(f"no healthy backend node is a candidate for {model.name!r}")
        elif decision.reason == placement.NOT_ENOUGH_DISK:
            result.error = loading.CapacityExhausted(
                f"no candidate node with a free slot reports {model.disk_bytes} bytes of free disk for {model.name!r}"
            )
        elif decision.reason == placement.NO_FREE_SLOT:
            result.error = loading.CapacityExhausted(
                f"every candidate node holds its maximum replicas of {model.name!r}"
            )
        else:  # not enough VRAM: eviction, which schedule_and_load does
            slow[model.name] += 1
        return None
    node = decision.node
    index = state.free_index(node.node_id, model.name, node.slots)
    state.claimed(node.node_id, model.name, index, model.needed)
    return {
        "node_id": node.node_id,
        "model_name": model.name,
        "slots": node.slots,
        "backend_type": model.backend_type,
        "reserved_vram": model.needed,
        "index": index,
        "revision": model.revision,
    }


def _claim(picks: list[dict], state: _State, slow, now) -> list[NodeModel]:
    """Claim the picked slots in the database (``claim_loading_many``: one short transaction
    for the batch); a refused claim (another loader took the slot or the VRAM since the read)
    sends its model to the re-reading path."""
    rows = NodeModel.objects.claim_loading_many(picks, now=now) if picks else []
    claimed = []
    for pick, row in zip(picks, rows, strict=True):
        if row is None or row.replica_index != pick["index"]:
            state.released(pick["node_id"], pick["model_name"], pick["index"], pick["reserved_vram"])
            if row is not None:
                state.claimed(row.node_id, row.model_name, row.replica_index, pick["reserved_vram"])
        if row is None:
            slow[pick["model_name"]] += 1
            continue
        claimed.append(row)
    return claimed


@dataclass
class Load:
    """One claimed slot: ``network`` (no database: any thread) then ``record`` (the verbs)."""

    row: NodeModel
    worker_address: str
    model: _Model
    state: _State  # the batch's, updated when a failed load gives its slot back

    def network(self, deadline=None, clock=None):
        """StartBackend + LoadModel; the backend's address, or ``NOT_STARTED`` if the budget
        ran out while the load was queued."""
        if deadline is not None and (clock or time.monotonic)() >= deadline:
            return NOT_STARTED
        return loading.start_and_load(self.row, self.worker_address, self.model.opts_blob)

    def record(self, outcome: tuple, *, now=None) -> ModelResult:
        """Record ``outcome`` (``(value, error)`` of ``network``) through the verbs: the row
        ``loaded`` (``mark_loaded_many``), or discarded (not started), or abandoned (the load
        failed: reservation released, backend stopped, node backed off). Returns this load's
        result for its model. (:func:`record_loads` records several at once.)"""
        return record_loads([(self, outcome)], now=now)[0]


def record_loads(finished, *, now=None) -> list[ModelResult]:
    """Record several finished loads at once (``Load.record`` for each, in one write where it
    can): ``finished`` is a list of ``(load, outcome)``; returns one result per load, in order.
    The successful ones are marked ``loaded`` together, first, in one ``mark_loaded_many``
    (whatever their number); a row removed or reassigned during its load is not among the ids
    it returns and is reported as removed, as alone. Failed and unstarted loads (rare) are
    recorded one by one after them (the reconciler's pool records a failed load alone, on its
    own thread: ``loading.abandon`` stops its backend, a network call)."""
    results = [ModelResult(load.row.model_name) for load, _ in finished]
    succeeded = [
        (load, value, result)
        for (load, (value, error)), result in zip(finished, results, strict=True)
        if error is None and value is not NOT_STARTED
    ]
    if succeeded:  # first: a failure's record below (network, database) cannot hold them up
        marked = NodeModel.objects.mark_loaded_many(
            {load.row.pk: (value, load.model.opts_blob) for load, value, _ in succeeded}, now=now
        )
        for load, value, result in succeeded:
            _record_loaded(load.row, value, load.row.pk in marked, load.model, result, load.state, now)
    for (load, (value, error)), result in zip(finished, results, strict=True):
        row, model, state = load.row, load.model, load.state
        if error is None and value is NOT_STARTED:
            NodeModel.objects.discard_loading(row.pk)
            state.released(row.node_id, row.model_name, row.replica_index, model.needed)
            result.skipped = "scale_up_budget"
        elif error is not None:
            # A StartBackend that never got a connection never reached the worker: nothing to stop.
            stop_at = "" if isinstance(error, client.NotConnected) else load.worker_address
            loading.abandon(row, stop_at, str(error), now)
            state.released(row.node_id, row.model_name, row.replica_index, model.needed)
            if isinstance(error, client.GrpcCallError):
                error = loading.LoadFailed(f"loading {row.model_name!r} on node {row.node_id} failed: {error}")
            result.error = error
    return results


def _record_loaded(row: NodeModel, address: str, marked: bool, model: _Model, result: ModelResult, state, now) -> None:
    if not marked:
        # Removed during the load (its node went offline or re-registered): not ours any more.
        result.error = loading.LoadFailed(
            f"replica row of {row.model_name!r} on node {row.node_id} was removed during the load"
        )
        return
    row.state, row.address, row.model_opts_blob = NodeModel.State.LOADED, address, model.opts_blob
    result.loaded.append(row)
    key = (row.node_id, row.model_name)
    if state.backoff.pop(key, None) is not None:
        try:
            LoadFailure.objects.clear(row.model_name, row.node_id)
        except Exception:  # best effort: a stale backoff only costs a less preferred placement
            logger.warning("could not clear load failures of %s on %s", row.model_name, row.node_id, exc_info=True)
    if model.from_replica_copy:
        # The recipe came from a replica row (written before the per-model table existed): keep
        # it per model now. A recipe read from the per-model row is not written back: a newer one
        # a frontend stored meanwhile must win.
        try:
            ModelLoadInfo.objects.upsert(model.name, model.backend_type, model.opts_blob, now=now)
            model.from_replica_copy = False
        except Exception:
            logger.warning("could not write the per-model load info of %s", model.name, exc_info=True)
    logger.info("loaded %s replica %d on node %s at %s", row.model_name, row.replica_index, row.node_id, address)


def load_one_by_one(model: _Model, count: int, *, deadline=None, clock=None, now=None) -> ModelResult:
    """The replicas a batch could not place (step 4): one ``schedule_and_load`` each (a fresh
    read, eviction when VRAM is short), stopping at the first failure or when the budget is
    spent. Database and network on the calling thread."""
    clock = clock or time.monotonic
    result = ModelResult(model.name)
    for _ in range(count):
        if result.done:
            break
        if deadline is not None and clock() >= deadline:
            result.skipped = "scale_up_budget"
            break
        try:
            row = loading.schedule_and_load(model.name, model.candidate_ids, now=now)
        except Exception as exc:  # that model's failure, reported like the batch's
            result.error = exc
            break
        result.loaded.append(row)
    return result
