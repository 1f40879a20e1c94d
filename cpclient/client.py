"""``ControlPlaneClient``: the frontend side of ``/api/v1/`` over kept HTTP/1.1 connections.

**One kept connection per thread** (``proto.keepalive.KeptConnection``, standard library
only; it writes a request in one send and parses the answer itself, which costs a fraction of
``http.client``'s CPU): a client's calls from one thread share one connection, so a route +
release costs no TCP (or TLS) handshake; a client used from several threads keeps one
connection per thread. The request headers are made once per API key.
A kept connection the server closed meanwhile (gunicorn's keep-alive expiry, a restart) is
found before sending and replaced. A request that could not be written whole is sent again on
a new connection (the server never saw it); one whose answer was lost after it went out is sent
again at once only when repeating it is harmless (reads, ``PUT``, a lease release or renewal),
never a route (it may have granted a lease) or another ``POST``. ``close()`` closes them.
Proxy variables are not read and redirects are not followed (the control plane is reached
directly and answers without redirects).

Retries, bounded and on purpose:

* **503** (database unavailable, a load already in progress, ...): wait ``Retry-After`` when the
  answer sends it, else an exponential backoff (``backoff_base * 2**attempt``, capped at
  ``backoff_max``, with jitter), at most ``max_retries`` times and never past the call's
  deadline; then :class:`UnavailableError`.
* **202** from ``route`` (a cold load is running): poll the load job every ``Retry-After``
  seconds; when it succeeds, route again (the warm path leases the new replica); when it fails,
  :class:`LoadFailed` with the job's ``error_code``; at the deadline :class:`DeadlineExceeded`.
* Connection errors are retried like a 503 for reads (``GET``) only: a lost answer to a
  ``POST .../route`` may have granted a lease, so it is reported, not repeated.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proto.keepalive import KeptConnection

from .errors import ControlPlaneError, DeadlineExceeded, LoadFailed, TransportError, error_for
from .operator import OperatorCalls

logger = logging.getLogger(__name__)

DEFAULT_SERVER_WAIT = 30.0  # the server's ROUTE_WAIT_SECONDS default


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Lease:
    """A granted lease: send the request to ``address`` (the replica's ``backend.Backend``),
    then release it (``ControlPlaneClient.release`` or the ``lease`` context manager).

    ``model_identity`` is what every request to the replica must carry as ``ModelIdentity``
    (the ``Model`` the replica was loaded with; "" = none). :meth:`predict`,
    :meth:`predict_stream` and :meth:`embedding` call the replica with it set; for any other
    RPC, build the request with the project's stubs and set ``ModelIdentity`` yourself. These
    calls need ``grpcio`` and ``protobuf`` (the rest of cpclient is standard library only).
    """

    lease_id: str
    model_name: str
    node_id: str
    node_name: str
    address: str
    replica_index: int
    expires_at: datetime | None
    model_identity: str = ""
    backend_token: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Lease:
        return cls(
            lease_id=str(body["lease_id"]),
            model_name=str(body.get("model_name", "")),
            node_id=str(body["node_id"]),
            node_name=str(body.get("node_name", "")),
            address=str(body["address"]),
            replica_index=int(body["replica_index"]),
            expires_at=_parse_time(body.get("expires_at")),
            model_identity=str(body.get("model_identity") or ""),  # "" from an older control plane
            backend_token=str(body.get("backend_token") or ""),
        )

    def __repr__(self) -> str:  # the backend token is a secret: never in logs or tracebacks
        return (
            f"Lease(lease_id={self.lease_id!r}, model_name={self.model_name!r}, node_id={self.node_id!r}, "
            f"address={self.address!r}, replica_index={self.replica_index!r})"
        )

    # --- calling the leased replica (gRPC, through proto.client) ---------------------------------
    #
    # ``token``: the bearer token the replica's backend requires; None (default) is the lease's
    # ``backend_token`` (the node's data-plane credential, which the reference worker's backends
    # require); pass a LocalAI worker's LOCALAI_GRPC_AUTH_TOKEN for its backends; "" sends none.
    # ``timeout``: seconds (default 120). ``fields``: PredictOptions
    # fields by proto name (Tokens=64, Temperature=0.2, Messages=[...], ...). A failed call
    # raises ``proto.client.GrpcCallError`` (NOT_FOUND "model identity mismatch" when the
    # address now serves another model: route again).

    def predict(self, prompt: str, *, token: str | None = None, timeout: float | None = None, **fields: Any):
        """``Predict`` on the replica; returns the ``backend.Reply``."""
        return self._call("predict", prompt, token, timeout, fields)

    def predict_stream(self, prompt: str, *, token: str | None = None, timeout: float | None = None, **fields: Any):
        """``PredictStream`` on the replica; yields ``backend.Reply`` chunks (``timeout`` bounds
        the whole stream)."""
        return self._call("predict_stream", prompt, token, timeout, fields)

    def embedding(self, text: str, *, token: str | None = None, timeout: float | None = None, **fields: Any):
        """``Embedding`` of ``text`` on the replica; returns the ``backend.EmbeddingResult``."""
        return self._call("embedding", text, token, timeout, fields)

    def _call(self, rpc: str, text: str, token: str | None, timeout: float | None, fields: dict[str, Any]):
        """One of ``proto.client``'s inference calls on the leased replica, carrying its
        ``ModelIdentity`` and credential (imported lazily: the rest of cpclient is stdlib only)."""
        from proto import client

        return getattr(client, rpc)(
            self.address,
            text,
            options=self._options(fields),
            model_identity=self.model_identity,
            token=self._token(token),
            timeout=timeout,
        )

    def _token(self, token: str | None) -> str:
        return self.backend_token if token is None else token

    def predict_options(self, **fields: Any):
        """A ``backend.PredictOptions`` with ``fields`` and this lease's ``ModelIdentity`` (for
        callers that use the generated stubs directly)."""
        options = self._options(fields)
        options.ModelIdentity = self.model_identity
        return options

    @staticmethod
    def _options(fields: dict[str, Any]):
        from proto import backend_pb2

        if "ModelIdentity" in fields:
            raise TypeError("ModelIdentity comes from the lease (its model_identity); do not pass it")
        return backend_pb2.PredictOptions(**fields)


@dataclass(frozen=True)
class LoadInfo:
    """A model's load recipe, in both forms; ``source`` is ``model`` or ``replica``."""

    model_name: str
    backend_type: str
    model_options_b64: str
    model_options: dict[str, Any]
    updated_at: datetime | None
    source: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LoadInfo:
        return cls(
            model_name=str(body.get("model_name", "")),
            backend_type=str(body.get("backend_type", "")),
            model_options_b64=str(body.get("model_options_b64") or ""),
            model_options=dict(body.get("model_options") or {}),
            updated_at=_parse_time(body.get("updated_at")),
            source=str(body.get("source", "")),
        )


@dataclass
class _Answer:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            return None  # an HTTP date: ignored, the backoff applies


class ControlPlaneClient(OperatorCalls):
    """The control plane's frontend API, and its operator API (``cpclient.operator``: nodes,
    drains, scheduling, replicas, events, reconcile; an ``operator`` key).

    ``base_url``: e.g. ``http://127.0.0.1:8000``; ``api_key``: a ``frontend`` (or ``operator``)
    key; ``timeout``: seconds for one HTTP exchange (a route call adds its ``wait_seconds``);
    ``route_deadline``: default total seconds a ``route`` call may take, retries and cold load
    included. ``sleep``/``clock`` are injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 10.0,
        *,
        max_retries: int = 5,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        route_deadline: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.route_deadline = route_deadline
        self._sleep = sleep
        self._clock = clock
        KeptConnection(self.base_url)  # refuses a URL that is not http(s)://host[:port][/prefix] now
        self._local = threading.local()  # this thread's KeptConnection
        self._kept: weakref.WeakSet[KeptConnection] = weakref.WeakSet()  # every live thread's, for close()
        self._kept_lock = threading.Lock()
        self._headers_key: str | None = None  # the api_key the cached request headers carry

    def close(self) -> None:
        """Close the kept connections of every thread (call it when no call is running; the
        next call opens a new one)."""
        with self._kept_lock:
            kept, self._kept = list(self._kept), weakref.WeakSet()
        self._local = threading.local()
        for connection in kept:
            connection.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- routing ------------------------------------------------------------------------------

    def route(
        self,
        model: str,
        *,
        backend_type: str | None = None,
        model_options: dict[str, Any] | None = None,
        model_options_b64: str | None = None,
        wait_seconds: float | None = None,
        deadline: float | None = None,
        affinity_key: str | None = None,
    ) -> Lease:
        """Lease a replica of ``model``, loading it if needed; returns the :class:`Lease`.

        Options, when given, are stored as the model's load info by the server. ``wait_seconds``
        is how long the server waits for a cold load before answering 202 (server default 30 s);
        ``deadline`` bounds the whole call (default ``route_deadline``). ``affinity_key`` (a
        session id, a prompt-prefix hash; at most 256 characters): requests with the same key
        go to the same replica while its load stays within the server's bound.
        """
        end = self._clock() + (self.route_deadline if deadline is None else deadline)
        body: dict[str, Any] = {}
        if backend_type is not None:
            body["backend_type"] = backend_type
        if model_options is not None:
            body["model_options"] = model_options
        if model_options_b64 is not None:
            body["model_options_b64"] = model_options_b64
        if affinity_key is not None:
            body["affinity_key"] = affinity_key
        path = f"/api/v1/models/{_quote(model)}/route"
        while True:
            remaining = end - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded(f"no lease for {model!r} within the deadline")
            server_wait = min(DEFAULT_SERVER_WAIT if wait_seconds is None else wait_seconds, remaining)
            answer = self._request(
                "POST",
                path,
                {**body, "wait_seconds": round(server_wait, 3)},
                deadline=end,
                timeout=server_wait + self.timeout,
                accept=(200, 202),
            )
            if answer.status == 200:
                return Lease.from_json(answer.body)
            self._wait_for_job(model, answer, end)

    def _wait_for_job(self, model: str, answer: _Answer, end: float) -> None:
        """Poll the load job of a 202 until it is no longer active; raises on failure or at the
        deadline. Returns when the caller should route again."""
        job = (answer.body or {}).get("load_job") or {}
        delay = answer.retry_after or 1.0
        while True:
            state = job.get("state")
            if state == "succeeded":
                return
            if state == "failed":
                raise LoadFailed(
                    409,
                    str(job.get("error_code") or "load_failed"),
                    str(job.get("error_message") or ""),
                    problem={"load_job": job},
                )
            remaining = end - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded(f"load of {model!r} still {state or 'unknown'} at the deadline")
            self._sleep(min(delay, remaining))
            if not job.get("id"):
                return  # nothing to poll: ask route again
            try:
                job = self.get_load_job(str(job["id"]))
            except ControlPlaneError as error:
                if error.status == 404:
                    return  # purged: route again
                raise

    @contextmanager
    def lease(self, model: str, **route_kwargs: Any) -> Iterator[Lease]:
        """``route(model, ...)`` as a context manager: the lease is released on exit, also when
        the block raises. A failing release is logged, never raised (the lease's TTL frees the
        slot anyway), so it cannot mask the block's own exception."""
        granted = self.route(model, **route_kwargs)
        try:
            yield granted
        finally:
            try:
                self.release(granted)
            except ControlPlaneError as error:
                logger.warning("could not release lease %s: %s", granted.lease_id, error)

    def release(self, lease: Lease | str) -> bool:
        """Release a lease (idempotent); True when this call released it."""
        answer = self._request("POST", f"/api/v1/leases/{_lease_id(lease)}/release", None, repeatable=True)
        return bool(answer.body.get("released"))

    def renew(self, lease: Lease | str, ttl_seconds: int | None = None) -> datetime | None:
        """Extend a live lease; returns its new expiry. A released lease: :class:`ConflictError`
        (code ``lease_released``)."""
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        answer = self._request("POST", f"/api/v1/leases/{_lease_id(lease)}/renew", body, repeatable=True)
        return _parse_time(answer.body.get("expires_at"))

    def get_load_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/load-jobs/{urllib.parse.quote(job_id)}").body

    # --- load info, replicas, models ------------------------------------------------------------

    def put_load_info(
        self,
        model: str,
        backend_type: str,
        *,
        model_options: dict[str, Any] | None = None,
        model_options_b64: str | None = None,
    ) -> LoadInfo:
        """Store the model's load recipe (exactly one of the two option forms)."""
        body = _options_body(backend_type, model_options, model_options_b64)
        answer = self._request("PUT", f"/api/v1/models/{_quote(model)}/load-info", body, accept=(200, 201))
        return LoadInfo.from_json(answer.body)

    def get_load_info(self, model: str) -> LoadInfo:
        """The model's load recipe; :class:`NotFoundError` when there is none."""
        return LoadInfo.from_json(self._request("GET", f"/api/v1/models/{_quote(model)}/load-info").body)

    def report_replica(
        self,
        *,
        node_id: str,
        model: str,
        replica_index: int,
        address: str,
        backend_type: str,
        model_options: dict[str, Any] | None = None,
        model_options_b64: str | None = None,
    ) -> dict[str, Any]:
        """Record a replica this frontend loaded itself; returns the replica row. The node must
        vouch for it (its worker lists that backend at ``address``; for a LocalAI node, the
        address is on its registered host), else ``ConflictError`` ``replica_not_vouched``."""
        body = {
            "node_id": str(node_id),
            "model_name": model,
            "replica_index": replica_index,
            "address": address,
            **_options_body(backend_type, model_options, model_options_b64),
        }
        return self._request("POST", "/api/v1/replicas", body, accept=(200, 201)).body

    def get_model(self, model: str) -> dict[str, Any]:
        """``GET /api/v1/models/{model}``: configuration, ``ready_replicas``, ``conditions``."""
        return self._request("GET", f"/api/v1/models/{_quote(model)}").body

    # --- HTTP ----------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        deadline: float | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (200,),
        repeatable: bool = False,
    ) -> _Answer:
        """One call with the 503 (and, for GET, connection error) retries; raises the typed
        error of any other answer outside ``accept``. ``repeatable``: sending it twice is
        harmless (``GET``, ``HEAD`` and ``PUT`` are), so a lost answer on a kept connection is
        asked for again at once (module doc)."""
        repeatable = repeatable or method in ("GET", "HEAD", "PUT")
        attempt = 0
        while True:
            try:
                answer = self._send(method, path, body, timeout or self.timeout, repeatable)
            except TransportError as error:
                if method != "GET" or not self._may_retry(attempt, None, deadline):
                    raise
                self._backoff(attempt, None, deadline)
                attempt += 1
                logger.info("retrying %s %s after %s", method, path, error)
                continue
            if answer.status in accept:
                return answer
            problem = answer.body if isinstance(answer.body, dict) else {}
            error = error_for(answer.status, problem, answer.retry_after)
            if answer.status == 503 and self._may_retry(attempt, answer.retry_after, deadline):
                self._backoff(attempt, answer.retry_after, deadline)
                attempt += 1
                continue
            raise error

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        return delay * random.uniform(0.5, 1.0)

    def _may_retry(self, attempt: int, retry_after: float | None, deadline: float | None) -> bool:
        if attempt >= self.max_retries:
            return False
        if deadline is not None and self._clock() + self._delay(attempt, retry_after) > deadline:
            return False
        return True

    def _backoff(self, attempt: int, retry_after: float | None, deadline: float | None) -> None:
        delay = self._delay(attempt, retry_after)
        if deadline is not None:
            delay = min(delay, max(deadline - self._clock(), 0.0))
        self._sleep(delay)

    def _send(self, method: str, path: str, body: Any, timeout: float, repeatable: bool) -> _Answer:
        data = None if body is None else json.dumps(body).encode()
        try:
            response, raw = self._connection().exchange(
                method, path, data, self._headers(data is not None), repeatable=repeatable, timeout=timeout
            )
        except (OSError, http.client.HTTPException) as error:
            raise TransportError(f"{method} {self.base_url}{path}: {error or type(error).__name__}") from error
        return _answer(response.status, raw, response.headers)

    def _headers(self, with_body: bool) -> dict[str, str]:
        """The request headers, made once per API key (the same for every call)."""
        if self._headers_key != self.api_key:  # made again when the caller set another key
            plain = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json, application/problem+json"}
            self._plain_headers, self._json_headers = plain, {**plain, "Content-Type": "application/json"}
            self._headers_key = self.api_key
        return self._json_headers if with_body else self._plain_headers

    def _connection(self) -> KeptConnection:
        kept = getattr(self._local, "connection", None)
        if kept is None:
            kept = self._local.connection = KeptConnection(self.base_url, timeout=self.timeout)
            with self._kept_lock:
                self._kept.add(kept)
        return kept


def _answer(status: int, payload: bytes, headers: dict[str, str]) -> _Answer:
    """``headers``: keyed by lower-cased names already (``proto.keepalive.Response``)."""
    try:
        body = json.loads(payload) if payload else None
    except ValueError:
        body = None
    return _Answer(status, body, headers)


def _quote(model: str) -> str:
    if not model:
        raise ValueError("a model name is required")
    return urllib.parse.quote(model, safe="/")


def _lease_id(lease: Lease | str) -> str:
    return urllib.parse.quote(lease.lease_id if isinstance(lease, Lease) else str(lease))


def _options_body(backend_type: str, model_options, model_options_b64) -> dict[str, Any]:
    if (model_options is None) == (model_options_b64 is None):
        raise ValueError("give exactly one of model_options and model_options_b64")
    body: dict[str, Any] = {"backend_type": backend_type}
    if model_options is not None:
        body["model_options"] = model_options
    else:
        body["model_options_b64"] = model_options_b64
    return body
