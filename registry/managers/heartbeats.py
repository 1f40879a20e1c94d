"""Heartbeat verbs, mixed into ``NodeManager``: the hottest write of the control plane (every
node, every heartbeat interval).

A heartbeat is one UPDATE. The verbs that also authenticate (``heartbeat_with_token``,
``heartbeat_as_fleet_token_node``) put the credential into that UPDATE's ``WHERE`` and return
the node's status and address with ``RETURNING``, so the call costs one statement and no read.
Their statement's text depends only on which figures were reported, so it is built once per
combination and per database (``heartbeat_sql``), not compiled from a queryset per heartbeat:
compiling the queryset was most of a heartbeat's Python time.

``heartbeat_batch`` writes many coalesced heartbeats (``registry/heartbeat_flush.py``) in one
statement: ``UPDATE ... FROM`` a ``VALUES`` list, still checking each row's token hash.
"""

from __future__ import annotations

from datetime import datetime

from django.db import connections, transaction
from django.db.models import Case, F, Q, Value, When

from ..clock import resolve_now

# What a heartbeat may report, in the order the SQL sets them. ``available_vram`` also resets
# ``reserved_vram`` to 0 (the worker's figure now includes what in-progress loads use).
FIGURES = ("available_vram", "available_ram", "total_disk", "available_disk")


_SQL: dict[tuple, str] = {}


def heartbeat_sql(connection, meta, credential_column: str, reported: tuple[bool, ...]) -> str:
    """The text of an authenticating heartbeat's UPDATE, built once per database vendor, table,
    credential column and combination of reported figures: the timestamp always, each reported
    figure unless the node is pending or offline (``CASE``: those only get the timestamp),
    ``WHERE id = %s AND <credential_column> = %s RETURNING status, address``. Parameters, in
    order: the timestamp; per reported figure the two timestamp-only statuses and the value
    (for ``available_vram`` then again the two statuses and 0, for ``reserved_vram``); the id;
    the credential."""
    key = (connection.vendor, meta.db_table, credential_column, reported)
    sql = _SQL.get(key)
    if sql is None:
        q = connection.ops.quote_name

        def col(name: str) -> str:
            return q(meta.get_field(name).column)

        def reported_value(name: str) -> str:
            return f"{col(name)} = CASE WHEN ({col('status')} IN (%s, %s)) THEN {col(name)} ELSE %s END"

        assignments = [f"{col('last_heartbeat')} = %s"]
        for name, present in zip(FIGURES, reported, strict=True):
            if present:
                assignments.append(reported_value(name))
                if name == "available_vram":
                    assignments.append(reported_value("reserved_vram"))
        sql = _SQL[key] = (
            f"UPDATE {q(meta.db_table)} SET {', '.join(assignments)} "
            f"WHERE {col('id')} = %s AND {col(credential_column)} = %s "
            f"RETURNING {col('status')}, {col('address')}"
        )
    return sql


# Rows per batch statement: 8 parameters a row, well under SQLite's 32,766 and PostgreSQL's
# 65,535 bind parameters; a flush with more rows sends several statements.
BATCH_ROWS = 1000

_BATCH_SQL: dict[tuple, str] = {}


def heartbeat_batch_sql(connection, meta, rows: int) -> str:
    """The text of ``heartbeat_batch``'s statement for ``rows`` rows, built once per vendor,
    table and row count. One statement for both databases: the ``VALUES`` list is a CTE with
    named columns (SQLite's ``VALUES`` cannot be aliased with column names in ``FROM``), and
    ``UPDATE ... FROM`` (SQLite 3.33+) joins it. On PostgreSQL every value is cast (a column
    of NULLs has no type otherwise) and a second CTE locks the target rows in id order
    (``ORDER BY ... FOR UPDATE``) before the UPDATE touches them: the join's own order is the
    planner's choice, and two writers locking several node rows in different orders could
    deadlock. SQLite locks the whole database for a write: no order to keep."""
    key = (connection.vendor, meta.db_table, rows)
    sql = _BATCH_SQL.get(key)
    if sql is not None:
        return sql
    q = connection.ops.quote_name
    table = q(meta.db_table)

    def col(name: str) -> str:
        return q(meta.get_field(name).column)

    postgres = connection.vendor == "postgresql"
    casts = ("::uuid", "::text", "::timestamptz", "::bigint", "::bigint", "::bigint", "::bigint", "::bigint")
    row = "(" + ", ".join(f"%s{cast}" if postgres else "%s" for cast in casts) + ")"
    names = ("id", "token_hash", "last_heartbeat", *FIGURES, "reset_reserved")
    values = f"v ({', '.join(names)}) AS (VALUES {', '.join([row] * rows)})"
    target = f"{table}.{col('id')}"
    lock = ""
    join = ""
    if postgres:
        lock = f", locked AS (SELECT {target} FROM {table} JOIN v ON {target} = v.id ORDER BY {target} FOR UPDATE)"
        join = f" AND {target} IN (SELECT {col('id')} FROM locked)"
    assignments = [f"{col('last_heartbeat')} = v.last_heartbeat"]
    for name in FIGURES:
        assignments.append(f"{col(name)} = COALESCE(v.{name}, {table}.{col(name)})")
    assignments.append(
        f"{col('reserved_vram')} = CASE WHEN v.reset_reserved = 1 THEN 0 ELSE {table}.{col('reserved_vram')} END"
    )
    sql = _BATCH_SQL[key] = (
        f"WITH {values}{lock} UPDATE {table} SET {', '.join(assignments)} FROM v "
        f"WHERE {target} = v.id AND {table}.{col('token_hash')} = v.token_hash "
        f"AND {table}.{col('status')} NOT IN (%s, %s){join} "
        f"RETURNING {target}, {table}.{col('token_hash')}, {table}.{col('status')}, {table}.{col('address')}"
    )
    return sql


class NodeHeartbeatVerbs:
    """The part of ``Node.objects`` that records heartbeats."""

    def heartbeat(
        self,
        node_id,
        *,
        available_vram: int | None = None,
        available_ram: int | None = None,
        total_disk: int | None = None,
        available_disk: int | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record a heartbeat. Returns False when the node does not exist.

        Sets ``last_heartbeat``; a reported ``available_vram`` replaces the stored figure and
        resets ``reserved_vram`` to 0 (the worker now reports what in-progress loads use); the
        other reported figures (RAM, disk of the models directory) replace theirs. It never
        changes status: the reconciler does. Pending and offline nodes only get the timestamp.
        Idiom: one conditional UPDATE (CASE on status), no read.
        """
        changes = self._heartbeat_changes(available_vram, available_ram, total_disk, available_disk, now)
        return self.filter(pk=node_id).update(**changes) == 1

    def heartbeat_with_token(
        self,
        node_id,
        token_hash: str,
        *,
        available_vram: int | None = None,
        available_ram: int | None = None,
        total_disk: int | None = None,
        available_disk: int | None = None,
        now: datetime | None = None,
    ) -> tuple[str, str] | None:
        """``heartbeat`` for the caller holding the node token whose hash is ``token_hash``:
        the credential check is the UPDATE's own condition, so a heartbeat costs one statement
        and no read. Returns the node's ``(status, address)``, or None when no row has that id
        *and* that token hash (no such node, a rotated or another node's token, a node without
        a token): the caller then authenticates by reading, to answer the right problem.

        Correct across processes: the condition is evaluated on the committed row, so a token
        rotated (re-registration) or a node deleted by any process refuses the old token from
        the next statement on; nothing is cached.
        Idiom: one conditional UPDATE (id and token hash; CASE on status) ... RETURNING.
        """
        if not token_hash:
            return None
        figures = (available_vram, available_ram, total_disk, available_disk)
        return self._heartbeat_returning(node_id, "token_hash", token_hash, figures, now)

    def heartbeat_as_fleet_token_node(
        self,
        node_id,
        *,
        available_vram: int | None = None,
        available_ram: int | None = None,
        total_disk: int | None = None,
        available_disk: int | None = None,
        now: datetime | None = None,
    ) -> tuple[str, str] | None:
        """``heartbeat`` for a caller that presented the fleet registration token, which drives
        only a node registered in ``fleet_token`` mode (LocalAI's workers): the UPDATE's
        condition is the node's ``auth_mode``; whether such nodes may call at all (a setting)
        and whether the token is the fleet's are the caller's checks. Returns
        ``(status, address)``, or None when no node has that id *and* that mode (the caller then
        authenticates by reading, to answer the right problem).
        Idiom: one conditional UPDATE (id and auth mode; CASE on status) ... RETURNING.
        """
        figures = (available_vram, available_ram, total_disk, available_disk)
        return self._heartbeat_returning(node_id, "auth_mode", self.model.AuthMode.FLEET_TOKEN, figures, now)

    def heartbeat_batch(self, rows) -> dict[tuple[str, str], tuple[str, str]]:
        """Record coalesced heartbeats, each authenticated by its node token's hash, in one
        statement per ``BATCH_ROWS`` rows. ``rows``: ``(node_id, token_hash, received_at,
        figures)`` with ``figures`` a mapping of the reported ``FIGURES`` (a figure absent or
        None is not reported), at most one row per node and token. Returns ``{(str(node_id),
        token_hash): (status, address)}`` of the rows written; a row missing from it changed
        nothing.

        What each row does is what ``heartbeat_with_token`` does, with one difference in
        whom it writes: ``last_heartbeat = received_at``; each reported figure replaces the
        stored one and a reported ``available_vram`` resets ``reserved_vram`` to 0; but a
        node that is pending or offline (``HEARTBEAT_TIMESTAMP_ONLY_STATUSES``) is not written
        at all, where ``heartbeat_with_token`` would stamp its timestamp: such a heartbeat
        comes back as unwritten, and its sender's next heartbeat goes through
        ``heartbeat_with_token`` (the caller's job), whose timestamp is what brings an offline
        node back. A heartbeat that waited in a buffer while its node was taken offline (the
        worker deregistered, which clears ``last_heartbeat`` on purpose) must not stamp a
        timestamp older than the deregistration and revive the node.

        Idiom: one conditional UPDATE ... FROM (VALUES ...) (id, token hash, status) ...
        RETURNING per batch, rows locked in id order on PostgreSQL (``heartbeat_batch_sql``);
        a token rotated or a node deleted by any process before the statement refuses its
        rows, as in ``heartbeat_with_token``.
        """
        connection = connections[self.db]
        meta = self.model._meta
        pk, stamp = meta.pk, meta.get_field("last_heartbeat")
        prepared = []
        for node_id, token_hash, received_at, figures in rows:
            if not token_hash:
                continue
            try:
                key = pk.get_db_prep_value(pk.to_python(node_id), connection)
            except Exception:  # noqa: BLE001 - not a node id: no row can match
                continue
            reported = [figures.get(name) for name in FIGURES]
            reset = 1 if reported[0] is not None else 0
            prepared.append(
                (str(node_id), [key, token_hash, stamp.get_db_prep_value(received_at, connection), *reported, reset])
            )
        prepared.sort(key=lambda item: item[0])  # id order (PostgreSQL locks in that order anyway)
        written: dict[str, tuple[str, str]] = {}
        only_stamp = list(self.model.HEARTBEAT_TIMESTAMP_ONLY_STATUSES)
        for start in range(0, len(prepared), BATCH_ROWS):
            chunk = prepared[start : start + BATCH_ROWS]
            sql = heartbeat_batch_sql(connection, meta, len(chunk))
            params = [value for _, row in chunk for value in row] + only_stamp
            with transaction.mark_for_rollback_on_error(using=self.db), connection.cursor() as cursor:
                cursor.execute(sql, params)
                for node_id, token_hash, status, address in cursor.fetchall():
                    written[(str(pk.to_python(node_id)), token_hash)] = (status, address)
        return written

    def _heartbeat_returning(self, node_id, credential_column: str, credential, figures, now):
        """Run ``heartbeat_sql``'s statement; ``(status, address)`` of the row it stamped, or
        None."""
        connection = connections[self.db]
        meta = self.model._meta
        try:
            pk = meta.pk.get_db_prep_value(meta.pk.to_python(node_id), connection)
        except Exception:  # noqa: BLE001 - not a node id: no row can match (URLs admit only UUIDs)
            return None
        sql = heartbeat_sql(connection, meta, credential_column, tuple(value is not None for value in figures))
        only_stamp = list(self.model.HEARTBEAT_TIMESTAMP_ONLY_STATUSES)
        params = [meta.get_field("last_heartbeat").get_db_prep_value(resolve_now(now), connection)]
        for name, value in zip(FIGURES, figures, strict=True):
            if value is not None:
                params += [*only_stamp, value]
                if name == "available_vram":
                    params += [*only_stamp, 0]
        params += [pk, credential]
        with transaction.mark_for_rollback_on_error(using=self.db), connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return (row[0], row[1]) if row is not None else None

    def _heartbeat_changes(self, available_vram, available_ram, total_disk, available_disk, now) -> dict:
        """The columns a heartbeat sets: the timestamp always, each reported figure unless the
        node is pending or offline (those only get the timestamp)."""
        timestamp_only = Q(status__in=self.model.HEARTBEAT_TIMESTAMP_ONLY_STATUSES)
        changes = {"last_heartbeat": resolve_now(now)}

        def reported(column: str, value: int) -> Case:
            return Case(When(timestamp_only, then=F(column)), default=Value(value))

        if available_vram is not None:
            changes["available_vram"] = reported("available_vram", available_vram)
            changes["reserved_vram"] = reported("reserved_vram", 0)
        for column, value in (
            ("available_ram", available_ram),
            ("total_disk", total_disk),
            ("available_disk", available_disk),
        ):
            if value is not None:
                changes[column] = reported(column, value)
        return changes
