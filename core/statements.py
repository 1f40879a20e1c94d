"""Prepared statements for the hot path's fixed SQL (a warm route's grant, a release).

Django's psycopg cursors bind parameters on the client: every statement reaches PostgreSQL as
new text, which it parses and plans again each time. For the one-statement grant of a warm
route (a CTE with the model's node selector in it) that planning took longer than running it:
about 0.25 ms of planning against 0.15 ms of execution per grant, and half as much again per
release, on this project's benchmark machine (``bench/RESULTS.md``, "make bench").

``statement_cursor`` hands out a cursor that binds on the server and prepares every statement
it runs (psycopg's ``prepare=True``): the first run on a connection parses and plans, later ones
only bind and execute, and PostgreSQL switches to a cached generic plan once it is no dearer
than planning each time. The cursor is wrapped as Django wraps its own (database errors raised as
``django.db`` errors; the query log of ``DEBUG`` and ``CaptureQueriesContext`` holds the statement
as written, with its parameters beside it), so callers use it as they would
``connection.cursor()``.

Not behind a transaction pooler (``DATABASE_POOLER=pgbouncer-transaction``): a prepared
statement lives on one server connection, which a pooler in transaction mode hands to other
clients between transactions, so there the cursor is Django's own and nothing is prepared.
Only statements whose text is fixed (their variants a small, closed set) belong here: psycopg
keeps at most ``prepared_max`` (100) prepared statements per connection.
"""

from __future__ import annotations

import psycopg
from django.conf import settings
from django.db import connections
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper


class _PreparingCursor(psycopg.Cursor):
    """A server-side binding cursor that prepares every statement it executes."""

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True if prepare is None else prepare, binary=binary)


class _PreparedDebugWrapper(CursorDebugWrapper):
    """Django's query log (``DEBUG``, ``CaptureQueriesContext``) for the preparing cursor: the
    statement as written, its parameters beside it. Django's own wrapper logs the text of a
    client-side bound query, which a prepared statement does not have."""

    def execute(self, sql, params=None):
        with self.debug_sql(sql, params):
            return CursorWrapper.execute(self, sql, params)


def statement_cursor(using: str = "default"):
    """A cursor for fixed hot-path statements on ``using``: preparing on PostgreSQL (module doc),
    Django's own cursor elsewhere and behind a transaction pooler. Use it as a context manager,
    like ``connection.cursor()``."""
    connection = connections[using]
    if connection.vendor != "postgresql" or settings.DATABASE_POOLER:
        return connection.cursor()
    # What connection.cursor() does before it wraps a cursor of its own kind.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    with connection.wrap_database_errors:
        cursor = _PreparingCursor(connection.connection)
    return _PreparedDebugWrapper(cursor, connection) if connection.queries_logged else connection.make_cursor(cursor)
