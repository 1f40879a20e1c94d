"""Every API error as an RFC 9457 problem document (``application/problem+json``).

One DRF exception handler (``exception_handler``, set in ``REST_FRAMEWORK``) turns every
exception a view raises into ``{type, title, status, detail, code}`` (plus ``errors``, a map of
field -> messages, for validation errors). Django-level errors on ``/api/`` paths (no URL
matched, an uncaught exception, a bad Host header) become problem documents too, through
``handler404``/``handler500``/... and ``ProblemResponseMiddleware``, so no HTML page ever
reaches an API client.

Domain errors: subclass ``ProblemError`` with a ``status_code``, a stable ``default_code`` and a
``title``, and raise it from a view (see ``registry/api/problems.py``)::

    class NoLoadInfo(ProblemError):
        status_code = 404
        default_code = "no_load_info"
        title = "No load info"

Mapped here, once:

=====================================================  ======  ==========================
exception                                              status  code
=====================================================  ======  ==========================
ProblemError subclasses                                theirs  theirs
DRF ValidationError, django ValidationError            400     validation_error
DRF ParseError (core/parsers.py's bounds too)  400     parse_error
a path that is not UTF-8 (controlplane/httpserver.py)  400     invalid_path
django.db.DataError (a value the database refuses)     400     invalid_data
NotAuthenticated / AuthenticationFailed                401     not_authenticated / invalid_token
PermissionDenied                                       403     permission_denied (or the permission's code)
NotFound, Http404, ObjectDoesNotExist                  404     not_found
MethodNotAllowed / NotAcceptable                       405/406 method_not_allowed / not_acceptable
django.db.IntegrityError (a uniqueness race)           409     conflict
RequestDataTooBig                                      413     payload_too_large
UnsupportedMediaType                                   415     unsupported_media_type
Throttled                                              429     throttled
django.db.OperationalError / InterfaceError            503     database_unavailable
redis ConnectionError / TimeoutError (REDIS_URL)       503     broker_unavailable
=====================================================  ======  ==========================

Answered by gunicorn before Django, as problem documents too (``controlplane/httpserver.py``):
a request line over 4094 bytes is a 414 ``uri_too_long``, too many or too large header fields a
431 ``request_header_fields_too_large``, a malformed request line or header a 400 ``bad_request``.

Anything else is a bug: it is left to Django (logged by ``django.request``, then ``handler500``
answers a 500 problem without a traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from django.views import defaults as django_defaults
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import set_rollback

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:controlplane:problem:"
API_PATH_PREFIX = "/api/"
# Seconds a client should wait before retrying after a 503 (the database may be restarting).
DATABASE_RETRY_AFTER = 5


class ProblemError(exceptions.APIException):
    """Base of domain errors: a status, a stable machine-readable ``code`` and a ``title``.

    ``detail`` is the human-readable explanation of this occurrence; ``extra`` adds members to
    the problem document (RFC 9457 extension members, e.g. ``{"model": name}``); ``headers``
    adds response headers (e.g. ``{"Retry-After": "5"}`` on a 503 that asks to come back).
    """

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_request"
    default_detail = "The request cannot be processed."
    title: str | None = None

    def __init__(
        self,
        detail=None,
        *,
        code: str | None = None,
        extra: Mapping | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(detail=detail, code=code or self.default_code)
        self.code = code or self.default_code
        self.extra = dict(extra or {})
        self.headers = {name: str(value) for name, value in (headers or {}).items()}


class Conflict(ProblemError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The request conflicts with a concurrent change; retry it."
    title = "Conflict"


class PayloadTooLarge(ProblemError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "payload_too_large"
    default_detail = "The request body is larger than this server accepts."
    title = "Request body too large"


class DatabaseUnavailable(ProblemError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "database_unavailable"
    default_detail = "The database is unavailable; retry later."
    title = "Database unavailable"


@dataclass
class Problem:
    """A problem document before rendering."""

    status: int
    code: str
    detail: str
    title: str | None = None
    errors: dict[str, list[str]] | None = None
    extra: dict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        body = {
            "type": PROBLEM_TYPE_PREFIX + self.code,
            "title": self.title or _reason(self.status),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        for key, value in self.extra.items():
            body.setdefault(key, value)
        return body


def _reason(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


# --- validation errors -----------------------------------------------------------------------


def flatten_errors(detail, prefix: str = "") -> dict[str, list[str]]:
    """DRF/Django error structures -> ``{"field": [messages]}``; nested fields are dotted
    (``labels.zone``), list positions are indices, non-field errors use DRF's key."""
    non_field = api_settings.NON_FIELD_ERRORS_KEY
    flat: dict[str, list[str]] = {}

    def add(key: str, message) -> None:
        flat.setdefault(key or non_field, []).append(str(message))

    def walk(node, key: str) -> None:
        if isinstance(node, Mapping):
            for child_key, child in node.items():
                walk(child, f"{key}.{child_key}" if key else str(child_key))
        elif isinstance(node, (list, tuple)):
            if all(not isinstance(item, (Mapping, list, tuple)) for item in node):
                for item in node:
                    add(key, item)
            else:
                for index, item in enumerate(node):
                    if isinstance(item, (Mapping, list, tuple)):
                        walk(item, f"{key}.{index}" if key else str(index))
                    else:
                        add(key, item)
        else:
            add(key, node)

    walk(detail, prefix)
    return flat


def _validation_problem(errors: dict[str, list[str]]) -> Problem:
    summary = "; ".join(f"{name}: {' '.join(messages)}" for name, messages in errors.items())
    return Problem(
        status=400,
        code="validation_error",
        title="Invalid request",
        detail=summary or "The request is invalid.",
        errors=errors,
    )


def _django_validation_errors(exc: DjangoValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        return {name: [str(m) for m in messages] for name, messages in exc.message_dict.items()}
    return {api_settings.NON_FIELD_ERRORS_KEY: [str(m) for m in exc.messages]}


# --- the mapping -----------------------------------------------------------------------------


def problem_for_exception(exc: Exception) -> Problem | None:
    """The problem an exception stands for, or None for an unexpected exception (a bug)."""
    if isinstance(exc, ProblemError):
        return Problem(
            status=exc.status_code,
            code=exc.code,
            title=exc.title,
            detail=str(exc.detail),
            extra=exc.extra,
            headers=dict(exc.headers),
        )
    if isinstance(exc, exceptions.ValidationError):
        return _validation_problem(flatten_errors(exc.detail))
    if isinstance(exc, DjangoValidationError):
        return _validation_problem(_django_validation_errors(exc))
    if isinstance(exc, exceptions.AuthenticationFailed):
        problem = Problem(
            status=exc.status_code, code="invalid_token", title="Invalid credentials", detail=str(exc.detail)
        )
        _auth_headers(exc, problem)
        return problem
    if isinstance(exc, exceptions.NotAuthenticated):
        problem = Problem(
            status=exc.status_code, code="not_authenticated", title="Authentication required", detail=str(exc.detail)
        )
        _auth_headers(exc, problem)
        return problem
    if isinstance(exc, exceptions.PermissionDenied):
        return Problem(status=exc.status_code, code=_code_of(exc), title="Permission denied", detail=str(exc.detail))
    if isinstance(exc, (Http404, ObjectDoesNotExist)):
        detail = str(exc) if isinstance(exc, ObjectDoesNotExist) and str(exc) else "Not found."
        return Problem(status=404, code="not_found", title="Not found", detail=detail)
    if isinstance(exc, DjangoPermissionDenied):
        return Problem(
            status=403, code="permission_denied", title="Permission denied", detail=str(exc) or "Permission denied."
        )
    if isinstance(exc, IntegrityError):
        # A uniqueness race lost against a concurrent writer: the client may simply retry.
        logger.info("integrity error answered as 409: %s", exc)
        return Problem(status=409, code="conflict", title="Conflict", detail=Conflict.default_detail)
    if isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("database unavailable, answering 503: %s", exc)
        return Problem(
            status=503,
            code="database_unavailable",
            title=DatabaseUnavailable.title,
            detail=DatabaseUnavailable.default_detail,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        # django-q2's Redis broker (REDIS_URL) does not answer: a cold load could not be handed
        # to a qcluster. Its LoadJob row is kept, pending; a retry attaches to it, and the
        # reconciler's housekeeping sends it again once the broker answers.
        logger.warning("task broker unavailable, answering 503: %s", exc)
        return Problem(
            status=503,
            code="broker_unavailable",
            title="Task broker unavailable",
            detail="The task broker (Redis) does not answer; retry later.",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )
    if isinstance(exc, DataError):
        return Problem(
            status=400,
            code="invalid_data",
            title="Invalid data",
            detail="A value is out of range or malformed for storage.",
        )
    if isinstance(exc, RequestDataTooBig):
        return Problem(
            status=413, code="payload_too_large", title=PayloadTooLarge.title, detail=PayloadTooLarge.default_detail
        )
    if isinstance(exc, exceptions.Throttled):
        problem = Problem(status=exc.status_code, code="throttled", title="Too many requests", detail=str(exc.detail))
        if exc.wait is not None:
            problem.headers["Retry-After"] = str(int(exc.wait))
        return problem
    if isinstance(exc, exceptions.APIException):
        # ParseError, MethodNotAllowed, NotAcceptable, UnsupportedMediaType, NotFound, ...
        return Problem(status=exc.status_code, code=_code_of(exc), detail=str(exc.detail))
    return None


def _code_of(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


def _auth_headers(exc: exceptions.APIException, problem: Problem) -> None:
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        problem.headers["WWW-Authenticate"] = auth_header


def exception_handler(exc, context):
    """REST_FRAMEWORK["EXCEPTION_HANDLER"]: the one place exceptions become HTTP answers."""
    problem = problem_for_exception(exc)
    if problem is None:
        return None  # a bug: Django logs it and handler500 answers a 500 problem
    set_rollback()
    return Response(
        problem.as_dict(), status=problem.status, headers=problem.headers, content_type=PROBLEM_CONTENT_TYPE
    )


# --- Django-level errors on /api/ paths -------------------------------------------------------


def is_api_path(request) -> bool:
    return request.path.startswith(API_PATH_PREFIX)


def problem_response(problem: Problem) -> JsonResponse:
    response = JsonResponse(problem.as_dict(), status=problem.status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in problem.headers.items():
        response[name] = value
    return response


_GENERIC = {
    400: ("bad_request", "The request is malformed."),
    403: ("permission_denied", "Permission denied."),
    404: ("not_found", "No API endpoint at this path."),
    413: ("payload_too_large", PayloadTooLarge.default_detail),
    # Answered by gunicorn before Django (controlplane/httpserver.py, gunicorn.conf.py).
    414: (
        "uri_too_long",
        "The request line is longer than this server accepts (4094 bytes); names are at most 255 characters.",
    ),
    431: ("request_header_fields_too_large", "The request headers are larger than this server accepts."),
    500: ("internal_error", "The server failed to answer this request; the error was logged."),
}


def generic_problem(status_code: int) -> Problem:
    code, detail = _GENERIC.get(
        status_code, (_reason(status_code).lower().replace(" ", "_").replace("-", "_"), _reason(status_code))
    )
    return Problem(status=status_code, code=code, detail=detail)


def handler400(request, exception=None):
    if is_api_path(request):
        return problem_response(generic_problem(400))
    return django_defaults.bad_request(request, exception)


def handler403(request, exception=None):
    if is_api_path(request):
        return problem_response(generic_problem(403))
    return django_defaults.permission_denied(request, exception)


def handler404(request, exception=None):
    if is_api_path(request):
        return problem_response(generic_problem(404))
    return django_defaults.page_not_found(request, exception)


def handler500(request):
    if is_api_path(request):
        return problem_response(generic_problem(500))
    return django_defaults.server_error(request)


class ProblemResponseMiddleware:
    """Last line of defence for ``/api/`` paths: an error answer that is not already a DRF or
    JSON response (Django's debug pages, CSRF failures, a disallowed Host, a 404 from the URL
    resolver while DEBUG is on) is replaced by a problem document of the same status, so an API
    client never sees HTML or a traceback."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.status_code < 400 or not is_api_path(request) or isinstance(response, Response):
            return response
        content_type = response.get("Content-Type", "")
        if "json" in content_type:
            return response
        problem = generic_problem(response.status_code)
        if response.status_code == 405 and response.has_header("Allow"):
            problem.headers["Allow"] = response["Allow"]
        return problem_response(problem)
