"""Lease verbs: a frontend's hold on one replica for one request."""

from __future__ import annotations

import functools
import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from django.conf import settings
from django.db import connections, models, transaction
from django.db.models import (
    Count,
    F,
    OuterRef,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce

from core.statements import statement_cursor

from .. import affinity
from ..clock import resolve_now
from .shared import registry_model, retry_deadlock_victim

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Leases: a frontend's hold on a replica for one request
# --------------------------------------------------------------------------------------------


class ReleaseOutcome(NamedTuple):
    """What ``Lease.objects.release_with_outcome`` did: ``released`` by this call, the lease's
    ``released_at`` (None: unknown lease) and whether the lease ``exists``."""

    released: bool
    released_at: datetime | None
    exists: bool


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@functools.cache
def _replica_attnames() -> tuple[str, ...]:
    return tuple(field.attname for field in registry_model("NodeModel")._meta.concrete_fields)


# The lease statements' own commit mode (``LEASE_SYNCHRONOUS_COMMIT``): a CTE that sets
# ``synchronous_commit`` for the statement's own transaction (``set_config(..., true)``: local to
# it, so nothing outlives the statement on the session, also behind a pooler in transaction
# mode). Referenced by the statement's final SELECT, so it is evaluated; the commit reads it.
_ASYNCHRONOUS_COMMIT_CTE = "commit_mode AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS mode), "


def _commits_asynchronously(using: str) -> bool:
    """Whether a lease statement on ``using`` commits without waiting for its WAL flush: unless
    ``LEASE_SYNCHRONOUS_COMMIT``, and never inside a caller's transaction (whose other writes
    would be committed asynchronously with it)."""
    return not settings.LEASE_SYNCHRONOUS_COMMIT and not connections[using].in_atomic_block


@functools.cache
def _pick_statement(candidates: str, skip_locked: bool, by_key: str = "", asynchronous: bool = False) -> str:
    """The one-round-trip warm pick + increment + lease insert of PostgreSQL (see
    ``pick_and_grant``). ``candidates``: "all", "node_ids" (``%(node_ids)s``) or "selector"
    (the model's stored node selector, evaluated in the statement).

    ``by_key``: pick by ``%(affinity_key)s`` instead of least in-flight (``registry.affinity``):
    "home" locks only the key's first replica under the bounded-load cap (found without a lock,
    then locked, waiting for a concurrent pick of it: a statement that waits on one row while
    holding none cannot deadlock); "next" takes the key's best replica under the cap that no
    one holds (``SKIP LOCKED``). The cap is computed over every candidate in the same
    statement, once (``MATERIALIZED``), and ``in_flight < cap`` is a condition of the locked
    row, so PostgreSQL re-checks it on the row's newest version when a concurrent pick changed
    it: a row filled meanwhile is passed over ("next") or yields nothing ("home").

    ``asynchronous``: the statement commits without waiting for its WAL flush (the
    ``commit_mode`` CTE; ``LEASE_SYNCHRONOUS_COMMIT``)."""
    NodeModel, Node = registry_model("NodeModel"), registry_model("Node")
    Lease, Config, Label = registry_model("Lease"), registry_model("ModelSchedulingConfig"), registry_model("NodeLabel")
    columns = ", ".join(f"r.{_quoted(field.column)}" for field in NodeModel._meta.concrete_fields)
    restriction = {
        "all": "",
        "node_ids": "AND r.node_id = ANY(%(node_ids)s::uuid[])",
        # A node qualifies unless one pair of the selector fails on it: the pair's label is
        # missing, or the node is not placeable (a selector restricts to placeable nodes, as
        # Node.objects.candidates does). No config row, or {} : no pair, every node qualifies.
        "selector": f"""AND NOT EXISTS (
            SELECT 1 FROM {_quoted(Config._meta.db_table)} c,
                 jsonb_each_text(CASE WHEN jsonb_typeof(c.node_selector) = 'object'
                                      THEN c.node_selector ELSE '{{}}'::jsonb END) s
            WHERE c.model_name = %(model)s
              AND (n.worker_api <> %(placeable)s OR NOT EXISTS (
                  SELECT 1 FROM {_quoted(Label._meta.db_table)} l
                  WHERE l.node_id = n.id AND l."key" = s.key AND l.value = s.value)))""",
    }[candidates]
    # Each replica row finds its node by primary key: a LATERAL subquery that OFFSET 0 keeps from
    # being flattened into a join whose order the planner may turn around (the node table
    # outside, every replica row compared with every node: a route to a model of 100 replicas on
    # 100 nodes cost 2.3 ms instead of 0.7 ms, bench/bench_route.py's growth rows).
    replicas = f"""{_quoted(NodeModel._meta.db_table)} r CROSS JOIN LATERAL (
        SELECT n.id, n.status, n.node_type, n.worker_api, n.last_heartbeat, n.available_vram, n.reserved_vram
        FROM {_quoted(Node._meta.db_table)} n WHERE n.id = r.node_id OFFSET 0) n"""
    # A replica the rollout drains (``draining_since`` set) takes no new route.
    routable = f"""r.model_name = %(model)s AND r.state = %(loaded)s AND r.draining_since IS NULL
      AND n.status = %(healthy)s AND n.node_type = %(backend)s
      {restriction}"""
    if by_key:
        score = """md5(%(affinity_key)s::text || '|' || r.node_id::text || '|' || r.replica_index::text) COLLATE "C" DESC, r.id"""
        bound = f"""bound AS MATERIALIZED (
    SELECT CEIL(%(load_factor)s::float8 * (COALESCE(SUM(r.in_flight), 0) + 1) / GREATEST(COUNT(*), 1)) + 1 AS cap
    FROM {replicas} WHERE {routable}
), """
        source, condition, order = f"{replicas} CROSS JOIN bound", "AND r.in_flight < bound.cap", score
        if by_key == "home":
            bound += f"""home AS MATERIALIZED (
    SELECT r.id FROM {source} WHERE {routable} {condition} ORDER BY {score} LIMIT 1
), """
            condition += " AND r.id = (SELECT id FROM home)"
    else:
        bound, source, condition = "", replicas, ""
        order = "r.in_flight, r.last_used ASC NULLS FIRST, (n.available_vram - n.reserved_vram) DESC, r.id"
    commit_mode, commit_join = (_ASYNCHRONOUS_COMMIT_CTE, " CROSS JOIN commit_mode") if asynchronous else ("", "")
    return f"""
WITH {commit_mode}{bound}pick AS (
    SELECT r.id, n.last_heartbeat
    FROM {source}
    WHERE {routable}
      {condition}
    ORDER BY {order}
    LIMIT 1
    FOR UPDATE OF r{" SKIP LOCKED" if skip_locked else ""}
), bumped AS (
    UPDATE {_quoted(NodeModel._meta.db_table)} r SET in_flight = r.in_flight + 1, last_used = %(now)s
    FROM pick WHERE r.id = pick.id
    RETURNING {columns}
), granted AS (
    INSERT INTO {_quoted(Lease._meta.db_table)}
        (id, replica_id, model_name, node_id, replica_index, address, expires_at, released_at, created_at)
    SELECT %(lease_id)s, r.id, r.model_name, r.node_id, r.replica_index, r.address, %(expires_at)s, NULL, %(now)s
    FROM bumped r
    RETURNING id
)
SELECT r.*, pick.last_heartbeat FROM bumped r JOIN pick ON pick.id = r.id CROSS JOIN granted{commit_join}
"""


@functools.cache
def _pick_constants() -> dict:
    NodeModel, Node = registry_model("NodeModel"), registry_model("Node")
    return {
        "loaded": NodeModel.State.LOADED.value,
        "healthy": str(Node.SCHEDULABLE["status"]),
        "backend": str(Node.SCHEDULABLE["node_type"]),
        "placeable": Node.WorkerApi.AVAILABLE.value,
    }


@functools.cache
def _release_statement(asynchronous: bool = False) -> str:
    """PostgreSQL's one-statement release (see ``release``): the lease's conditional update
    feeds the decrement; the outer SELECT reads the lease as it was before the statement.
    ``asynchronous``: as ``_pick_statement``'s."""
    commit_mode, commit_from = (_ASYNCHRONOUS_COMMIT_CTE, " FROM commit_mode") if asynchronous else ("", "")
    leases, replicas = _quoted(registry_model("Lease")._meta.db_table), _quoted(registry_model("NodeModel")._meta.db_table)
    return f"""
WITH {commit_mode}released AS (
    UPDATE {leases} SET released_at = %(now)s WHERE id = %(lease_id)s AND released_at IS NULL
    RETURNING replica_id
), freed AS (
    UPDATE {replicas} r SET in_flight = GREATEST(r.in_flight - 1, 0)
    FROM released WHERE r.id = released.replica_id AND r.in_flight > 0
    RETURNING r.id
)
SELECT EXISTS (SELECT 1 FROM released), EXISTS (SELECT 1 FROM freed),
       EXISTS (SELECT 1 FROM {leases} WHERE id = %(lease_id)s),
       (SELECT released_at FROM {leases} WHERE id = %(lease_id)s){commit_from}
"""


def _selected_node_ids(model_name: str) -> list | None:
    """Placeable nodes matching the model's stored node selector; None without a selector."""
    config = registry_model("ModelSchedulingConfig").objects.filter(model_name=model_name)
    selector = (config.values_list("node_selector", flat=True).first()) or {}
    if not selector:
        return None
    return list(registry_model("Node").objects.candidates(selector).values_list("pk", flat=True))


def _live_leases_of_replica():
    """Live leases of the outer replica row, as a correlated count."""
    Lease = registry_model("Lease")
    live = Lease.objects.filter(replica=OuterRef("pk"), released_at__isnull=True).order_by().values("replica")
    return Coalesce(Subquery(live.annotate(count=Count("pk")).values("count")[:1]), Value(0))


class LeaseQuerySet(models.QuerySet):
    def live(self):
        return self.filter(released_at__isnull=True)

    def expired(self, *, now: datetime | None = None):
        """Live leases whose TTL has passed (``expires_at <= now``)."""
        return self.live().filter(expires_at__lte=resolve_now(now))


class LeaseManager(models.Manager.from_queryset(LeaseQuerySet)):
    def grant(self, replica, *, ttl: float, now: datetime | None = None):
        """Record a lease on ``replica`` whose ``in_flight`` was just incremented.

        Must run inside the transaction that made the increment (``pick_and_grant`` does), so a
        crash can never leave an increment without its lease or the reverse: ``in_flight`` then
        always equals the replica's live leases. Raises RuntimeError outside a transaction.
        Idiom: insert inside the caller's transaction (the one holding the replica's row lock).
        Returns the lease.
        """
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError("Lease.objects.grant must run in the transaction of the in-flight increment")
        now = resolve_now(now)
        return self.create(
            replica=replica,
            model_name=replica.model_name,
            node_id=replica.node_id,
            replica_index=replica.replica_index,
            address=replica.address,
            expires_at=now + timedelta(seconds=float(ttl)),
            created_at=now,
        )

    def pick_and_grant(
        self,
        model_name: str,
        *,
        ttl: float,
        node_ids: Iterable | None = None,
        by_selector: bool = False,
        affinity_key: str | None = None,
        load_factor: float | None = None,
        now: datetime | None = None,
    ):
        """Warm pick + in-flight increment + lease, all or nothing. Returns the lease (its
        ``replica`` is the picked row, with ``node_last_heartbeat``, already in memory) or None
        when no loaded replica is routable.

        ``affinity_key`` (a session id, a prompt-prefix hash): the replica the key maps to by
        rendezvous hashing with bounded load (``registry.affinity``; ``load_factor``, default
        ``ROUTE_AFFINITY_LOAD_FACTOR``), computed inside the same statement on PostgreSQL; when
        concurrent pickers hold every replica under the cap, least in-flight as without a key.

        Candidates: loaded replicas on healthy backend nodes, restricted to ``node_ids`` when
        given, or with ``by_selector`` to the nodes the model's stored node selector matches
        (``ModelSchedulingConfig.node_selector``, read by the statement itself: no selector or
        ``{}`` means every healthy node, a selector means placeable nodes carrying every pair).

        Idiom: on PostgreSQL one statement (one round trip, its own transaction): a CTE picks
        the best row with ``FOR UPDATE OF replica SKIP LOCKED`` (concurrent pickers spread over
        replicas), increments its ``in_flight`` and inserts the lease, ``RETURNING`` the row; if
        every candidate was locked, the same statement again with a blocking ``FOR UPDATE``
        waits for the best one. With a key, the first statement is the key's: its CTE computes
        the cap over the candidates, finds the highest-scoring row with ``in_flight < cap`` and
        locks that row alone (waiting for a concurrent pick of it; PostgreSQL re-checks
        ``in_flight < cap`` on its newest version); only if it filled up meanwhile, the key's
        next row under the cap with ``SKIP LOCKED``, then the two statements above. Elsewhere (SQLite, whose writers are serialized anyway):
        ``NodeModel.objects.warm_pick``'s row lock inside one short ``atomic()`` with the
        lease insert. Either way the increment and its lease commit together, so ``in_flight``
        always equals the replica's live leases. On PostgreSQL the statement commits
        asynchronously unless ``LEASE_SYNCHRONOUS_COMMIT`` or inside the caller's transaction
        (``_commits_asynchronously``): a crash of PostgreSQL can lose a grant, never half of one.
        """
        if by_selector and node_ids is not None:
            raise ValueError("pick_and_grant takes node_ids or by_selector, not both")
        now = resolve_now(now)
        affinity_key = affinity.validate_key(affinity_key)
        factor = affinity.effective_factor(settings.ROUTE_AFFINITY_LOAD_FACTOR if load_factor is None else load_factor)
        if connections[self.db].vendor == "postgresql":
            return self._pick_and_grant_in_one_statement(model_name, ttl, node_ids, by_selector, affinity_key, factor, now)
        if by_selector:
            node_ids = _selected_node_ids(model_name)
        with transaction.atomic(using=self.db):
            replica = registry_model("NodeModel").objects.warm_pick(
                model_name, node_ids=node_ids, affinity_key=affinity_key, load_factor=factor, now=now
            )
            if replica is None:
                return None
            lease = self.grant(replica, ttl=ttl, now=now)
        lease.replica = replica
        return lease

    def _pick_and_grant_in_one_statement(self, model_name, ttl, node_ids, by_selector, affinity_key, factor, now):
        NodeModel = registry_model("NodeModel")
        lease_id = uuid.uuid4()
        params = {
            "model": model_name,
            "now": now,
            "expires_at": now + timedelta(seconds=float(ttl)),
            "lease_id": lease_id,
            "node_ids": None if node_ids is None else [uuid.UUID(str(pk)) for pk in node_ids],
            "affinity_key": affinity_key,
            "load_factor": factor,
            **_pick_constants(),
        }
        candidates = "selector" if by_selector else ("node_ids" if node_ids is not None else "all")
        # With a key: its first replica under the cap (waiting for a concurrent pick of that one
        # row); if that row filled up meanwhile, its next one under the cap that no one holds;
        # when that finds nothing, least in-flight as without a key.
        attempts = ((False, "home"), (True, "next")) if affinity_key is not None else ()
        asynchronous = _commits_asynchronously(self.db)
        with statement_cursor(self.db) as cursor:
            for skip_locked, by_key in (*attempts, (True, ""), (False, "")):
                cursor.execute(_pick_statement(candidates, skip_locked, by_key, asynchronous), params)
                row = cursor.fetchone()
                if row is not None:
                    break
            else:
                return None
        replica = NodeModel.from_db(self.db, _replica_attnames(), row[:-1])
        replica.node_last_heartbeat = row[-1]
        lease = self.model(
            id=lease_id,
            replica=replica,
            model_name=replica.model_name,
            node_id=replica.node_id,
            replica_index=replica.replica_index,
            address=replica.address,
            expires_at=params["expires_at"],
            released_at=None,
            created_at=now,
        )
        lease._state.adding = False
        lease._state.db = self.db
        return lease

    def release(self, lease_id, *, now: datetime | None = None) -> bool:
        """End a lease and give its replica's in-flight slot back; idempotent.

        Idiom: conditional update ``released_at IS NULL`` first, and only the call that made
        that transition decrements ``in_flight`` (never below zero), in the same transaction:
        on PostgreSQL one statement (a CTE: the lease ``UPDATE ... RETURNING replica_id`` feeds
        the decrement), elsewhere one short ``atomic()``. A concurrent release or ``expire`` of
        the same lease waits on its row lock and then finds ``released_at`` set: no second
        decrement. False: unknown lease or already released (by the caller or by ``expire``).
        """
        return self.release_with_outcome(lease_id, now=now).released

    def release_with_outcome(self, lease_id, *, now: datetime | None = None) -> ReleaseOutcome:
        """``release``, also saying what the lease was when this call did not release it:
        ``ReleaseOutcome(released, released_at, exists)`` (``released_at`` is ``now`` when this
        call released it, the earlier release's instant otherwise, None for an unknown lease).
        Idiom: as ``release`` (one statement on PostgreSQL, reading the row as it was before
        the statement; a release that raced with a concurrent one reads the row once more)."""
        now = resolve_now(now)
        if connections[self.db].vendor == "postgresql":
            def run_statement():
                with statement_cursor(self.db) as cursor:
                    cursor.execute(_release_statement(_commits_asynchronously(self.db)), {"lease_id": lease_id, "now": now})
                    return cursor.fetchone()

            released, decremented, exists, released_at = retry_deadlock_victim(run_statement, using=self.db)
            if released:
                if not decremented:
                    logger.warning("in-flight decrement missed for lease %s (already zero or removed)", lease_id)
                return ReleaseOutcome(True, now, True)
            if exists and released_at is not None:
                return ReleaseOutcome(False, released_at, True)
            # Unknown, or released by a concurrent call after this statement's snapshot.
        else:
            replica_id = self.filter(pk=lease_id).values_list("replica_id", flat=True).first()
            with transaction.atomic(using=self.db):
                released = self.filter(pk=lease_id, released_at__isnull=True).update(released_at=now) == 1
                if released and replica_id is not None:
                    registry_model("NodeModel").objects.decrement_in_flight(replica_id)
            if released:
                return ReleaseOutcome(True, now, True)
        row = self.filter(pk=lease_id).values_list("released_at", flat=True)
        earlier = list(row[:1])
        return ReleaseOutcome(False, earlier[0] if earlier else None, bool(earlier))

    def renew(self, lease_id, *, ttl: float, now: datetime | None = None):
        """Extend a live lease to ``now + ttl``; returns the new ``expires_at``, or None when the
        lease is unknown or already released (conditional update on ``released_at IS NULL``).
        A lease past its TTL that ``expire`` has not swept yet can still be renewed: its
        in-flight slot is still held. Idiom: conditional update ``WHERE released_at IS NULL``."""
        now = resolve_now(now)
        expires_at = now + timedelta(seconds=float(ttl))
        renewed = self.filter(pk=lease_id, released_at__isnull=True).update(expires_at=expires_at) == 1
        return expires_at if renewed else None

    def expire(self, now: datetime | None = None, *, batch: int = 1000) -> int:
        """Release every live lease past its TTL (a frontend that never released: crashed, or
        lost the answer). Returns how many leases were released.

        Idiom: in batches, lock expired leases with ``FOR UPDATE SKIP LOCKED`` (a concurrent
        ``release`` of the same lease is skipped, not waited for), mark them released and
        decrement each replica once per lease (never below zero), all in one transaction.
        """
        now = resolve_now(now)
        NodeModel = registry_model("NodeModel")
        total = 0
        while True:
            with transaction.atomic():
                rows = list(
                    self.expired(now=now).select_for_update(skip_locked=True).values_list("pk", "replica_id")[:batch]
                )
                if not rows:
                    break
                count = self.filter(pk__in=[pk for pk, _ in rows], released_at__isnull=True).update(released_at=now)
                for replica_id, leases in Counter(replica_id for _, replica_id in rows if replica_id).items():
                    NodeModel.objects.decrement_in_flight(replica_id, leases)
            total += count
            if len(rows) < batch:
                break
        return total

    def sweep_in_flight(self) -> int:
        """Set every replica's ``in_flight`` to its live lease count; returns rows corrected.

        Repairs leaks (a frontend that crashed between pick and release, a decrement that hit
        a removed row, picks made without a lease). Idiom: lock the drifting rows with
        ``FOR UPDATE SKIP LOCKED`` (rows being picked right now are skipped until the next
        sweep), then recount in a second statement: holding the row lock, every pick on that
        row has either committed its lease (counted) or not yet incremented, so the count is
        exact at commit.
        """
        NodeModel = registry_model("NodeModel")
        with transaction.atomic():
            drifting = list(
                NodeModel.objects.annotate(live=_live_leases_of_replica())
                .exclude(in_flight=F("live"))
                .select_for_update(skip_locked=True, of=("self",))
                .values_list("pk", flat=True)
            )
            if drifting:
                NodeModel.objects.filter(pk__in=drifting).update(in_flight=_live_leases_of_replica())
        if drifting:
            logger.warning("in-flight sweep corrected %d replica row(s)", len(drifting))
        return len(drifting)

    def purge(self, *, released_before: datetime) -> int:
        """Delete leases released before ``released_before`` (the table grows by one row per
        routed request); returns how many went. Idiom: one set-based DELETE of released rows (no
        live lease matches)."""
        deleted, _ = self.filter(released_at__lt=released_before).delete()
        return deleted
