from django.apps import AppConfig


class ControlPlaneConfig(AppConfig):
    name = "controlplane"
    verbose_name = "Control plane"

    def ready(self):
        # Registers the start-up system checks and the OpenAPI descriptions of our
        # authentication classes.
        from controlplane import checks, schema  # noqa: F401
