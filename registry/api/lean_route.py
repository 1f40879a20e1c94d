"""The warm route's lean path: ``POST /api/v1/models/{model}/route`` and
``POST /api/v1/leases/{id}/release`` answered below Django's request cycle, for the shape of
request a frontend sends on every request it serves.

``LeanRoutePath`` wraps the WSGI application (``controlplane.httpserver.served_application``),
as the heartbeat's lean path does (``heartbeat.py``, whose request checks it shares). An
ordinary warm route or release is answered here with the same statements as the DRF views
(``router.route_warm``: ``Lease.objects.pick_and_grant``, one statement on PostgreSQL;
``Lease.objects.release_with_outcome``, one statement) and the same body, status and headers,
without the middleware chain, DRF's request, authentication classes, content negotiation,
parser and renderer lookups. Everything else goes on to the full application untouched (the
body it read is handed on), where the DRF views (``routing.RouteViewSet.route``,
``LeaseViewSet.release``) answer exactly as before: every problem (401, 403, 400, 404, 406,
409, 413, 415, 503, ...) and the cold route (a load job, 202). This path never writes an error
answer of its own; ``tests/router/test_lean_route.py`` compares the two.

Ordinary means: the path resolves (Django's own URL resolver) to one of those two actions; a
bearer API key the per-process cache (``ApiKey.objects.verify``) knows as a frontend or
operator key; the request checks of the heartbeat's lean path (``Accept`` takes JSON, a JSON
or empty body within ``DATA_UPLOAD_MAX_MEMORY_SIZE``, an allowed host, no HTTPS redirect or
HSTS to apply); for a route, a body that is empty or a JSON object holding at most
``wait_seconds`` (a number in [0, 300]) and ``affinity_key`` (a string the view accepts, or
null), a valid model name, and a replica the warm pick leases; for a release, no body and a
lease that exists.

A route whose warm pick finds nothing (the model must be loaded, or cannot be) is handed on
marked ``routing.WARM_ROUTE_MISSED``: the view goes on with ``router.route(warm_tried=True)``,
so the request makes the same statements, probes and removals as if the view had run alone.

What the middleware does for these paths is done here: the request id (``X-Request-ID`` in and
out) and the log context (request id, model), the request metrics (``controlplane_http_requests``
under the URL pattern's name, ``model-route`` or ``lease-release``), the headers of
``SecurityMiddleware``, ``XFrameOptionsMiddleware`` and DRF's ``Allow``, and the database
connection's lifecycle (closed past ``DATABASE_CONN_MAX_AGE`` or after errors, as
``request_started`` and ``request_finished`` do).

Django's health check (a ``SELECT 1`` before a kept connection's first use in each request) is
replaced by a check without a round trip: an idle kept connection whose socket has something
to read was closed by the server (PostgreSQL sends its termination notice and closes), so it
is closed and a new one opened before the statement is sent. A statement that fails anyway
(the connection broke while it ran) is handed on to the view, which runs it again on a new
connection: releasing twice is harmless, and for a route whose first statement may have
committed before the connection broke, the first lease is then never answered and frees its
slot at its TTL, exactly as when the view answers 503 ``database_unavailable`` and the client
routes again.
"""

from __future__ import annotations

import functools
import logging
import re
import select
import time
import uuid
from typing import NamedTuple

from django.conf import settings
from django.db import connections
from django.urls import Resolver404, resolve
from django.utils import timezone

from core.logs import request_id_for
from core.models import ApiKey
from core.parsers import loads_strict
from registry import affinity, router
from registry.models import Lease

from . import serializers as s
from .heartbeat import _bearer, _plain, _read_body, answer_ok, run_lean
from .routing import (
    MAX_WAIT_SECONDS,
    WARM_ROUTE_MISSED,
    LeaseViewSet,
    RouteViewSet,
    _lease_answer,
    _release_answer,
    node_header_value,
)

logger = logging.getLogger(__name__)

_PREFIXES = ("/api/v1/models/", "/api/v1/leases/")
_SUFFIXES = ("/route", "/release")
_ROUTE_FIELDS = frozenset({"wait_seconds", "affinity_key"})
_FRONTEND_ROLES = (ApiKey.Role.FRONTEND, ApiKey.Role.OPERATOR)


class LeanRoutePath:
    """WSGI middleware: answers an ordinary warm route or release itself, hands the rest on."""

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "POST":
            path = environ.get("PATH_INFO", "")
            if path.startswith(_PREFIXES) and path.endswith(_SUFFIXES):
                answered = answer_route_or_release(environ, start_response, path)
                if answered is not None:
                    return answered
        return self.application(environ, start_response)


def answer_route_or_release(environ, start_response, path: str):
    """The 200 answer's body (a list, as WSGI wants it) after calling ``start_response``, or
    None when the full application must answer (``environ`` can then be served as received,
    plus the request id and, for a route whose warm pick found nothing, the marker)."""
    started = time.perf_counter()
    match = _resolve(environ, path)
    if match is None:
        return None
    action = match.action
    token = _bearer(environ)
    if token is None or not _plain(environ):
        return None
    if action == "route":
        body = _route_body(environ)
        if body is None:
            return None
        try:
            model = s.validate_model_name(match.kwargs["model"])
        except Exception:  # noqa: BLE001 - the view answers its 400
            return None
    elif _body_length(environ) != 0:
        return None
    request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
    if action == "route":
        answer = run_lean(environ, request_id, "route", lambda: _route(environ, token, model, body), model=model)
    else:
        answer = run_lean(environ, request_id, "route", lambda: _release(token, match.kwargs["lease_id"]))
    if answer is None:
        return None
    document, extra_headers = answer
    return answer_ok(start_response, document, match.view_name, request_id, started=started, headers=extra_headers)


class _Target(NamedTuple):
    """What the URL resolver makes of a route or release path."""

    action: str  # "route" or "release"
    view_name: str  # the URL pattern's name, for the request metrics
    kwargs: dict  # the path's arguments: ``model`` or ``lease_id`` (read only)


# A release's path names a lease by its UUID, in the form Django's ``uuid`` converter takes.
_RELEASE_PATH = re.compile(r"/api/v1/leases/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/release")
_ANY_LEASE = "00000000-0000-0000-0000-000000000000"


def _resolve(environ, path: str) -> _Target | None:
    """Django's own match of the path when it is the route or release action, else None.

    Django's resolver is asked once per distinct route path (and once for all release paths:
    a lease's id only fills the ``uuid`` converter, so the path with any id resolves as the
    path with the zero id does), with the URL configuration in the cache key."""
    if environ.get("SCRIPT_NAME"):
        return None  # served below a prefix: Django's request works out the path
    urlconf = settings.ROOT_URLCONF
    release = _RELEASE_PATH.fullmatch(path)
    if release is not None:
        target = _resolved(f"/api/v1/leases/{_ANY_LEASE}/release", urlconf)
        if target is None or target.action != "release":
            return None
        return target._replace(kwargs={"lease_id": uuid.UUID(release[1])})
    return _resolved(path, urlconf)


@functools.lru_cache(maxsize=1024)
def _resolved(path: str, urlconf: str) -> _Target | None:
    try:  # a path whose bytes are not UTF-8 is the full path's 400 (controlplane/httpserver.py)
        match = resolve(path.encode("latin-1").decode("utf-8"), urlconf)
    except (UnicodeError, Resolver404):
        return None
    view = getattr(match.func, "cls", None)
    action = (getattr(match.func, "actions", None) or {}).get("post")
    if (view is RouteViewSet and action == "route") or (view is LeaseViewSet and action == "release"):
        return _Target(action, match.view_name, match.kwargs)
    return None


def _body_length(environ) -> int | None:
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return None
    try:
        return int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None


def _route_body(environ) -> dict | None:
    """The route's body when the view would accept it as it stands (an empty body is ``{}``),
    else None (the view answers, or takes what this path does not, such as options)."""
    raw = _read_body(environ)
    if raw is None:
        return None
    try:
        body = loads_strict(raw.decode("utf-8")) if raw else {}
    except ValueError:
        return None
    if not isinstance(body, dict) or not body.keys() <= _ROUTE_FIELDS:
        return None
    wait = body.get("wait_seconds", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT_SECONDS:
        return None
    key = body.get("affinity_key")
    if key is not None:
        if not isinstance(key, str) or len(key) > affinity.MAX_KEY_LENGTH:
            return None
        try:
            key.encode("utf-8")  # DRF's CharField refuses lone surrogates
            affinity.validate_key(key)
        except (UnicodeError, ValueError):
            return None
    return body


def _frontend_key(token: str) -> bool:
    return ApiKey.objects.verified_role(token) in _FRONTEND_ROLES


def _route(environ, token: str, model: str, body: dict):
    with _request_connection():
        if not _frontend_key(token):
            return None
        result = router.route_warm(model, affinity_key=body.get("affinity_key") or None)
        if result is None:
            environ[WARM_ROUTE_MISSED] = True
            return None
        try:
            headers = []
            if settings.CONTROLPLANE_NODE_HEADER:
                headers.append(("X-Control-Plane-Node", node_header_value(result.node_name)))
            return _lease_answer(result), headers
        except BaseException:
            # As the view: the caller would never learn this lease, so its slot is given back.
            Lease.objects.release(result.lease.pk)
            raise


def _release(token: str, lease_id):
    with _request_connection():
        if not _frontend_key(token):
            return None
        outcome = Lease.objects.release_with_outcome(lease_id, now=timezone.now())
        if not outcome.exists:
            return None  # the view answers the 404 (its statement finds nothing either)
        return _release_answer(lease_id, outcome.released, outcome.released_at), []


class _request_connection:
    """The database connection's lifecycle of one request, as ``request_started`` and
    ``request_finished`` run it (``close_old_connections``) for the one connection this path
    uses, with the check of the module doc in place of ``SELECT 1``."""

    def __enter__(self):
        self.connection = connection = connections[Lease.objects.db]
        connection.close_if_unusable_or_obsolete()  # past DATABASE_CONN_MAX_AGE, or broken -> closed
        if connection.connection is not None:
            if _closed_by_server(connection):
                logger.info("a kept database connection was closed by the server; opening a new one")
                connection.close()
            else:
                connection.health_check_done = True
        return connection

    def __exit__(self, *exc_info):
        self.connection.close_if_unusable_or_obsolete()
        return False


def _closed_by_server(connection) -> bool:
    """Whether an idle kept connection has something to read: the server's termination notice
    or end of stream (an idle PostgreSQL session is sent nothing else that this project asks
    for; a spurious notice only costs a new connection). SQLite has no server to lose."""
    if connection.vendor != "postgresql":
        return False
    try:
        readable, _, _ = select.select([connection.connection.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
