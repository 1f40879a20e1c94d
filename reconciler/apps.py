from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ReconcilerConfig(AppConfig):
    name = "reconciler"
    verbose_name = "Reconciler"

    def ready(self):
        from django_q.signals import post_spawn

        from .schedule import register_schedule_after_migrate
        from .shutdown import install_in_cluster_worker

        post_migrate.connect(register_schedule_after_migrate, sender=self, dispatch_uid="reconciler.schedule")
        post_spawn.connect(install_in_cluster_worker, dispatch_uid="reconciler.shutdown")
