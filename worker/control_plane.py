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
Standard library only (the HTTP exchange is ``proto.keepalive``'s): the worker should run
with nothing but grpcio and protobuf installed. (Proxy variables such as ``HTTP_PROXY`` are not read: the control plane is
reached directly.)

**One kept connection** (``proto.keepalive.KeptConnection``, standard library only): every
call goes over one HTTP/1.1 connection (the control plane's gunicorn keeps an idle connection
20 s, longer than the 10 s heartbeat interval), so a heartbeat costs no TCP (or TLS) handshake.
A kept connection the server has closed in the meantime is found before sending and replaced,
and a request that could not be written whole is sent again (the server never saw it); a
connection reset *after* the request went out (the server closed it at the same moment) is
retried once on a new connection only for calls that are safe to repeat (heartbeat, listing
models); any other call (registration above all: it rotates the node's credentials) surfaces
as :class:`ControlPlaneUnreachable` and its caller decides. Timeouts are never retried: the
server may have acted.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import urllib.parse
from typing import Any

from proto.keepalive import KeptConnection

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


class ControlPlaneClient:
    """One method per node-API call. Raises :class:`ControlPlaneUnreachable` or
    :class:`ControlPlaneError`; returns the decoded JSON answer (None for an empty body).

    Calls are serialised over one kept connection (module docstring); ``close`` drops it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, ca_file: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # An https control plane is verified against the system's roots, plus ``ca_file`` (the
        # worker's --tls-ca: a private CA signing the proxy's certificate as well).
        ssl_context = ssl.create_default_context()
        if ca_file:
            ssl_context.load_verify_locations(cafile=ca_file)
        self._kept = KeptConnection(self.base_url, timeout=timeout, ssl_context=ssl_context)
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
            self._kept.close()

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
                response, raw = self._kept.exchange(method, path, data, headers, repeatable=repeatable)
            except (OSError, http.client.HTTPException) as exc:
                raise ControlPlaneUnreachable(f"{method} {path}: {exc or type(exc).__name__}") from None
        status, reason, retry_after = response.status, response.reason, response.getheader("Retry-After")
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
