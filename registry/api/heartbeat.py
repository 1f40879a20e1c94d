"""The heartbeat's lean path: ``POST /api/node/{id}/heartbeat`` answered below Django's request
cycle, for the one shape of request every worker sends every heartbeat interval.

``HeartbeatLeanPath`` wraps the WSGI application (``controlplane/wsgi.py``). A heartbeat that
is ordinary in every respect (below) is answered here with one UPDATE and no Django request,
middleware chain, URL resolution or DRF view: that machinery was most of a heartbeat's cost.
Everything else, and every heartbeat this path does not answer 200, goes on to the full
application untouched (the body it read is handed on), where the DRF view
(``NodeSelfViewSet.heartbeat``) answers exactly as before: its problems (401, 403, 404, 400,
406, 413, 415, 503, a disallowed host, ...), in the same order (credentials before the body).
So the lean path never writes an error answer of its own and cannot answer differently from
the full one; ``tests/api/test_heartbeat_lean_path.py`` compares the two.

Ordinary means: a bearer token (a node token, or the fleet registration token while fleet-token
nodes are allowed); a body of at most ``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes with its
``Content-Length``, JSON (``application/json``, UTF-8) or empty; an ``Accept`` that takes
``application/json`` (or none); a host Django allows; no HTTPS redirect or HSTS to apply; and a
body that ``parse_heartbeat`` (the validation the DRF view runs too) accepts.

What the middleware does for this path is done here, and nothing else is needed:

* the request id (``X-Request-ID`` in and out) and the log context (request id, node), as
  ``core.logs.RequestIdMiddleware``;
* the request counters and latency (``controlplane_http_requests``, route ``node-heartbeat``),
  as ``core.metrics.RequestMetricsMiddleware``;
* the headers ``SecurityMiddleware`` and ``XFrameOptionsMiddleware`` add to every answer, and
  DRF's ``Allow``; the host check of ``CommonMiddleware`` (``request.get_host()``);
* database connections: the request's start and end close a connection past
  ``DATABASE_CONN_MAX_AGE`` or with errors, as Django's ``request_started`` and
  ``request_finished`` do. The health check is the UPDATE itself: a kept connection that turns
  out dead (PostgreSQL restarted) is closed and the UPDATE sent again once on a new one, instead
  of a ``SELECT 1`` before every heartbeat. Sending it again is harmless: a heartbeat's UPDATE
  sets the same values however often it runs.

Sessions, CSRF, messages, authentication middleware, static files and problem rewriting have no
job on a JSON heartbeat authenticated by a bearer token. Authentication is the UPDATE's own
condition (``Node.objects.heartbeat_with_token``, ``heartbeat_as_fleet_token_node``): no read.

Coalescing (``registry/heartbeat_flush.py``): a steady heartbeat of a node whose token this
process saw the database accept lately (``registry.heartbeat_cache``) is not written here: it
is put into the process's buffer, answered at once with the status and address the database
last answered, and written by the flusher within ``CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS``, many
nodes per statement. Every other heartbeat is written before it is answered, as above, and its
answer fills the cache. The full path (the DRF view) never coalesces.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import time

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIRequest
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connections
from django.http.request import split_domain_port, validate_host
from rest_framework.renderers import JSONRenderer

from core.logs import REQUEST_ID_HEADER, begin_request, clear_context, request_id_for
from core.metrics import observe_answer
from core.parsers import loads_strict
from core.tokens import hash_token, secret_matches
from registry.clock import resolve_now
from registry.heartbeat_cache import node_tokens
from registry.heartbeat_flush import COALESCED_STATUSES, flusher
from registry.models import Node

from .auth import fleet_token_nodes_allowed
from .serializers import HeartbeatInvalid, parse_heartbeat

logger = logging.getLogger(__name__)

# The heartbeat's URL (controlplane/urls.py: api/node/<uuid:node_id>/heartbeat) and its name.
HEARTBEAT_PATH = re.compile(
    r"/api/node/(?P<node_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/heartbeat"
)
ROUTE_NAME = "node-heartbeat"
_JSON_RANGES = frozenset({"*/*", "application/*", "application/json"})
_RENDERER = JSONRenderer()


class HeartbeatLeanPath:
    """WSGI middleware: answers an ordinary heartbeat itself, hands everything else on."""

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "POST":
            match = HEARTBEAT_PATH.fullmatch(environ.get("PATH_INFO", ""))
            if match is not None:
                answered = answer_heartbeat(environ, start_response, match["node_id"])
                if answered is not None:
                    return answered
        return self.application(environ, start_response)


def answer_heartbeat(environ, start_response, node_id: str):
    """The 200 answer's body (a list, as WSGI wants it) after calling ``start_response``, or
    None when the full application must answer (then ``environ`` can be served as received)."""
    started = time.perf_counter()
    token = _bearer(environ)
    if token is None or not _plain(environ):
        return None
    body = _read_body(environ)
    if body is None:
        return None
    try:
        figures = parse_heartbeat(loads_strict(body.decode("utf-8")) if body else {})
    except (ValueError, HeartbeatInvalid):  # the full path answers the 400 (after authenticating)
        return None
    request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
    answer = run_lean(environ, request_id, "heartbeat", lambda: _record(node_id, token, figures), node=node_id)
    if answer is None:
        return None
    return answer_ok(
        start_response, {"status": answer[0], "address": answer[1]}, ROUTE_NAME, request_id, started=started
    )


def run_lean(environ, request_id: str, path_name: str, work, **log_context):
    """``work()``'s answer under the request's log context (``request_id`` and ``log_context``),
    or None when the full request cycle must answer instead: ``work`` said so (None), the
    database failed (the full path runs it again on a new connection, or answers 503), or a
    bug raised (logged: it must not cost the caller its request). The full path then answers
    with the same request id."""
    begin_request(request_id, **log_context)
    try:
        answer = work()
    except DatabaseError:
        answer = None
    except Exception:  # noqa: BLE001 - see the docstring
        logger.exception("%s lean path failed; the full request cycle answers", path_name)
        answer = None
    finally:
        clear_context()
    if answer is None:
        environ["HTTP_X_REQUEST_ID"] = request_id  # one id for the request, whoever answers
    return answer


def answer_ok(start_response, document, route_name: str, request_id: str, *, started: float, headers=()):
    """A lean path's 200: ``document`` as the DRF view renders it, with the headers the full
    request cycle adds, and the request's metrics as the middleware records them."""
    content = _RENDERER.render(document)
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(content))),
            *headers,
            *_fixed_headers(),
            (REQUEST_ID_HEADER, request_id),
        ],
    )
    try:
        observe_answer(route_name, "POST", 200, time.perf_counter() - started)
    except Exception:  # noqa: BLE001 - metrics must never break a request (as the middleware)
        logger.debug("request metrics failed", exc_info=True)
    return [content]


def _fixed_headers() -> list[tuple[str, str]]:
    """What the middleware and DRF add to every answer of the DRF view (besides the request id):
    DRF's ``Allow``, ``XFrameOptionsMiddleware``'s and ``SecurityMiddleware``'s headers."""
    headers = [("Allow", "POST, OPTIONS"), ("X-Frame-Options", settings.X_FRAME_OPTIONS.upper())]
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append(("X-Content-Type-Options", "nosniff"))
    policy = settings.SECURE_REFERRER_POLICY
    if policy:
        values = policy.split(",") if isinstance(policy, str) else policy
        headers.append(("Referrer-Policy", ",".join(value.strip() for value in values)))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
    return headers


def _bearer(environ) -> str | None:
    parts = environ.get("HTTP_AUTHORIZATION", "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].isascii():
        return None
    return parts[1]


def _plain(environ) -> bool:
    """Whether nothing about the request needs the full request cycle (see the module doc)."""
    if settings.SECURE_SSL_REDIRECT or settings.SECURE_HSTS_SECONDS:
        return False
    if not _accepts_json(environ.get("HTTP_ACCEPT", "")):
        return False
    content_type = environ.get("CONTENT_TYPE", "")
    if content_type:
        media_type, _, params = content_type.partition(";")
        if media_type.strip().lower() != "application/json":
            return False
        params = params.strip().lower().replace(" ", "")
        if params not in ("", "charset=utf-8"):
            return False
    return _host_allowed(environ)


def _host_allowed(environ) -> bool:
    """Django's check of the request's host against ``ALLOWED_HOSTS`` (``get_host()``). The
    usual request (a ``Host`` header, no forwarded host to prefer) is judged once per host
    value and settings (a request's host is a pure function of those); any other is judged by
    ``WSGIRequest.get_host()`` itself."""
    if "HTTP_HOST" in environ and not (settings.USE_X_FORWARDED_HOST and "HTTP_X_FORWARDED_HOST" in environ):
        return _allowed_host(environ["HTTP_HOST"], tuple(settings.ALLOWED_HOSTS), settings.DEBUG)
    try:
        WSGIRequest(environ).get_host()
    except DisallowedHost:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _allowed_host(host: str, allowed_hosts: tuple[str, ...], debug: bool) -> bool:
    """``HttpRequest.get_host()``'s verdict on the raw host ``host`` (its own two steps)."""
    if debug and not allowed_hosts:
        allowed_hosts = (".localhost", "127.0.0.1", "[::1]")
    domain, _port = split_domain_port(host)
    return bool(domain and validate_host(domain, allowed_hosts))


def _accepts_json(accept: str) -> bool:
    if not accept.strip():
        return True
    ranges = [part.strip().lower() for part in accept.split(",")]
    return not any(";" in part for part in ranges) and any(part in _JSON_RANGES for part in ranges)


def _read_body(environ) -> bytes | None:
    """The body, read within Django's limit and put back for the full path; None (nothing read)
    when it has no usable ``Content-Length`` or is too large, or is not JSON while not empty."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if length < 0 or (limit is not None and length > limit) or environ.get("HTTP_TRANSFER_ENCODING"):
        return None
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    if len(body) != length or (body and not environ.get("CONTENT_TYPE")):
        return None
    return body


def _record(node_id: str, token: str, figures: dict) -> tuple[str, str] | None:
    """The heartbeat coalesced (module doc), or its UPDATE, authenticated by its own condition;
    ``(status, address)``, or None when no node matched (the full path then finds out why, by
    reading)."""
    if secret_matches(token, settings.CONTROLPLANE_REGISTRATION_TOKEN):
        if not fleet_token_nodes_allowed():
            return None

        def write():
            return Node.objects.heartbeat_as_fleet_token_node(node_id, **figures)
    else:
        token_hash = hash_token(token)
        known = node_tokens.get(token_hash, node_id)
        if known is not None and known.status in COALESCED_STATUSES and flusher.accepting():
            flusher.enqueue(node_id, token_hash, resolve_now(None), figures)
            return known.status, known.address
        generation = node_tokens.generation

        def write():
            answer = Node.objects.heartbeat_with_token(node_id, token_hash, **figures)
            if answer is not None:
                node_tokens.confirm(token_hash, node_id, *answer, generation)
            return answer

    connection = connections[Node.objects.db]
    close_old_connections()  # as request_started: past DATABASE_CONN_MAX_AGE or broken -> closed
    kept = connection.connection is not None
    if kept:
        connection.health_check_done = True  # the UPDATE is the check (module doc)
    try:
        try:
            return write()
        except (OperationalError, InterfaceError):
            if not kept or connection.in_atomic_block:
                raise
            logger.info("a kept database connection failed; the heartbeat is sent again on a new one")
            connection.close()
            return write()
    finally:
        close_old_connections()  # as request_finished
