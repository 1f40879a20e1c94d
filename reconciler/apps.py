from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ReconcilerConfig(AppConfig):
    name = "reconciler"
    verbose_name = "Reconciler"

    def ready(self):
        from .schedule import register_schedule_after_migrate

        post_migrate.connect(register_schedule_after_migrate, sender=self, dispatch_uid="reconciler.schedule")
