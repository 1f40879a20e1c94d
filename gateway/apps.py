from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The OpenAI-compatible gateway (no tables of its own: it routes through the registry's)."""

    name = "gateway"
    verbose_name = "OpenAI-compatible gateway"
