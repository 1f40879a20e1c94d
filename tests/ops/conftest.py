"""Fixtures of the operations tests: the router tests' in-process fake fleet (real gRPC on
loopback) and their settings (inline load-job runner, short gRPC timeouts)."""

from tests.router.conftest import _router_settings, fleet  # noqa: F401  (fixtures)
