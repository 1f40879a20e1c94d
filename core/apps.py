from django.apps import AppConfig


class CoreConfig(AppConfig):
    """The base app. Its label stays ``controlplane`` (the label it had when the project package
    was also the app), so existing databases keep their ``controlplane_apikey`` table, their
    migration history and the admin's URLs."""

    name = "core"
    label = "controlplane"
    verbose_name = "Access"

    def ready(self):
        # Registers the start-up system checks and the OpenAPI descriptions of the
        # authentication classes, and hands proto.client its gRPC call observer.
        from core import checks, metrics, schema  # noqa: F401

        metrics.install_hooks()

        from django.core.signals import request_finished

        from core.logs import clear_context

        request_finished.connect(clear_context, dispatch_uid="core.logs.clear_context")
