"""REST client for the control plane's node API, as the worker sees it.

Paths and bodies (LocalAI's worker wire, see docs/interoperability.md, plus the per-node token):

- ``POST /api/node/register``: bearer = registration token, plus ``X-Node-Token`` = the node's
  current token when re-registering an existing name; answers 201 ``{id, name, node_type,
  status, created_at, node_token, worker_token, backend_token}``.
- ``POST /api/node/{id}/heartbeat`` ``{"available_vram"|"available_ram": n}`` (unknown values
  omitted), ``POST /api/node/{id}/drain``, ``GET /api/node/{id}/models`` (replica rows),
  ``POST /api/node/{id}/deregister``: bearer = the node token from registration.

Errors are RFC 9457 problem documents; :class:`ControlPlaneError` carries their ``code`` and
``detail``. Tokens are only ever put in headers, never in messages or logs.
Stdlib ``http.client`` only: the worker should run with nothing but grpcio and protobuf
installed. (Proxy variables such as ``HTTP_PROXY`` are not read: the control plane is
reached directly.)

**One kept connection.** The client keeps one HTTP/1.1 connection open and sends every call
over it (the control plane's gunicorn keeps an idle connection 20 s, longer than the 10 s
heartbeat interval), so a heartbeat costs no TCP (or TLS) handshake. A kept connection the
server has closed in the meantime is found before sending: an idle connection with something
to read (the server's FIN) is stale, and is replaced by a new one, so no request is ever sent
on it. A connection reset *after* the request went out (the server closed it at the same
moment) is retried once on a new connection only for calls that are safe to repeat (heartbeat,
listing models); any other call (registration above all: it rotates the node's credentials)
surfaces as :class:`ControlPlaneUnreachable` and its caller decides. Timeouts are never
retried: the server may have acted.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import ssl
import threading
import urllib.parse
from typing import Any

log = logging.getLogger("worker.control_plane")


class ControlPlaneUnreachable(Exception):
    """No HTTP answer: connection refused, DNS, timeout, reset."""


class ControlPlaneError(Exception):
    """The control plane answered with an HTTP error status."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.code = problem.get("code")
        self.detail = problem.get("detail") or problem.get("title") or ""
        self.retry_after = retry_after
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [f"HTTP {self.status}"]
        if self.code:
            parts.append(f"code={self.code}")
        if self.detail:
            parts.append(f"detail={self.detail}")
        return " ".join(parts)

    @property
    def retryable(self) -> bool:
        """5xx and 429 may succeed later; any other 4xx will not."""
        return self.status >= 500 or self.status == 429


class RegistrationFailed(Exception):
    """Registration gave up (a non-retryable answer, or every try failed)."""


class RegistrationAborted(Exception):
    """Shutdown was requested while waiting to retry registration."""


def _problem_from_body(status: int, reason: str, body: bytes) -> dict[str, Any]:
    """Normalise an error body into problem fields (RFC 9457; LocalAI's and DRF's shapes too)."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return {"status": status, "title": reason, "detail": text[:300]}
    if not isinstance(data, dict):
        return {"status": status, "title": reason, "detail": str(data)[:300]}
    if isinstance(data.get("error"), dict):  # LocalAI: {"error": {"code", "message", "type"}}
        err = data["error"]
        return {"status": status, "title": reason, "code": err.get("code"), "detail": err.get("message")}
    problem = {k: data.get(k) for k in ("type", "title", "status", "detail", "code") if k in data}
    problem.setdefault("status", status)
    problem.setdefault("title", reason)
    return problem


# What a peer's close looks like when a request is written to, or its answer read from, a
# connection the server has just closed.
_CLOSED_BY_PEER = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class ControlPlaneClient:
    """One method per node-API call. Raises :class:`ControlPlaneUnreachable` or
    :class:`ControlPlaneError`; returns the decoded JSON answer (None for an empty body).

    Calls are serialised over one kept connection (module docstring); ``close`` drops it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, ca_file: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # An https control plane is verified against the system's roots, plus ``ca_file`` (the
        # worker's --tls-ca: a private CA signing the proxy's certificate as well).
        self._ssl_context = ssl.create_default_context()
        if ca_file:
            self._ssl_context.load_verify_locations(cafile=ca_file)
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control plane URL must be http:// or https://host[:port]: {base_url!r}")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def register(self, body: dict[str, Any], registration_token: str, node_token: str | None = None) -> dict[str, Any]:
        """``node_token``: this node's current token, which re-registering an existing name
        needs (sent as ``X-Node-Token``); None for a first registration."""
        extra = {"X-Node-Token": node_token} if node_token else None
        answer = self._request("POST", "/api/node/register", registration_token, body, extra_headers=extra)
        if not isinstance(answer, dict) or not answer.get("id"):
            raise ControlPlaneError(502, {"title": "bad registration answer", "detail": "no node id"})
        return answer

    def heartbeat(self, node_id: str, node_token: str, body: dict[str, Any]) -> Any:
        return self._request("POST", f"/api/node/{self._id(node_id)}/heartbeat", node_token, body, repeatable=True)

    def drain(self, node_id: str, node_token: str) -> Any:
        return self._request("POST", f"/api/node/{self._id(node_id)}/drain", node_token, {})

    def models(self, node_id: str, node_token: str) -> list[dict[str, Any]]:
        answer = self._request("GET", f"/api/node/{self._id(node_id)}/models", node_token, repeatable=True)
        if isinstance(answer, dict) and isinstance(answer.get("results"), list):
            return answer["results"]  # tolerate a paginated envelope
        return answer if isinstance(answer, list) else []

    def deregister(self, node_id: str, node_token: str) -> Any:
        return self._request("POST", f"/api/node/{self._id(node_id)}/deregister", node_token, {})

    def close(self) -> None:
        """Close the kept connection (the next call opens a new one)."""
        with self._lock:
            self._drop_connection()

    @staticmethod
    def _id(node_id: str) -> str:
        return urllib.parse.quote(str(node_id), safe="")

    def _request(
        self,
        method: str,
        path: str,
        token: str,
        body: dict | None = None,
        extra_headers: dict[str, str] | None = None,
        *,
        repeatable: bool = False,
    ) -> Any:
        """``repeatable``: the call may be sent a second time when the connection was reset
        after it went out (module docstring)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, application/problem+json"}
        headers.update(extra_headers or {})
        if data is not None:
            headers["Content-Type"] = "application/json"
        with self._lock:
            try:
                status, reason, retry_after, raw = self._exchange(method, path, data, headers, repeatable)
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise ControlPlaneUnreachable(f"{method} {path}: {exc or type(exc).__name__}") from None
        if status >= 400:
            raise ControlPlaneError(status, _problem_from_body(status, reason, raw), _seconds(retry_after))
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ControlPlaneError(
                502, {"title": "bad answer", "detail": f"{method} {path} did not answer JSON"}
            ) from None

    def _exchange(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str], repeatable: bool
    ) -> tuple[int, str, str | None, bytes]:
        connection, kept = self._usable_connection()
        try:
            response, raw = self._send(connection, method, path, data, headers)
        except _CLOSED_BY_PEER:
            self._drop_connection()
            if not (kept and repeatable):
                raise
            log.debug("kept connection closed by the control plane during %s %s; sending it again", method, path)
            connection, _ = self._usable_connection()
            response, raw = self._send(connection, method, path, data, headers)
        if response.will_close:
            self._drop_connection()
        return response.status, response.reason, response.getheader("Retry-After"), raw

    def _send(self, connection, method, path, data, headers) -> tuple[http.client.HTTPResponse, bytes]:
        connection.request(method, self._prefix + path, body=data, headers=headers)
        response = connection.getresponse()
        return response, response.read()

    def _usable_connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """The kept connection when it is still open (True), else a new one (False). An idle
        kept connection that has something to read was closed by the server (or is out of
        step): it is dropped before anything is written to it."""
        connection = self._connection
        if connection is not None and connection.sock is not None:
            readable, _, _ = select.select([connection.sock], [], [], 0)
            if not readable:
                return connection, True
        self._drop_connection()
        if self._scheme == "https":
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._ssl_context
            )
        else:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._connection, False

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP date: ignore, use our own backoff


def register_with_retry(
    client: ControlPlaneClient,
    body: dict[str, Any],
    registration_token: str,
    *,
    tries: int = 10,
    base_delay: float = 2.0,
    max_delay: float = 30.0,
    stop: threading.Event | None = None,
    node_token: str | None = None,
) -> dict[str, Any]:
    """Register, retrying unreachable/5xx/429 with backoff ``base_delay`` doubling to ``max_delay``.

    Returns the registration answer. Raises :class:`RegistrationFailed` for a non-retryable
    answer (e.g. 401 bad token: the message carries the problem's detail) or after ``tries``
    attempts, and :class:`RegistrationAborted` when ``stop`` is set during a wait.
    """
    stop = stop or threading.Event()
    delay = base_delay
    last: Exception | None = None
    for attempt in range(1, tries + 1):
        try:
            return client.register(body, registration_token, node_token)
        except ControlPlaneError as exc:
            if not exc.retryable:
                raise RegistrationFailed(f"registration refused: {exc.describe()}") from None
            last = exc
            wait = delay if exc.retry_after is None else min(max(exc.retry_after, delay), max_delay)
        except ControlPlaneUnreachable as exc:
            last = exc
            wait = delay
        if attempt == tries:
            break
        log.warning("registration attempt %d/%d failed (%s); retrying in %.1fs", attempt, tries, last, wait)
        if stop.wait(wait):
            raise RegistrationAborted("shutdown requested during registration")
        delay = min(delay * 2, max_delay)
    raise RegistrationFailed(f"registration failed after {tries} tries; last error: {last}")
