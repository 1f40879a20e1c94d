"""The reconciler no longer runs as a django-q2 schedule: the qcluster's leader process runs the
passes (reconciler/leader.py). Remove the schedule that earlier versions registered after every
migrate, whose task no longer exists."""

from django.db import migrations

LEGACY_SCHEDULE_NAME = "controlplane.reconcile"
LEGACY_TASK = "reconciler.tasks.run_scheduled_reconcile"


def remove_reconcile_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.using(schema_editor.connection.alias).filter(name=LEGACY_SCHEDULE_NAME, func=LEGACY_TASK).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("reconciler", "0002_unanswered_listings"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(remove_reconcile_schedule, migrations.RunPython.noop)]
