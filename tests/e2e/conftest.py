"""Fixtures for end-to-end tests: a fresh PostgreSQL database and real processes."""

import subprocess

import pytest
from django.conf import settings

from tests.e2e.harness import Fleet


@pytest.fixture
def fleet(tmp_path, request):
    database = settings.DATABASES["default"]
    if not database["ENGINE"].endswith("postgresql"):
        pytest.skip("end-to-end tests run on the PostgreSQL lane")
    fleet = Fleet(admin_url=database, workdir=tmp_path)
    (tmp_path / "var").mkdir()
    fleet.create_database()
    yield fleet
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(fleet.logs())
    fleet.close()


@pytest.fixture
def private_fleet(tmp_path, request):
    """A fleet on its own throwaway PostgreSQL cluster, so the scenario may stop the server
    without disturbing anyone else's tests on the machine's shared one."""
    from tests.e2e.harness import PrivatePostgres

    try:
        server = PrivatePostgres()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no private PostgreSQL: {exc}")
    fleet = Fleet(admin_url=server.admin_url, workdir=tmp_path)
    (tmp_path / "var").mkdir()
    fleet.server = server
    try:
        fleet.create_database()
        yield fleet
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(fleet.logs())
    finally:
        try:
            fleet.close()
        finally:
            server.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
