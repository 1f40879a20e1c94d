"""``manage.py migrate_locked``: several processes starting together migrate exactly once."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 3


def _run_concurrently(database_url: str):
    env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "controlplane.settings"}
    command = [sys.executable, "manage.py", "migrate_locked", "--lock-timeout", "120", "-v", "1"]
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(PROCESSES)
    ]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    return [process.returncode for process in processes], outputs


def _assert_migrated_once(codes, outputs):
    assert codes == [0] * PROCESSES, outputs
    applied = [output.count("Applying registry.0001_initial... OK") for output in outputs]
    assert sorted(applied) == [0] * (PROCESSES - 1) + [1], outputs


@pytest.mark.postgres
def test_three_processes_migrate_a_fresh_postgres_database_once():
    admin = settings.DATABASES["default"]
    name = f"cp_migrate_{uuid.uuid4().hex[:10]}"
    conninfo = dict(host=admin["HOST"], port=admin["PORT"] or 5432, user=admin["USER"], dbname="postgres", autocommit=True)
    with psycopg.connect(**conninfo) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgres://{admin['USER']}@{admin['HOST']}:{admin['PORT'] or 5432}/{name}"
        codes, outputs = _run_concurrently(url)
        _assert_migrated_once(codes, outputs)
        with psycopg.connect(**{**conninfo, "dbname": name}) as connection:
            rows = connection.execute("SELECT count(*) FROM django_migrations WHERE app = 'registry'").fetchone()
            assert rows[0] >= 1
            duplicates = connection.execute(
                "SELECT app, name FROM django_migrations GROUP BY app, name HAVING count(*) > 1"
            ).fetchall()
            assert duplicates == []
    finally:
        with psycopg.connect(**conninfo) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_three_processes_migrate_a_fresh_sqlite_database_once(tmp_path):
    codes, outputs = _run_concurrently(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    _assert_migrated_once(codes, outputs)
