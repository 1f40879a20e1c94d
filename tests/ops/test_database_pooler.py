"""``DATABASE_POOLER=pgbouncer-transaction``: the settings it produces, and its refusals.

Settings are read once per process, so each case starts a Python process with its environment.
The behaviour behind a real PgBouncer is tested end to end in tests/e2e/test_pgbouncer.py.
"""

import json
import os
import subprocess
import sys

from tests.e2e.harness import ROOT

PROBE = """
import django, json
django.setup()
from django.conf import settings
from registry.locks import session_alias
default = settings.DATABASES["default"]
direct = settings.DATABASES.get("direct", {})
print(json.dumps({
    "aliases": sorted(settings.DATABASES),
    "prepare_threshold": default["OPTIONS"].get("prepare_threshold", "unset"),
    "server_side_cursors_disabled": default.get("DISABLE_SERVER_SIDE_CURSORS", False),
    "direct_port": direct.get("PORT"),
    "direct_mirror": direct.get("TEST", {}).get("MIRROR"),
    "lock_alias": session_alias("default"),
    "gateway_synchronous_commit": settings.GATEWAY_SYNCHRONOUS_COMMIT,
}))
"""


def run(tmp_path, **env):
    environment = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings", "CONTROLPLANE_VAR_DIR": str(tmp_path),
        "DATABASE_POOLER": "", "DATABASE_DIRECT_URL": "", **env,
    }
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=60)


def test_pgbouncer_transaction_mode_adds_a_direct_alias_for_the_session_locks(tmp_path):
    result = run(tmp_path, DATABASE_URL="postgres://cp@pooler:6432/cp", DATABASE_POOLER="pgbouncer-transaction",
                 DATABASE_DIRECT_URL="postgres://cp@primary:5432/cp")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "aliases": ["default", "direct"], "prepare_threshold": None, "server_side_cursors_disabled": True,
        "direct_port": 5432, "direct_mirror": "default", "lock_alias": "direct",
        "gateway_synchronous_commit": True,  # a session SET would reach other clients' commits
    }


def test_without_a_pooler_locks_stay_on_the_default_connection(tmp_path):
    result = run(tmp_path, DATABASE_URL="postgres://cp@primary:5432/cp")
    assert result.returncode == 0, result.stderr
    probed = json.loads(result.stdout)
    assert probed["aliases"] == ["default"] and probed["lock_alias"] == "default"
    # Prepared statements allowed on the connection: only core.statements' cursor prepares.
    assert probed["prepare_threshold"] == 5 and probed["server_side_cursors_disabled"] is False
    assert probed["gateway_synchronous_commit"] is False


def test_the_pooler_setting_refuses_what_cannot_work(tmp_path):
    cases = {
        "needs DATABASE_DIRECT_URL": {"DATABASE_URL": "postgres://cp@pooler:6432/cp",
                                      "DATABASE_POOLER": "pgbouncer-transaction"},
        "the one supported value is pgbouncer-transaction": {"DATABASE_URL": "postgres://cp@pooler:6432/cp",
                                                             "DATABASE_POOLER": "pgbouncer-session",
                                                             "DATABASE_DIRECT_URL": "postgres://cp@primary/cp"},
        "needs a PostgreSQL DATABASE_URL": {"DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3",
                                            "DATABASE_POOLER": "pgbouncer-transaction",
                                            "DATABASE_DIRECT_URL": "postgres://cp@primary/cp"},
        "would make other processes' commits asynchronous": {
            "DATABASE_URL": "postgres://cp@pooler:6432/cp", "DATABASE_POOLER": "pgbouncer-transaction",
            "DATABASE_DIRECT_URL": "postgres://cp@primary/cp", "CONTROLPLANE_GATEWAY_SYNCHRONOUS_COMMIT": "false"},
    }
    for message, env in cases.items():
        result = run(tmp_path, **env)
        assert result.returncode != 0 and "ImproperlyConfigured" in result.stderr and message in result.stderr, (
            message, result.stderr[-2000:])
