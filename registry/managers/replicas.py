"""Replica-row verbs: report, claim a loading slot, load outcome, removal, in-flight accounting,
warm pick, probes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import IntegrityError, connections, models, transaction
from django.db.models import Case, F, Value, When
from django.db.models.functions import Greatest

from .. import affinity
from ..clock import resolve_now
from .shared import free_vram, registry_model, retry_deadlock_victim

if TYPE_CHECKING:  # pragma: no cover
    from ..models import NodeModel


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Replica rows
# --------------------------------------------------------------------------------------------


class NodeModelQuerySet(models.QuerySet):
    def for_model(self, model_name: str):
        return self.filter(model_name=model_name)

    def loaded(self):
        return self.filter(state=self.model.State.LOADED)

    def loading(self):
        return self.filter(state=self.model.State.LOADING)

    def on_schedulable_nodes(self):
        """Rows on healthy backend nodes: the only replicas that are routable ("ready")."""
        return self.filter(registry_model("Node").schedulable_filter(via="node__"))

    def ready(self):
        return self.loaded().on_schedulable_nodes()


class NodeModelManager(models.Manager.from_queryset(NodeModelQuerySet)):
    def record_loaded(
        self,
        node_id,
        model_name: str,
        replica_index: int,
        *,
        address: str = "",
        backend_type: str | None = None,
        opts_blob: bytes | None = None,
        revision: int | None = None,
        now: datetime | None = None,
    ) -> NodeModel:
        """Record the replica of ``(node, model, replica_index)`` as ``loaded`` at ``address``
        (a replica someone else loaded: a frontend's report), keeping the row's id if it exists.

        Only ``loaded``: a ``loading`` row exists only with its VRAM reservation, which
        ``claim_loading`` takes. Idiom: upsert on the unique triple. ``backend_type``/
        ``opts_blob`` are only written when given, so a re-report without them keeps the
        per-replica load info. A (re-)recording sets ``state_changed_at`` and the probe stamp
        to ``now``; ``last_used`` is set on insert only (use is what leases record).
        ``revision`` (the config revision it was loaded from) is written when given.
        """
        if not model_name:
            raise ValueError("model name must not be empty")
        now = resolve_now(now)
        row = self.model(
            node_id=node_id,
            model_name=model_name,
            replica_index=replica_index,
            address=address,
            state=self.model.State.LOADED,
            last_used=now,
            last_probe_at=now,
            state_changed_at=now,
            backend_type=backend_type or "",
            model_opts_blob=bytes(opts_blob) if opts_blob is not None else None,
            revision=revision,
        )
        update_fields = ["address", "state", "updated_at", "last_probe_at", "probe_failures", "state_changed_at"]
        if revision is not None:
            update_fields.append("revision")
        if backend_type is not None:
            update_fields.append("backend_type")
        if opts_blob is not None:
            update_fields.append("model_opts_blob")
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["node", "model_name", "replica_index"],
            update_fields=update_fields,
        )
        return row

    def set_replica_load_info(
        self, node_id, model_name: str, replica_index: int, backend_type: str, opts_blob: bytes
    ) -> bool:
        """Stamp the per-replica copy of the load recipe. Idiom: conditional update by the
        replica's coordinates; False when the row is gone."""
        return (
            self.filter(node_id=node_id, model_name=model_name, replica_index=replica_index).update(
                backend_type=backend_type, model_opts_blob=bytes(opts_blob)
            )
            == 1
        )

    def remove_replica(self, node_id, model_name: str, replica_index: int) -> bool:
        """Delete one replica row. Idiom: row lock, then a conditional delete by the replica's
        coordinates (``_delete_locked``); False when it was already gone (only one of several
        removers sees True)."""
        return self._delete_locked(self.filter(node_id=node_id, model_name=model_name, replica_index=replica_index)) > 0

    def forget_node_replicas(self, node_id) -> int:
        """Delete every replica row of a node that restarted or went offline: it runs nothing we
        know of any more. Load info (per-model and the node's VRAM figures) is untouched; the
        caller resets the node's reservation in the same transaction. Idiom: the rows locked,
        then one set-based DELETE (``_delete_locked``), run inside the caller's transaction (``Node.objects.register``,
        ``Node.objects.mark_offline``) so the node's status and its rows change together.
        Returns how many rows went."""
        return self._delete_locked(self.filter(node_id=node_id))

    def _delete_locked(self, queryset) -> int:
        """Delete the rows of ``queryset`` after locking their leases, then them (``FOR UPDATE``), in one short
        ``atomic()``; returns what ``delete()`` counted. Django deletes in steps (collect the
        rows, ``SET NULL`` their leases, ``DELETE`` by id): without the lock, a warm pick
        committing its lease between the steps would leave a lease pointing at a deleted row
        (a foreign-key error at commit), or delete a row whose ``in_flight`` the pick just
        raised. Locked first, a pick in progress finishes before (and the row is re-checked
        against the filter), and a later pick skips or waits for the row and finds it gone."""
        return retry_deadlock_victim(lambda: self._delete_locked_once(queryset), using=self.db)

    def _delete_locked_once(self, queryset) -> int:
        with transaction.atomic(using=self.db):
            wanted = list(queryset.values_list("pk", flat=True))
            if not wanted:
                return 0
            # Their leases first, the order of a release (its one statement updates the lease,
            # then decrements the replica). A lease granted between the two locks can still
            # meet a release in the opposite order: PostgreSQL then aborts one of the two, and
            # retry_deadlock_victim runs it again.
            leases = registry_model("Lease").objects.using(self.db).filter(replica_id__in=wanted)
            list(leases.select_for_update().values_list("pk", flat=True))
            locked = list(queryset.filter(pk__in=wanted).select_for_update().values_list("pk", flat=True))
            if not locked:
                return 0
            deleted, _ = self.filter(pk__in=locked).delete()
        return deleted

    def next_free_index(self, node, model_name: str) -> int | None:
        """Lowest replica index of ``model_name`` not used on ``node`` and below its slot
        count, or None when every slot is taken. The unique constraint, not this read, is
        what stops two loaders from taking the same index."""
        return self._free_index(node.pk, node.max_replicas_per_model, model_name)

    def _free_index(self, node_id, slots: int, model_name: str) -> int | None:
        used = set(self.filter(node_id=node_id, model_name=model_name).values_list("replica_index", flat=True))
        for index in range(max(1, slots)):
            if index not in used:
                return index
        return None

    def claim_loading(
        self,
        node_id,
        model_name: str,
        *,
        slots: int,
        backend_type: str = "",
        reserved_vram: int = 0,
        index: int | None = None,
        revision: int | None = None,
        now: datetime | None = None,
    ) -> NodeModel | None:
        """Claim a slot for a new replica on a node: insert its ``loading`` row on the lowest
        free index below ``slots`` and reserve ``reserved_vram`` bytes of the node's VRAM, both
        or neither. Returns the row, or None when another loader took the index or the VRAM
        first (the caller re-plans). ``index``: a free index the caller already read (the
        reconciler's scale-up reads every model's rows once per pass), which saves the read;
        it must be below ``slots``, and the unique constraint still decides. ``revision``: the
        model's config revision the loader read before its recipe (stamped on the row).

        Idiom: insert guarded by the unique ``(node, model, index)`` constraint, then the
        node's admission (``Node.objects.reserve_vram``: a conditional update on free VRAM), in
        one short ``atomic()``: a refused reservation rolls the insert back, so no ``loading``
        row ever exists without its reservation. No network call inside.
        """
        if index is None:
            index = self._free_index(node_id, slots, model_name)
        if index is None or not 0 <= index < max(1, slots):
            return None
        now = resolve_now(now)
        try:
            with transaction.atomic():
                row = self.create(
                    node_id=node_id,
                    model_name=model_name,
                    replica_index=index,
                    state=self.model.State.LOADING,
                    backend_type=backend_type or "",
                    reserved_vram=reserved_vram,
                    last_used=now,
                    state_changed_at=now,
                    revision=revision,
                )
                if registry_model("Node").objects.reserve_vram(node_id, reserved_vram):
                    return row
                transaction.set_rollback(True)
        except IntegrityError:
            pass
        return None

    def claim_loading_many(self, claims, *, now: datetime | None = None) -> list[NodeModel | None]:
        """Claim several replica slots at once (the reconciler's scale-up): each claim is a
        dict of ``claim_loading``'s arguments (``node_id``, ``model_name``, ``slots``,
        ``backend_type``, ``reserved_vram``, ``index``: the free index the caller read,
        ``revision``). Returns
        the rows in the claims' order, None where a slot could not be claimed.

        Idiom: insert guarded by the unique ``(node, model, index)`` constraint, then the
        admission of every node's summed reservation in one conditional UPDATE (``available -
        reserved >= sum`` per node), in one short ``atomic()``: either every row and every
        reservation commits, or nothing does and each claim is retried alone through
        ``claim_loading`` (a taken index, a node short of VRAM: the rare case of a concurrent
        loader). No ``loading`` row ever exists without its reservation.
        """
        claims = list(claims)
        if not claims:
            return []
        now = resolve_now(now)
        Node = registry_model("Node")
        if all(c.get("index") is not None and 0 <= c["index"] < max(1, c["slots"]) for c in claims) and len(
            {(c["node_id"], c["model_name"], c["index"]) for c in claims}
        ) == len(claims):
            needed: dict = {}
            for c in claims:
                if c.get("reserved_vram", 0) > 0:
                    needed[c["node_id"]] = needed.get(c["node_id"], 0) + c["reserved_vram"]
            try:
                with transaction.atomic():
                    rows = self.bulk_create(
                        [
                            self.model(
                                node_id=c["node_id"],
                                model_name=c["model_name"],
                                replica_index=c["index"],
                                state=self.model.State.LOADING,
                                backend_type=c.get("backend_type") or "",
                                reserved_vram=c.get("reserved_vram", 0),
                                last_used=now,
                                state_changed_at=now,
                                revision=c.get("revision"),
                            )
                            for c in claims
                        ]
                    )
                    if not needed or Node.objects.reserve_vram_many(needed):
                        return rows
                    transaction.set_rollback(True)
            except IntegrityError:
                pass
        return [
            self.claim_loading(
                c["node_id"],
                c["model_name"],
                slots=c["slots"],
                backend_type=c.get("backend_type") or "",
                reserved_vram=c.get("reserved_vram", 0),
                revision=c.get("revision"),
                now=now,
            )
            for c in claims
        ]

    def mark_loaded_many(self, loads, *, now: datetime | None = None) -> set:
        """``loading`` -> ``loaded`` for several replicas whose LoadModel succeeded: ``loads``
        maps a replica id to ``(address, opts_blob)`` (the per-replica recipe, or None).
        Returns the ids that were still ``loading`` (the others were removed during their load,
        or their slot given to another row, which has another id: the caller must not count
        them). Idiom: row locks in id order, then a conditional update of the rows still
        ``loading``; id order, as ``keep_loading`` takes them, so two of these statements on
        overlapping rows (the load pool's recorder and its keep-alive) wait for each other
        instead of deadlocking; a deadlock with another locker (a node's rows removed
        meanwhile) is retried (``retry_deadlock_victim``). On PostgreSQL one statement (the
        locks in a CTE, the values in ``FROM (VALUES ...)``: compiling a ``CASE`` per row was
        most of the cost of a batch); elsewhere (SQLite: one writer) the rows read and updated
        in one short ``atomic()``."""
        if not loads:
            return set()
        now = resolve_now(now)
        if connections[self.db].vendor == "postgresql":
            return retry_deadlock_victim(lambda: self._mark_loaded_statement(loads, now), using=self.db)
        with transaction.atomic(using=self.db):
            ids = set(
                self.select_for_update()
                .filter(pk__in=list(loads), state=self.model.State.LOADING)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            if not ids:
                return ids
            addresses = Case(*(When(pk=i, then=Value(loads[i][0])) for i in ids), output_field=models.CharField())
            fields = {
                "state": self.model.State.LOADED,
                "address": addresses,
                "last_used": now,
                "last_probe_at": now,
                "probe_failures": 0,
                "state_changed_at": now,
                "updated_at": now,
            }
            blobs = [When(pk=i, then=Value(bytes(loads[i][1]))) for i in ids if loads[i][1] is not None]
            if blobs:
                fields["model_opts_blob"] = Case(
                    *blobs, default=F("model_opts_blob"), output_field=models.BinaryField()
                )
            self.filter(pk__in=ids, state=self.model.State.LOADING).update(**fields)
        return ids

    def _mark_loaded_statement(self, loads, now: datetime) -> set:
        """``mark_loaded_many``'s one PostgreSQL statement (autocommit: its own transaction)."""
        connection = connections[self.db]
        q, meta = connection.ops.quote_name, self.model._meta
        table = q(meta.db_table)

        def col(name: str) -> str:
            return q(meta.get_field(name).column)

        pk_type = meta.pk.rel_db_type(connection)  # the key's type (``bigint`` for ``bigserial``)
        values = ", ".join([f"(%s::{pk_type}, %s, %s::bytea)"] * len(loads))
        sql = (
            f"WITH locked AS (SELECT {col('id')} FROM {table} WHERE {col('id')} = ANY(%s) AND {col('state')} = %s "
            f"ORDER BY {col('id')} FOR UPDATE) "
            f"UPDATE {table} AS r SET {col('state')} = %s, {col('address')} = v.address, "
            f"{col('model_opts_blob')} = COALESCE(v.blob, r.{col('model_opts_blob')}), {col('last_used')} = %s, "
            f"{col('last_probe_at')} = %s, {col('probe_failures')} = 0, {col('state_changed_at')} = %s, "
            f"{col('updated_at')} = %s "
            f"FROM locked, (VALUES {values}) AS v(id, address, blob) "
            f"WHERE r.{col('id')} = locked.{col('id')} AND r.{col('id')} = v.id RETURNING r.{col('id')}"
        )
        params = [list(loads), self.model.State.LOADING, self.model.State.LOADED, now, now, now, now]
        for replica_id, (address, blob) in loads.items():
            params += [replica_id, address, None if blob is None else bytes(blob)]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return {row[0] for row in cursor.fetchall()}

    def increment_in_flight(self, replica_id, *, now: datetime | None = None) -> bool:
        """One more request on this replica, and ``last_used = now`` (round robin, idle
        scale-down). Idiom: conditional update by id (``in_flight = in_flight + 1``, no read);
        False when the row is gone."""
        return self.filter(pk=replica_id).update(in_flight=F("in_flight") + 1, last_used=resolve_now(now)) == 1

    def decrement_in_flight(self, replica_id, count: int = 1) -> bool:
        """``count`` requests fewer on this replica, never below zero. Idiom: conditional update
        ``SET in_flight = GREATEST(in_flight - count, 0) WHERE in_flight > 0``. A miss means a
        double release or a removed row: logged as a warning, never an error. Returns whether
        the row was changed."""
        changed = (
            self.filter(pk=replica_id, in_flight__gt=0).update(in_flight=Greatest(F("in_flight") - count, Value(0)))
            == 1
        )
        if not changed:
            logger.warning("in-flight decrement missed for replica %s (already zero or removed)", replica_id)
        return changed

    def record_probe_ok(self, replica_id, now: datetime | None = None) -> bool:
        """A probe found the replica's backend alive or busy: refresh ``last_probe_at`` and
        reset the consecutive ``probe_failures``. Idiom: one conditional UPDATE by id. False
        when the row is gone (removed since the probe was sent)."""
        return self.filter(pk=replica_id).update(last_probe_at=resolve_now(now), probe_failures=0) == 1

    def record_probe_unreachable(self, replica_id) -> int | None:
        """A probe found nothing at the replica's address: count one more consecutive failure.

        Returns the new ``probe_failures``, or None when the row is gone. ``last_probe_at`` is
        left alone (the replica was not confirmed). Idiom: ``UPDATE ... SET probe_failures =
        probe_failures + 1`` then a read of that row inside one short transaction; the UPDATE's
        row lock keeps the read consistent with it. The caller decides removal (e.g. after
        ``PROBE_FAILURES_BEFORE_REMOVAL``) with ``remove_replica``.
        """
        with transaction.atomic():
            if self.filter(pk=replica_id).update(probe_failures=F("probe_failures") + 1) != 1:
                return None
            return self.filter(pk=replica_id).values_list("probe_failures", flat=True).first()

    def warm_pick(
        self,
        model_name: str,
        *,
        node_ids: Iterable | None = None,
        affinity_key: str | None = None,
        load_factor: float = 1.0,
        now: datetime | None = None,
    ) -> NodeModel | None:
        """Reserve the best loaded replica of ``model_name`` on a healthy backend node.

        Best = least ``in_flight``, then least recently used (round robin), then the node with
        the most free VRAM. With ``affinity_key``: the replica ``registry.affinity.choose``
        prefers for it (rendezvous order, under the bounded-load cap of ``load_factor``), when
        it is still under the cap once locked; else the best as above. Idiom: row lock. In
        one short transaction the replica row (only it, not its node) is locked with
        ``FOR UPDATE SKIP LOCKED`` so concurrent pickers spread over replicas; if every
        candidate is locked, a blocking ``FOR UPDATE`` waits for the best one. Its
        ``in_flight`` is then incremented; the caller must release it with
        ``decrement_in_flight``. Returns None when no replica is loaded on a candidate node.
        """
        now = resolve_now(now)
        candidates = (
            self.for_model(model_name)
            .ready()
            .filter(draining_since__isnull=True)  # the rollout is draining it: no new route
            .annotate(node_free_vram=free_vram("node__"), node_last_heartbeat=F("node__last_heartbeat"))
            .order_by("in_flight", F("last_used").asc(nulls_first=True), F("node_free_vram").desc(), "pk")
        )
        if node_ids is not None:
            candidates = candidates.filter(node_id__in=list(node_ids))
        with transaction.atomic():
            replica = None
            if affinity_key is not None:
                replica = self._affinity_pick(candidates, affinity_key, load_factor)
            if replica is None:
                replica = candidates.select_for_update(skip_locked=True, of=("self",)).first()
            if replica is None:
                replica = candidates.select_for_update(of=("self",)).first()
            if replica is None:
                return None
            self.increment_in_flight(replica.pk, now=now)
        replica.in_flight += 1
        replica.last_used = now
        return replica

    @staticmethod
    def _affinity_pick(candidates, affinity_key: str, load_factor: float):
        """Inside ``warm_pick``'s transaction: lock the replica the key prefers and return it if
        its in-flight is still under the cap; None otherwise (the caller falls back)."""
        rows = candidates.values_list("pk", "node_id", "replica_index", "in_flight")
        options = [affinity.Candidate(*row) for row in rows]
        chosen = affinity.choose(affinity_key, options, load_factor)
        if chosen is None:
            return None
        cap = affinity.load_cap((option.in_flight for option in options), load_factor)
        return (
            candidates.filter(pk=chosen.pk, in_flight__lt=cap).select_for_update(skip_locked=True, of=("self",)).first()
        )

    # --- verbs of the router's load and eviction paths ----------------------------------------

    def mark_loaded(
        self, replica_id, *, address: str, opts_blob: bytes | None = None, now: datetime | None = None
    ) -> bool:
        """``loading`` -> ``loaded`` at ``address`` once LoadModel succeeded (conditional
        update). False: the row was removed during the load (node restarted or went offline,
        or the load job was taken over); the caller must not treat the load as recorded.
        ``state_changed_at`` is set to ``now``: ``.update()`` skips ``auto_now``, so
        ``updated_at`` would still say when the ``loading`` row was inserted. ``opts_blob``,
        when given, is the per-replica copy of the recipe, written in the same statement
        (``set_replica_load_info`` is the separate write). Idiom: conditional update ``WHERE
        state = 'loading'``."""
        now = resolve_now(now)
        fields = {
            "state": self.model.State.LOADED,
            "address": address,
            "last_used": now,
            "last_probe_at": now,
            "probe_failures": 0,
            "state_changed_at": now,
            "updated_at": now,
        }
        if opts_blob is not None:
            fields["model_opts_blob"] = bytes(opts_blob)
        return self.filter(pk=replica_id, state=self.model.State.LOADING).update(**fields) == 1

    def keep_loading(self, replica_ids, *, now: datetime | None = None) -> int:
        """The loader of these ``loading`` rows is alive and still loading (the reconciler's
        load pool, every few seconds): ``state_changed_at = now``, so the stale-loading sweep,
        which discards rows older than ``CONTROLPLANE_RECONCILE_STALE_LOADING_AFTER``, only
        takes the rows of a dead loader. Returns the rows refreshed. Idiom: row locks in id order
        (``SELECT ... WHERE id IN (...) AND state = 'loading' ORDER BY id FOR UPDATE``: the order
        ``mark_loaded_many`` locks them in, so the two never deadlock), then an update of the
        locked rows, in one short ``atomic()``; a row that reached ``loaded`` or was removed
        meanwhile is left alone."""
        replica_ids = list(replica_ids)
        if not replica_ids:
            return 0
        now = resolve_now(now)

        def refresh() -> int:
            # The rows locked in id order first, as ``mark_loaded_many`` locks them.
            with transaction.atomic(using=self.db):
                ids = list(
                    self.select_for_update()
                    .filter(pk__in=replica_ids, state=self.model.State.LOADING)
                    .order_by("pk")
                    .values_list("pk", flat=True)
                )
                return self.filter(pk__in=ids).update(state_changed_at=now) if ids else 0

        return retry_deadlock_victim(refresh, using=self.db)

    def discard_loading(self, replica_id) -> bool:
        """Delete a ``loading`` row left by a failed or dead load and return the VRAM its load
        reserved to its node. A row that reached ``loaded`` is left alone. Conditional delete
        (``WHERE state = 'loading'``); only the call that deleted releases the reservation.
        Idiom: row lock, then the delete (``_delete_locked``: the row is locked and still
        ``loading`` when it is deleted; a plain queryset delete collects the ids first and
        deletes by id, so a ``mark_loaded_many`` committing in between would have its row
        deleted although loaded), then ``Node.objects.release_vram`` by the deleter only."""
        if replica_id is None:
            return False
        row = self.filter(pk=replica_id, state=self.model.State.LOADING).values("node_id", "reserved_vram").first()
        if row is None:
            return False
        deleted = self._delete_locked(self.filter(pk=replica_id, state=self.model.State.LOADING))
        if deleted:
            registry_model("Node").objects.release_vram(row["node_id"], row["reserved_vram"])
        return deleted > 0

    def start_draining(self, replica_id, *, now: datetime | None = None) -> bool:
        """The rollout takes this loaded replica out of routing (``warm_pick`` skips it); the
        leases already on it run to their end. Idiom: conditional update ``WHERE state =
        'loaded' AND draining_since IS NULL``; False when the row is gone, not loaded or
        already draining."""
        return (
            self.filter(pk=replica_id, state=self.model.State.LOADED, draining_since__isnull=True).update(
                draining_since=resolve_now(now)
            )
            == 1
        )

    def remove_if_idle(self, replica_id) -> bool:
        """Delete a loaded replica row only while nothing is in flight on it (eviction).
        Conditional delete (``WHERE in_flight = 0``): a pick that committed first wins and the
        row stays. False: busy, or already gone. Idiom: conditional delete ``WHERE state =
        'loaded' AND in_flight = 0``."""
        return self._delete_locked(self.filter(pk=replica_id, state=self.model.State.LOADED, in_flight=0)) > 0

    def report_loaded(
        self,
        node_id,
        model_name: str,
        replica_index: int,
        *,
        address: str,
        backend_type: str,
        opts_blob: bytes,
        revision: int | None = None,
        now: datetime | None = None,
    ) -> NodeModel | None:
        """Record a replica a frontend loaded itself: its row as loaded at ``address`` with its
        per-replica load recipe, and the recipe as the model's load info. None when the node is
        gone (nothing stored).

        Idiom: row lock inside a short atomic(): the node row is locked first (``SELECT ... FOR
        UPDATE``), so a deletion of the node not yet committed makes this wait and then answer
        None (instead of failing on the foreign key), and a deletion that comes later waits for
        this commit; then the two upserts (``record_loaded`` on the replica's unique triple,
        ``ModelLoadInfo.objects.upsert`` on the model) commit together. The load info is
        stored first, so a replica reported without ``revision`` is stamped with the revision
        its recipe is (a new one if the recipe changed); with ``revision``, the frontend's.
        """
        with transaction.atomic():
            locked = registry_model("Node").objects.select_for_update().filter(pk=node_id).values_list("pk", flat=True)
            if not list(locked):
                return None
            registry_model("ModelLoadInfo").objects.upsert(model_name, backend_type, opts_blob, now=now)
            if revision is None:
                revision = registry_model("ModelRevision").objects.head_numbers([model_name]).get(model_name)
            self.record_loaded(
                node_id,
                model_name,
                replica_index,
                address=address,
                backend_type=backend_type,
                opts_blob=opts_blob,
                revision=revision,
                now=now,
            )
            return self.get(node_id=node_id, model_name=model_name, replica_index=replica_index)
