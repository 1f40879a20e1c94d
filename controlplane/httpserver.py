"""The HTTP edge, below Django: what gunicorn answers itself, and the request target's bytes.

* **gunicorn's own error answers.** gunicorn refuses some requests before Django sees them: a
  request line longer than ``limit_request_line`` (4094 bytes, see ``gunicorn.conf.py``),
  too many or too large header fields, malformed request lines or headers. It answers those with
  an HTML page and has no hook for the body, so ``install_problem_errors()`` (called by
  ``gunicorn.conf.py``) replaces its error writer: the answer is a problem document
  (``application/problem+json``, code ``uri_too_long`` 414 for an overlong request line,
  ``request_header_fields_too_large`` 431, ``bad_request`` 400 otherwise), and the connection
  is closed gracefully (the rest of the request is read and dropped for a moment first), so a
  client still sending its request gets the answer instead of a connection reset.
* **Raw UTF-8 in the path.** A client may send non-ASCII bytes in the request line unescaped.
  gunicorn decodes the line as latin-1 and then UTF-8-encodes it again while unquoting, so
  ``PATH_INFO`` would name a different (garbled) model than the same path percent-encoded.
  ``RequestPathGuard`` (the WSGI wrapper of ``controlplane.wsgi``) rebuilds ``PATH_INFO`` from
  the raw request target so that both spellings are the same name.
* **Invalid UTF-8 in the path** (``%FF``, raw or escaped) is a 400 ``invalid_path`` problem
  (``RequestPathGuard`` marks it, ``InvalidPathMiddleware`` answers) instead of becoming a name
  with a literal ``%FF`` in it.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
_REQUEST_LINE_TOO_LARGE = "Request Line is too large"


# --- gunicorn's error answers -----------------------------------------------------------------


def problem_for_server_error(status: int, reason: str, message: str) -> tuple[int, str, bytes]:
    """(status, reason, body) of the problem document for an error gunicorn answers itself."""
    if status == 400 and message.startswith(_REQUEST_LINE_TOO_LARGE):
        status, reason = 414, "URI Too Long"
    try:
        from core.problems import generic_problem  # Django is loaded in a serving worker

        document = generic_problem(status).as_dict()
    except Exception:  # noqa: BLE001 - an answer without the project's wording beats no answer
        code = reason.lower().replace(" ", "_").replace("-", "_")
        document = {"type": f"urn:controlplane:problem:{code}", "title": reason, "status": status, "detail": reason}
        document["code"] = code
    return status, reason, json.dumps(document).encode()


def write_problem_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``: a problem document, then a lingering close."""
    from gunicorn import util

    from core.problems import PROBLEM_CONTENT_TYPE

    status_int, reason, body = problem_for_server_error(status_int, reason, mesg)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)
    drain_before_close(sock)


def drain_before_close(sock) -> None:
    """Read and drop what the client is still sending, for a bounded time and amount, after the
    answer was written: closing a socket with unread input makes the kernel send a reset, which
    can destroy the answer before the client reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except (OSError, ValueError):
        return  # the client is gone or the socket cannot linger: nothing more to do


def install_problem_errors() -> None:
    """Make gunicorn's own 4xx answers problem documents (its workers call
    ``gunicorn.util.write_error`` by module attribute, for every worker class)."""
    from gunicorn import util

    util.write_error = write_problem_error


# --- the request target -----------------------------------------------------------------------


def path_info_from_raw_uri(raw_uri: str, script_name: str = "") -> str:
    """``PATH_INFO`` as PEP 3333 wants it (the path's bytes, unquoted, as a latin-1 string) from
    gunicorn's ``RAW_URI`` (the request target's bytes as a latin-1 string)."""
    target = raw_uri
    if target.startswith("//"):  # gunicorn's own rule: a path, not a network location
        path = urllib.parse.urlsplit("." + target).path[1:]
    else:
        path = urllib.parse.urlsplit(target).path
    path = urllib.parse.unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
    if script_name and path.startswith(script_name):
        path = path[len(script_name) :]
    return path


# Set by RequestPathGuard, read by InvalidPathMiddleware: Django replaces PATH_INFO in the same
# environ dict with its decoded (and re-escaped) form, so the bytes must be judged before it.
PATH_NOT_UTF8 = "controlplane.path_not_utf8"


class RequestPathGuard:
    """WSGI wrapper of ``controlplane.wsgi``: under gunicorn, a request target with raw
    non-ASCII bytes gets its ``PATH_INFO`` rebuilt from the bytes; a path whose bytes are not
    UTF-8 is marked for ``InvalidPathMiddleware``. Nothing else changes."""

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        raw_uri = environ.get("RAW_URI")
        if raw_uri and not raw_uri.isascii() and environ.get("SERVER_SOFTWARE", "").startswith("gunicorn"):
            environ["PATH_INFO"] = path_info_from_raw_uri(raw_uri, environ.get("SCRIPT_NAME", ""))
        try:
            environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        except UnicodeError:
            environ[PATH_NOT_UTF8] = True
        return self.application(environ, start_response)


def served_application(django_application):
    """What gunicorn serves (``controlplane.wsgi``): ``RequestPathGuard`` around the heartbeat's
    lean path (``registry/api/heartbeat.py``) around the warm route's and release's
    (``registry/api/lean_route.py``) around Django's WSGI application."""
    from registry.api.heartbeat import HeartbeatLeanPath  # needs the apps loaded
    from registry.api.lean_route import LeanRoutePath

    return RequestPathGuard(HeartbeatLeanPath(LeanRoutePath(django_application)))


class InvalidPathMiddleware:
    """A path whose bytes are not UTF-8 cannot name anything: 400 (a problem on ``/api/``)
    instead of Django's fallback of re-escaping the bad bytes into the name (``%FF`` and
    ``%25FF`` would both become the name ``%FF``)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.META.get(PATH_NOT_UTF8):
            return self.get_response(request)
        from django.http import HttpResponseBadRequest

        from core.problems import Problem, is_api_path, problem_response

        if not is_api_path(request):
            return HttpResponseBadRequest("The request path is not valid UTF-8.")
        return problem_response(
            Problem(
                status=400,
                code="invalid_path",
                title="Invalid path",
                detail="The request path is not valid UTF-8 once percent-decoded.",
            )
        )
