"""Suite-wide fixtures: the database lane, a fixed clock, the ``postgres`` marker, the fleet's
registration settings and API clients by role (what each shared test module holds:
``tests/clients.py``).

The same suite runs twice (``make test``): once on SQLite, once on PostgreSQL, chosen by
``DATABASE_URL``. Tests marked ``postgres`` (locks, threads, processes) skip themselves on
SQLite, which silently ignores ``SELECT ... FOR UPDATE``.
"""

from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.db import connections

from tests.clients import REGISTRATION_TOKEN, client_with
from tests.factories import make_api_key


def _lane() -> str:
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("postgresql"):
        return f"postgresql ({database.get('HOST') or 'socket'}:{database.get('PORT') or 5432}, test database of {database['NAME']!r})"
    return "sqlite"


def pytest_configure(config):
    # Tests marked ``xdist_group(name)`` run in one xdist worker (a module whose tests share one
    # fleet of processes); everything else is spread as before: "loadgroup" is "load" plus groups.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


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


@pytest.fixture
def registration_settings(settings):
    """The web process refuses to serve without a registration token; tests set one
    (``tests.clients.REGISTRATION_TOKEN``), closed registration, auto-approval."""
    settings.CONTROLPLANE_REGISTRATION_TOKEN = REGISTRATION_TOKEN
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    settings.CONTROLPLANE_AUTO_APPROVE = True
    return settings


@pytest.fixture
def api_client():
    """An anonymous API client."""
    return client_with()


@pytest.fixture
def operator_key(db):
    return make_api_key("operator", name="ops")[1]


@pytest.fixture
def frontend_key(db):
    return make_api_key("frontend", name="frontend-1")[1]


@pytest.fixture
def operator_client(operator_key):
    return client_with(operator_key)


@pytest.fixture
def frontend_client(frontend_key):
    return client_with(frontend_key)


@pytest.fixture
def registration_client(registration_settings):
    """A client presenting the fleet's registration token."""
    return client_with(REGISTRATION_TOKEN)
