"""The django-q2 schedule that runs the reconciler's leader loop every minute.

Registered after every ``migrate`` (``post_migrate``), idempotently: ``update_or_create`` by
name, so a restart or a second ``migrate`` never duplicates it, and a deleted schedule comes
back. django-q2's ``Schedule.name`` is not unique, so the write runs under the migration
advisory lock (already held by ``migrate_locked``; session locks are re-entrant) and any
duplicates left by older code are removed.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry.locks import LockKey, xact_advisory_lock

logger = logging.getLogger(__name__)

TASK = "reconciler.tasks.run_scheduled_reconcile"


def _fields() -> dict:
    # The historical model of post_migrate has no class constants; take them from django-q2's.
    from django_q.models import Schedule

    return {"func": TASK, "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1}


def register_schedule(Schedule, *, using: str = "default"):
    """Create or update the reconcile schedule; returns it. ``Schedule`` is django-q2's model
    (the historical one during ``post_migrate``)."""
    name = settings.RECONCILE_SCHEDULE_NAME
    with transaction.atomic(using=using):
        xact_advisory_lock(LockKey.MIGRATE, using=using)
        schedules = Schedule.objects.using(using)
        duplicates = list(schedules.filter(name=name).order_by("pk").values_list("pk", flat=True)[1:])
        if duplicates:
            schedules.filter(pk__in=duplicates).delete()
        schedule, created = schedules.update_or_create(
            name=name,
            defaults=_fields(),
            create_defaults={**_fields(), "next_run": timezone.now()},
        )
    if created:
        logger.info("registered django-q2 schedule %r -> %s", name, TASK)
    return schedule


def register_schedule_after_migrate(sender, *, using="default", apps=None, plan=None, **kwargs):
    """``post_migrate`` receiver (connected for the reconciler app only)."""
    try:
        Schedule = apps.get_model("django_q", "Schedule")
    except (LookupError, AttributeError):
        return  # django_q is not migrated (yet) on this database
    register_schedule(Schedule, using=using)
