"""Log context and formats.

* Context: ``request_id``, ``pass_id``, ``node``, ``model``, ``replica`` live in context
  variables, set by ``RequestIdMiddleware`` (per HTTP request: the request id, plus the node,
  model and lease named by the URL) and by the reconciler around each pass (``pass_id``).
  ``ContextFilter`` (on the console handler) copies them onto every record; a value given with
  ``extra=`` wins. Context variables follow threads started with ``contextvars.copy_context``
  and are per-thread otherwise, so concurrent requests never see each other's ids.
* Formats: readable lines by default (context fields appended as ``key=value`` when set);
  one JSON object per line when ``LOG_FORMAT=json`` (``JsonFormatter``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime

CONTEXT_FIELDS = ("request_id", "pass_id", "node", "model", "replica")
_VARS: dict[str, contextvars.ContextVar] = {
    name: contextvars.ContextVar(f"controlplane_log_{name}", default=None) for name in CONTEXT_FIELDS
}
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def get_context() -> dict[str, object]:
    """The context fields that are set, by name."""
    values = {name: var.get() for name, var in _VARS.items()}
    return {name: value for name, value in values.items() if value not in (None, "")}


@contextmanager
def log_context(**fields):
    """Set context fields (names from ``CONTEXT_FIELDS``) for the block; restored after."""
    tokens = []
    try:
        for name, value in fields.items():
            if value is not None:
                tokens.append((_VARS[name], _VARS[name].set(str(value))))
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds every context field to the record (``None`` when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class ClientErrorTracebackFilter(logging.Filter):
    """Drops the traceback from records about a client's mistake: Django logs a disallowed
    Host, a suspicious request (``django.security.*``) and a 4xx from a Django-level exception
    (``django.request``, e.g. an admin ``PermissionDenied``) with the exception attached. Anyone
    can trigger those, so they stay one line each; 5xx records keep theirs (those are bugs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_client_error(record):
            record.exc_info = None
            record.exc_text = None
        return True


def _is_client_error(record: logging.LogRecord) -> bool:
    if record.name.startswith("django.security."):
        return True
    return record.name == "django.request" and 400 <= getattr(record, "status_code", 500) < 500


class ReadableFormatter(logging.Formatter):
    """``asctime level logger message [key=value ...]``."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, style: str = "%", **kwargs):
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s %(message)s", datefmt, style, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, None)) not in (None, "")
        ]
        if extras:
            first, sep, rest = line.partition("\n")
            line = f"{first} [{' '.join(extras)}]{sep}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    the context fields that are set, ``exc_info`` (the formatted traceback) when present, and
    any other ``extra=`` attributes that JSON can carry."""

    _RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                document[name] = value
        for key, value in record.__dict__.items():
            if key in self._RESERVED or key in document or key in CONTEXT_FIELDS or key.startswith("_"):
                continue
            document[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str)


def logging_config(*, level: str = "INFO", fmt: str = "readable") -> dict:
    """The ``LOGGING`` dict of settings.py: one console handler with the context filter."""
    formatter = "json" if fmt.strip().lower() == "json" else "readable"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "core.logs.ContextFilter"},
            "client_errors": {"()": "core.logs.ClientErrorTracebackFilter"},
        },
        "formatters": {
            "readable": {"()": "core.logs.ReadableFormatter"},
            "json": {"()": "core.logs.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["context", "client_errors"],
            },
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"django.db.backends": {"level": "INFO"}},
    }


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_for(incoming: str | None) -> str:
    """The id of a request: its ``X-Request-ID`` when that is a sane token, else a new one."""
    return incoming if incoming and _VALID_REQUEST_ID.match(incoming) else new_request_id()


def begin_request(request_id: str, **fields) -> None:
    """Start a request's log context: every field cleared, then ``request_id`` and ``fields``
    (names from ``CONTEXT_FIELDS``) set. Cleared again on ``request_finished`` (or by the
    caller, ``clear_context``, where Django's request cycle does not run)."""
    clear_context()
    _VARS["request_id"].set(request_id)
    for name, value in fields.items():
        if value not in (None, ""):
            _VARS[name].set(str(value))


class RequestIdMiddleware:
    """Outermost middleware: takes ``X-Request-ID`` from the request when it is a sane token
    (else makes one), sets it for the request's log lines, answers it in ``X-Request-ID``, and
    adds the node, model and lease named by the matched URL to the log context."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        request.request_id = request_id
        # Not reset when this returns: Django logs 4xx/5xx answers ("django.request") after the
        # middleware chain. Cleared on request_finished (the response was sent) instead.
        begin_request(request_id)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    def process_view(self, request, view_func, view_args, view_kwargs):
        for kwarg, field in (("node_id", "node"), ("model", "model")):
            value = view_kwargs.get(kwarg)
            if value not in (None, ""):
                _VARS[field].set(str(value))
        return None


def clear_context(**_kwargs) -> None:
    """Unset every context field (a ``request_finished`` receiver, see apps.py)."""
    for var in _VARS.values():
        var.set(None)
