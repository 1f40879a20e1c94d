from django.apps import AppConfig


class ReconcilerConfig(AppConfig):
    name = "reconciler"
    verbose_name = "Reconciler"

    def ready(self):
        from django_q.signals import post_spawn

        from .shutdown import install_in_cluster_worker

        post_spawn.connect(install_in_cluster_worker, dispatch_uid="reconciler.shutdown")
