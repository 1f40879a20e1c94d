"""Fixtures for end-to-end tests: a fresh PostgreSQL database and real processes."""

import os
import subprocess
import uuid

import pytest
from django.conf import settings

from tests.e2e.harness import Fleet, wait_for
from tests.tools import missing

# The machine's Redis, in a database number of its own that the tests empty (FLUSHDB of that
# number only; never FLUSHALL). TEST_REDIS_URL points elsewhere.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_CLAIM = "controlplane-tests:claim"


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


@pytest.fixture
def redis_db():
    """The tests' dedicated Redis database (``TEST_REDIS_URL``), empty and claimed for one test
    at a time (a key set with NX: concurrent xdist workers wait their turn), emptied afterwards.
    Yields its URL. Request it before ``fleet`` so that the fleet's processes are stopped before
    the database is emptied."""
    import redis

    connection = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        connection.ping()
    except redis.RedisError as exc:
        missing(f"no Redis answers at {TEST_REDIS_URL} ({exc}); Debian package `redis-server`")
    token = uuid.uuid4().hex
    wait_for(lambda: connection.set(REDIS_CLAIM, token, nx=True, ex=900), timeout=900, interval=1.0,
             what=f"the tests' Redis database {TEST_REDIS_URL} free")
    for key in connection.scan_iter():  # a crashed earlier run's keys (its claim had expired)
        if key != REDIS_CLAIM.encode():
            connection.delete(key)
    try:
        yield TEST_REDIS_URL
    finally:
        connection.flushdb()  # this database number only
        connection.close()


@pytest.fixture(params=["orm", "redis"], ids=["orm-broker", "redis-broker"])
def broker_fleet(request):
    """``fleet`` with django-q2's ORM broker, then with its Redis broker (``REDIS_URL``)."""
    url = request.getfixturevalue("redis_db") if request.param == "redis" else ""
    fleet = request.getfixturevalue("fleet")
    fleet.settings_env["REDIS_URL"] = url  # "" is the ORM broker, whatever the environment says
    fleet.broker = request.param
    return fleet


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
