"""Start-up checks of the web process.

Serving the API without a registration token would let anyone register a worker, so the web
process refuses to start unless a token is set or open registration is explicitly allowed
(``CONTROLPLANE_ALLOW_OPEN_REGISTRATION=1``, for development):

- ``controlplane.wsgi`` / ``controlplane.asgi`` call ``require_serving_configuration()``, which
  raises ``ImproperlyConfigured`` (gunicorn and uvicorn fail to load the application);
- a system check reports the same as an Error under ``runserver`` (so it refuses to start) and
  under ``check --deploy``. Other management commands (``migrate``, ``create_api_key``, the
  qcluster, tests) do not serve workers and are not blocked.

The gRPC TLS settings (``CONTROLPLANE_GRPC_TLS_*``) are checked the same way, and in every
command that runs the system checks (the qcluster and the gateway dial workers and backends):
a file that cannot be read, or a client certificate without its key, is an Error
(``controlplane.E002``) instead of a failure at the first gRPC call.
"""

import sys

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

E001 = "controlplane.E001"
E002 = "controlplane.E002"
SERVING_COMMANDS = frozenset({"runserver"})


def registration_problem() -> str | None:
    """Why the settings are unsafe to serve with, or None when they are fine."""
    if settings.CONTROLPLANE_REGISTRATION_TOKEN:
        return None
    if settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION:
        return None
    return (
        "CONTROLPLANE_REGISTRATION_TOKEN is not set, so workers cannot register safely. Set it, "
        "or set CONTROLPLANE_ALLOW_OPEN_REGISTRATION=1 to let anyone register (development only)."
    )


def tls_problems() -> list[str]:
    """What is wrong with the gRPC TLS settings ([] when nothing)."""
    from proto import tls

    return tls.client_tls().problems()


def require_serving_configuration() -> None:
    """Raise ImproperlyConfigured when the web process must not start."""
    problems = [p for p in [registration_problem(), *tls_problems()] if p]
    if problems:
        raise ImproperlyConfigured(" ".join(problems))


def _running_serving_command(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return len(argv) > 1 and argv[1] in SERVING_COMMANDS


def _errors() -> list[checks.CheckMessage]:
    problem = registration_problem()
    return [checks.Error(problem, id=E001)] if problem else []


@checks.register(checks.Tags.security)
def check_registration_token_when_serving(app_configs=None, **kwargs):
    """Error under ``runserver`` only (other commands do not serve workers)."""
    return _errors() if _running_serving_command() else []


@checks.register(checks.Tags.security, deploy=True)
def check_registration_token_for_deploy(app_configs=None, **kwargs):
    """``manage.py check --deploy`` always reports a missing token."""
    return [] if _running_serving_command() else _errors()


@checks.register(checks.Tags.security)
def check_grpc_tls_files(app_configs=None, **kwargs):
    """Every command: the gRPC TLS files must be readable (docs/tls.md)."""
    return [checks.Error(problem, id=E002) for problem in tls_problems()]
