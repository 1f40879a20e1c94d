"""ASGI entry point of the gateway: ``gateway.asgi:application`` (``manage.py gateway`` serves it
with uvicorn; any ASGI server can)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
django.setup()

from gateway.app import GatewayApp  # noqa: E402  (needs the apps loaded)

application = GatewayApp()
