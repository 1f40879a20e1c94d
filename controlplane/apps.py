from django.apps import AppConfig


class ControlPlaneConfig(AppConfig):
    name = "controlplane"
    verbose_name = "Control plane"

    def ready(self):
        # Registers the start-up system checks and the OpenAPI descriptions of our
        # authentication classes.
        from controlplane import checks, metrics, schema  # noqa: F401

        metrics.install_hooks()

        from django.core.signals import request_finished

        from controlplane.logs import clear_context

        request_finished.connect(clear_context, dispatch_uid="controlplane.logs.clear_context")
