"""``manage.py migrate_locked``: ``migrate`` under a cross-process lock.

Several web and qcluster processes starting together all call this; the first takes the lock
and migrates, the others wait (bounded by ``--lock-timeout``) and then find nothing to do.
"""

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from registry.locks import LockKey, LockTimeout, advisory_lock


class Command(BaseCommand):
    help = "Apply migrations under an advisory lock (PostgreSQL) or a file lock (SQLite)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--lock-timeout",
            type=float,
            default=settings.MIGRATE_LOCK_TIMEOUT,
            help="seconds to wait for another process's migration (default: %(default)s)",
        )
        parser.add_argument("--database", default="default")

    def handle(self, *args, lock_timeout, database, verbosity, **options):
        try:
            with advisory_lock(LockKey.MIGRATE, timeout=lock_timeout, using=database):
                call_command("migrate", database=database, interactive=False, verbosity=verbosity)
        except LockTimeout as exc:
            raise CommandError(f"another process held the migration lock for over {lock_timeout}s: {exc}") from exc
