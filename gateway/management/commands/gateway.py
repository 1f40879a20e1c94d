"""``manage.py gateway``: serve the OpenAI-compatible gateway with uvicorn.

Listens on ``CONTROLPLANE_GATEWAY_BIND`` (``--bind`` overrides it); one process, one event loop
(streams are cheap coroutines; database work runs on ``CONTROLPLANE_GATEWAY_DB_THREADS``
threads). SIGTERM or SIGINT stops it: connections get up to ``--graceful`` seconds, then the
requests still running are cancelled, which releases their leases.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


def split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"bind address {bind!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class Command(BaseCommand):
    help = "Serve the OpenAI-compatible gateway (uvicorn) on CONTROLPLANE_GATEWAY_BIND."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=None, help="HOST:PORT (default: CONTROLPLANE_GATEWAY_BIND)")
        parser.add_argument(
            "--graceful",
            type=float,
            default=5.0,
            help="seconds open requests get to finish on SIGTERM/SIGINT (default 5)",
        )

    def handle(self, *args, bind=None, graceful=5.0, **options):
        import uvicorn

        from gateway import metrics
        from gateway.app import GatewayApp

        host, port = split_bind(bind or settings.GATEWAY_BIND)
        config = uvicorn.Config(
            GatewayApp(),
            host=host,
            port=port,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            log_config=None,  # Django's LOGGING (core/logs.py) formats every line
            access_log=False,  # the gateway logs each request itself, with its request id
            timeout_graceful_shutdown=graceful,
            server_header=False,
        )
        self.stdout.write(f"gateway: serving the OpenAI API on http://{host}:{port}/v1\n")
        self.stdout.flush()
        try:
            uvicorn.Server(config).run()
        finally:
            metrics.mark_process_dead()
