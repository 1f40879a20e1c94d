"""ASGI entry point of the gateway: ``gateway.asgi:application`` (``manage.py gateway`` serves it
with uvicorn; any ASGI server can)."""

import os

from gateway import grpc_environment

grpc_environment.configure()  # before anything imports grpc

import django  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
django.setup()

from gateway.app import GatewayApp  # noqa: E402  (needs the apps loaded)

application = GatewayApp()
