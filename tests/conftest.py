"""Suite-wide fixtures: the database lane, a fixed clock, and the ``postgres`` marker.

The same suite runs twice (``make test``): once on SQLite, once on PostgreSQL, chosen by
``DATABASE_URL``. Tests marked ``postgres`` (locks, threads, processes) skip themselves on
SQLite, which silently ignores ``SELECT ... FOR UPDATE``.
"""

from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.db import connections


def _lane() -> str:
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("postgresql"):
        return f"postgresql ({database.get('HOST') or 'socket'}:{database.get('PORT') or 5432}, test database of {database['NAME']!r})"
    return "sqlite"


def pytest_report_header(config):
    return f"database lane: {_lane()}"


_REPORTED: list[str] = []


def pytest_runtest_logreport(report):
    # Runs in the controlling process also under xdist, where the tests' own prints are lost.
    if report.when == "call":
        _REPORTED.extend(value for key, value in report.user_properties if key == "report")


def pytest_terminal_summary(terminalreporter):
    if _REPORTED:
        terminalreporter.section("reported numbers")
        for line in _REPORTED:
            terminalreporter.write_line(line)
    terminalreporter.write_line(f"database lane: {_lane()}")


@pytest.fixture
def report(request):
    """report(text): a line for the terminal summary's "reported numbers" section (benchmark-like
    figures a test measured: fuzzing counts, convergence times). Works with and without xdist."""

    def add(text: str) -> None:
        request.node.user_properties.append(("report", text))

    return add


def pytest_collection_modifyitems(config, items):
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return
    skip = pytest.mark.skip(reason="PostgreSQL lane only (SQLite ignores row and advisory locks)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def now():
    """A fixed clock; pass it as ``now=`` to every time-dependent verb."""
    return datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def close_thread_connections():
    """Call the returned function at the end of a worker thread so its connection closes."""

    def close():
        for connection in connections.all():
            connection.close()

    return close
