"""The hot path's fixed statements run prepared (``core.statements.statement_cursor``): a warm
route's grant and a release are parsed and planned once per connection on PostgreSQL, appear in
the query log as written, and are not prepared behind a transaction pooler, whose server
connections do not carry prepared statements from one client transaction to the next."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.statements import statement_cursor
from registry.models import Lease
from tests.factories import make_node, make_replica

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def route_and_release_twice() -> None:
    for _ in range(2):
        lease = Lease.objects.pick_and_grant("llama", ttl=600)
        assert Lease.objects.release(lease.pk)


def test_a_grant_and_a_release_are_prepared_once_per_connection_and_logged_as_written():
    make_replica(make_node(), "llama", 0, address="127.0.0.1:7000")
    connection.close()  # a new session: nothing prepared on it yet

    with CaptureQueriesContext(connection) as queries:
        route_and_release_twice()

    prepared = prepared_statements()
    assert len([text for text in prepared if "INSERT INTO" in text and "registry_lease" in text]) == 1, prepared
    assert len([text for text in prepared if "released AS" in text]) == 1, prepared
    logged = [query["sql"] for query in queries]
    assert len(logged) == 4 and all(text.lstrip().startswith("WITH") for text in logged), logged
    assert "%(model)s" in logged[0] and "SKIP LOCKED" in logged[0]


def test_behind_a_transaction_pooler_nothing_is_prepared(settings):
    settings.DATABASE_POOLER = "pgbouncer-transaction"
    make_replica(make_node(), "llama", 0, address="127.0.0.1:7000")
    connection.close()

    route_and_release_twice()

    assert prepared_statements() == []


def test_a_database_error_on_the_preparing_cursor_is_djangos():
    from django.db import ProgrammingError

    with pytest.raises(ProgrammingError), statement_cursor() as cursor:
        cursor.execute("SELECT no_such_column FROM registry_lease WHERE id = %(id)s", {"id": None})
