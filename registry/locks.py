"""Cross-process locks: PostgreSQL advisory locks, with a file-lock fallback for SQLite.

"One at a time" work (migrating, a reconcile pass) is serialised with these. Rules:

- never hold one across a network call that can take long (the reconciler's pass holds its
  try-lock but bounds every gRPC call with a short deadline);
- session-level locks live on the database connection of the calling thread and die with it,
  so a process that is killed releases its locks;
- every key is declared in ``LockKey`` so that two features can never collide on one number;
- behind PgBouncer in transaction mode (``DATABASE_POOLER``) a session-level lock is taken on
  the ``direct`` alias, a connection to PostgreSQL itself (``session_alias``): through the
  pooler, consecutive statements of one thread may run on different server sessions, so the
  lock would be taken on one and the unlock sent to another. The lock's connection is then not
  the one the locked work runs on; it is still this thread's and this process's, so it dies
  with the process as before, and a lost lock connection fails the next lock or unlock
  statement (the leader loop ends its run, ``reconciler/reconcile.py``).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections, transaction


class LockKey(enum.IntEnum):
    """The one registry of advisory lock keys (64-bit, prefixed "cp" = 0x6370 to stay clear of
    other applications sharing the database)."""

    MIGRATE = 0x6370_0000_0001
    RECONCILE = 0x6370_0000_0002
    RECONCILE_LEADER = 0x6370_0000_0003


class LockTimeout(Exception):
    """The lock could not be taken within the timeout."""


def _is_postgres(alias: str) -> bool:
    return connections[alias].vendor == "postgresql"


def session_alias(using: str = DEFAULT_DB_ALIAS) -> str:
    """The alias a session-level lock for ``using`` is taken on: ``direct`` when ``using`` is
    the default database and it is reached through a transaction-mode pooler, else ``using``."""
    if using == DEFAULT_DB_ALIAS and settings.DIRECT_DATABASE_ALIAS in settings.DATABASES:
        return settings.DIRECT_DATABASE_ALIAS
    return using


# --- SQLite fallback: an flock'd file beside the database ----------------------------------


def _lock_file_path(key: int, alias: str) -> Path:
    name = str(connections[alias].settings_dict.get("NAME") or "")
    in_memory = name in ("", ":memory:") or name.startswith("file:") and "mode=memory" in name
    if in_memory:
        # An in-memory database (the test database) is private to its process, so is its lock.
        digest = hashlib.sha256(f"{os.getpid()}:{name}".encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"controlplane-locks-{digest}"
    else:
        folder = Path(name).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(name).name if not in_memory else "memory"
    return folder / f"{stem}.lock-{int(key):x}"


@contextlib.contextmanager
def _file_lock(key: int, alias: str, *, blocking: bool, timeout: float | None):
    path = _lock_file_path(key, alias)
    handle = open(path, "a+")
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                acquired = True
                break
            except BlockingIOError:
                if not blocking:
                    acquired = False
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(f"lock {key:#x} not acquired in {timeout}s")
                time.sleep(0.05)
        try:
            yield acquired
        finally:
            if acquired:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


# --- Public API ------------------------------------------------------------------------------


@contextlib.contextmanager
def advisory_lock(key: LockKey, *, timeout: float | None = None, using: str = DEFAULT_DB_ALIAS):
    """Hold a session-level lock for the ``with`` block, waiting at most ``timeout`` seconds.

    PostgreSQL: ``pg_advisory_lock`` with ``lock_timeout`` set for the wait (a wedged holder
    cannot hang every starter); raises ``LockTimeout`` when the wait runs out.
    SQLite: an exclusive ``flock`` on a file beside the database.
    """
    using = session_alias(using)
    if not _is_postgres(using):
        with _file_lock(int(key), using, blocking=True, timeout=timeout):
            yield
        return
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [f"{int((timeout or 0) * 1000)}ms"])
        try:
            cursor.execute("SELECT pg_advisory_lock(%s)", [int(key)])
        except OperationalError as exc:
            raise LockTimeout(f"advisory lock {key.name} not acquired in {timeout}s") from exc
        finally:
            if not connection.needs_rollback:
                cursor.execute("SELECT set_config('lock_timeout', '0', false)")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [int(key)])


@contextlib.contextmanager
def try_advisory_lock(key: LockKey, *, using: str = DEFAULT_DB_ALIAS):
    """Try to take a session-level lock without waiting; yields True when held.

    ``with try_advisory_lock(LockKey.RECONCILE) as held: if not held: return "skipped"``.
    """
    using = session_alias(using)
    if not _is_postgres(using):
        with _file_lock(int(key), using, blocking=False, timeout=None) as acquired:
            yield acquired
        return
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [int(key)])
        acquired = bool(cursor.fetchone()[0])
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [int(key)])


def xact_advisory_lock(key: LockKey, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Take a transaction-level lock, released at commit/rollback. Must run inside
    ``transaction.atomic()``; it lives in the transaction, so it works through a pooler too. On
    SQLite the IMMEDIATE transaction already serialises writers, so this is a no-op there."""
    if not transaction.get_connection(using).in_atomic_block:
        raise RuntimeError("xact_advisory_lock needs an open transaction")
    if _is_postgres(using):
        with connections[using].cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int(key)])


# Two-key advisory locks (``pg_advisory_xact_lock(int4, int4)``) live apart from the one-key
# ``LockKey`` locks; the first key names the feature, the second is derived from a model name
# (two models sharing a hash only wait for each other, which is harmless).
MODEL_REVISIONS = 0x6370_0004


def xact_model_lock(space: int, model_name: str, *, using: str = DEFAULT_DB_ALIAS) -> None:
    """Serialise one kind of change per model until the transaction ends. Must run inside
    ``transaction.atomic()``; a no-op on SQLite (its IMMEDIATE transactions serialise
    writers)."""
    if not transaction.get_connection(using).in_atomic_block:
        raise RuntimeError("xact_model_lock needs an open transaction")
    if _is_postgres(using):
        objid = int.from_bytes(hashlib.sha256(model_name.encode()).digest()[:4], "big", signed=True)
        with connections[using].cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [space, objid])
