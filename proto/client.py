"""The control plane's gRPC client for LocalAI backends (backend.Backend) and workers
(controlplane.worker.v1.Worker).

Why it looks like this:

* Channels are cached per ``(os.getpid(), address)`` and created on first use, never at import:
  django-q2 forks its workers, and a gRPC channel inherited across ``fork()`` is unusable. An
  entry made by another pid is ignored (not closed: its sockets belong to the parent). Channels
  also use a local subchannel pool, because gRPC otherwise shares connections between channels
  process-wide and a fresh channel in a forked child would pick up the parent's socket.
* Every call has a deadline (see ``DEFAULT_TIMEOUTS``; overridable from Django settings, read
  lazily so this module imports without Django, and per call with ``timeout=``).
* A call carries ``authorization: Bearer <token>`` only when the caller passes ``token=``:
  there is no default credential, so the fleet registration token is never sent (the control
  plane passes ``core.credentials``' per-node tokens). Worker calls add ``x-node-id``
  so a worker can refuse a call meant for another node behind a reused address. Tokens are
  never logged.
* Callers get :class:`GrpcCallError` / :class:`BackendUnavailable` instead of ``grpc.RpcError``,
  so code outside this package never imports grpc.
* Channels (:mod:`proto.channels`) are made by :mod:`proto.tls`: TLS for ``grpcs://host:port``.
  An unreadable TLS file fails the call with FAILED_PRECONDITION (a probe counts that as busy,
  never as a dead backend: a configuration mistake must not remove replicas).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from proto import backend_pb2, channels, tls, worker_pb2
from proto.channels import close_all_channels, close_channel, get_channel

__all__ = [
    "DEFAULT_TIMEOUTS",
    "BackendUnavailable",
    "NotConnected",
    "GrpcCallError",
    "Probe",
    "ProbeResult",
    "close_all_channels",
    "close_channel",
    "embedding",
    "free",
    "get_channel",
    "holds_model",
    "list_backends",
    "load_model",
    "predict",
    "predict_stream",
    "probe",
    "start_backend",
    "status",
    "stop_backend",
    "unload_model",
]

logger = logging.getLogger(__name__)

# Seconds. Keys are call kinds; _SETTING_NAMES says which Django setting overrides each
# (StartBackend, Free and inference calls have no setting: pass timeout= to change them).
DEFAULT_TIMEOUTS: dict[str, float] = {
    "health": 2.0,  # Health/Status: a routing probe must answer fast or count as busy
    "load": 120.0,  # LoadModel: reading weights into (V)RAM takes long
    "worker_start": 30.0,  # StartBackend waits for the new process to answer Health
    "worker": 10.0,  # StopBackend, UnloadModel, ListBackends
    # Worker calls first need a connection that completed the HTTP/2 handshake within this: an
    # address that accepts TCP and never answers is given up on in seconds, not after the call's
    # own deadline (StartBackend's 30 s are for a backend process that starts slowly).
    "connect": 3.0,
    "free": 10.0,
    "inference": 120.0,  # Predict, Embedding (smoke tests and one-off calls)
}
_SETTING_NAMES = {
    "health": "GRPC_HEALTH_TIMEOUT",
    "load": "GRPC_LOAD_TIMEOUT",
    "worker": "GRPC_WORKER_TIMEOUT",
    "connect": "GRPC_CONNECT_TIMEOUT",
}


class Probe(enum.Enum):
    """What a Health probe says about a backend, for routing."""

    ALIVE = "alive"  # answered Health with b"OK"
    BUSY = "busy"  # the process is there but did not (or could not) say OK in time
    UNREACHABLE = "unreachable"  # nothing answers at the address


@dataclass(frozen=True)
class ProbeResult:
    """``code`` is the call's grpc.StatusCode (OK when Health answered); ``detail`` says why."""

    outcome: Probe
    code: grpc.StatusCode | None = None
    detail: str = ""


class GrpcCallError(Exception):
    """A gRPC call failed; ``code`` is the grpc.StatusCode, ``method`` the full method path."""

    def __init__(self, method: str, code: grpc.StatusCode | None, detail: str) -> None:
        self.method = method
        self.code = code
        self.detail = detail
        code_name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"{method}: {code_name}: {detail}")


class BackendUnavailable(GrpcCallError):
    """UNAVAILABLE: nothing is listening at the address or the connection broke."""


class NotConnected(BackendUnavailable):
    """The connection never completed its HTTP/2 handshake: the request was never sent."""


# --- channels (proto/channels.py) -------------------------------------------------------


def _channel_for_call(address: str, method: str) -> grpc.Channel:
    try:
        return channels.get_channel(address)
    except tls.TlsConfigError as exc:
        raise GrpcCallError(method, grpc.StatusCode.FAILED_PRECONDITION, f"TLS configuration: {exc}") from None


# --- settings, metadata, error mapping ------------------------------------------------------


def _django_setting(name: str):
    """The control plane's setting ``name`` (controlplane/settings.py defines every one this
    module reads), or None when Django is absent or unconfigured (plain scripts, the
    project's own worker): then ``DEFAULT_TIMEOUTS`` apply."""
    try:
        from django.conf import settings
    except ImportError:
        return None
    return getattr(settings, name) if settings.configured else None


def _timeout(kind: str, explicit: float | None) -> float:
    if explicit is not None:
        return float(explicit)
    setting = _SETTING_NAMES.get(kind)
    configured = _django_setting(setting) if setting else None
    return float(configured) if configured is not None else DEFAULT_TIMEOUTS[kind]


def _metadata(token: str | None, node_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata. token None or "" sends no credential (never a configured default)."""
    pairs = []
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    if node_id:
        pairs.append(("x-node-id", str(node_id)))
    return tuple(pairs)


def _error(method: str, exc: grpc.RpcError, address: str = "") -> GrpcCallError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = tls.explain(address, (exc.details() if hasattr(exc, "details") else None) or "")
    cls = BackendUnavailable if code == grpc.StatusCode.UNAVAILABLE else GrpcCallError
    return cls(method, code, detail)


def _serialize(request: bytes | Message) -> bytes:
    """Messages are serialized once; bytes (a stored ModelOptions blob) go out untouched."""
    return request if isinstance(request, bytes) else request.SerializeToString()


# ``observer(method, code_name, seconds)`` after every call, when set (the control plane sets
# it to its metrics hook; this module stays free of Django and Prometheus).
call_observer = None


def _observe(method: str, code: grpc.StatusCode | None, started: float) -> None:
    if call_observer is not None:
        try:
            call_observer(method, code.name if code is not None else "UNKNOWN", time.monotonic() - started)
        except Exception:
            logger.debug("gRPC call observer failed", exc_info=True)


_SETTLED = (
    grpc.ChannelConnectivity.READY,
    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    grpc.ChannelConnectivity.SHUTDOWN,
)


def _require_connection(channel: grpc.Channel, method: str, timeout: float) -> None:
    """Raise NotConnected unless the channel connects (or fails to) within ``timeout``.

    READY means the server completed the HTTP/2 handshake. A connection that fails (refused,
    reset) settles at once and the call itself then fails fast with UNAVAILABLE as before; only
    a connection that stays CONNECTING (a listener that accepts TCP and sends nothing, a black
    hole) ends here, instead of holding the caller for the call's whole deadline.
    """
    settled = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state in _SETTLED:
            settled.set()

    channel.subscribe(on_state, try_to_connect=True)
    try:
        if not settled.wait(timeout):
            raise NotConnected(
                method,
                grpc.StatusCode.UNAVAILABLE,
                f"no gRPC connection within {timeout:g}s (the address accepts TCP but does not answer)",
            )
    finally:
        channel.unsubscribe(on_state)


def _call(address, method, request, response_cls, *, timeout, metadata, connect_timeout=None):
    """One unary call with deadline and metadata; RpcError becomes GrpcCallError. With
    ``connect_timeout``, the connection must settle within it first (:func:`_require_connection`)."""
    channel = _channel_for_call(address, method)
    call = channel.unary_unary(method, request_serializer=_serialize, response_deserializer=response_cls.FromString)
    started = time.monotonic()
    if connect_timeout is not None:
        try:
            _require_connection(channel, method, min(connect_timeout, timeout))
        except BackendUnavailable as error:
            _observe(method, error.code, started)
            raise
    try:
        reply = call(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        error = _error(method, exc, address)
        _observe(method, error.code, started)
        logger.debug("gRPC %s to %s failed: %s", method, address, error.code)
        raise error from None
    _observe(method, grpc.StatusCode.OK, started)
    return reply


_BACKEND = "/backend.Backend/"
_WORKER = "/controlplane.worker.v1.Worker/"


# --- backend.Backend ------------------------------------------------------------------------


def probe(address: str, *, token: str | None = None, timeout: float | None = None) -> ProbeResult:
    """Classify a backend by one Health call; never raises for gRPC errors.

    * OK and ``message == b"OK"`` -> ALIVE.
    * OK with another message -> BUSY: the process answered but does not claim health (e.g.
      still loading); it exists, so it must not be treated as gone.
    * DEADLINE_EXCEEDED -> BUSY: single-threaded Python backends queue Health behind a running
      LoadModel/Predict.
    * any other non-UNAVAILABLE status (UNAUTHENTICATED, UNIMPLEMENTED, ...) -> BUSY: something
      answered at the address; it is a configuration problem, not a dead process.
    * UNAVAILABLE -> UNREACHABLE.

    No ``wait_for_ready``: it would turn a closed port into DEADLINE_EXCEEDED (= busy).
    """
    try:
        reply = _call(
            address,
            _BACKEND + "Health",
            backend_pb2.HealthMessage(),
            backend_pb2.Reply,
            timeout=_timeout("health", timeout),
            metadata=_metadata(token),
        )
    except BackendUnavailable as exc:
        return ProbeResult(Probe.UNREACHABLE, exc.code, exc.detail)
    except GrpcCallError as exc:
        return ProbeResult(Probe.BUSY, exc.code, exc.detail)
    if reply.message == b"OK":
        return ProbeResult(Probe.ALIVE, grpc.StatusCode.OK, "")
    detail = reply.message.decode("utf-8", errors="replace")
    return ProbeResult(Probe.BUSY, grpc.StatusCode.OK, f"unhealthy reply: {detail!r}")


def load_model(
    address: str,
    options: backend_pb2.ModelOptions | bytes | bytearray | memoryview,
    *,
    token: str | None = None,
    timeout: float | None = None,
) -> tuple[bool, str]:
    """LoadModel; returns (Result.success, Result.message).

    A stored blob is sent exactly as stored (``_serialize`` passes bytes through): parsing
    and re-serializing would keep unknown fields too, but moves them after the known ones
    and may re-encode them, and the backend should see what the frontend produced.
    Raises GrpcCallError (BackendUnavailable for UNAVAILABLE) when the call itself fails.
    """
    payload = options if isinstance(options, backend_pb2.ModelOptions) else bytes(options)
    result = _call(
        address,
        _BACKEND + "LoadModel",
        payload,
        backend_pb2.Result,
        timeout=_timeout("load", timeout),
        metadata=_metadata(token),
    )
    return result.success, result.message


def free(address: str, *, token: str | None = None, timeout: float | None = None) -> bool:
    """Free the backend's model; False when the backend has no Free (UNIMPLEMENTED) or says
    success=false. Other failures raise GrpcCallError."""
    try:
        result = _call(
            address,
            _BACKEND + "Free",
            backend_pb2.HealthMessage(),
            backend_pb2.Result,
            timeout=_timeout("free", timeout),
            metadata=_metadata(token),
        )
    except GrpcCallError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            return False  # older backends: nothing to free; stopping the process frees it
        raise
    return result.success


def status(address: str, *, token: str | None = None, timeout: float | None = None) -> backend_pb2.StatusResponse:
    """Status (state + memory usage); uses the probe deadline because callers poll it."""
    return _call(
        address,
        _BACKEND + "Status",
        backend_pb2.HealthMessage(),
        backend_pb2.StatusResponse,
        timeout=_timeout("health", timeout),
        metadata=_metadata(token),
    )


def holds_model(
    address: str, model_identity: str, *, token: str | None = None, timeout: float | None = None
) -> bool | None:
    """Whether the backend at ``address`` proves that it holds ``model_identity`` (the ``Model``
    field of the ``ModelOptions`` it was loaded with): True, False, or None = cannot tell yet.

    ``Status`` cannot say it: LocalAI's backends answer READY whenever they are idle, loaded or
    not. So this makes one cheap guarded call, ``TokenizeString`` of a one-word prompt carrying
    ``ModelIdentity``, which LocalAI's backends judge before any work: NOT_FOUND ("model identity
    mismatch") when they loaded another model, FAILED_PRECONDITION (or another error) when they
    loaded nothing. Only OK is proof -> True.

    * DEADLINE_EXCEEDED -> None: a single-threaded backend queues the call behind a running
      ``LoadModel``/``Predict``; ask again later.
    * anything else (FAILED_PRECONDITION, NOT_FOUND, UNIMPLEMENTED for a backend without
      ``TokenizeString``, UNAVAILABLE, ...) -> False. A backend without ``TokenizeString`` can
      never prove what it holds; the caller then loads again, which costs a reload but never
      serves the wrong model.
    * an empty ``model_identity`` -> False without a call: backends skip the check for an empty
      identity, so an OK would prove nothing.

    Uses the probe deadline (``health``): the call is as cheap as ``Status``.
    """
    if not model_identity:
        return False
    try:
        _call(
            address,
            _BACKEND + "TokenizeString",
            backend_pb2.PredictOptions(Prompt="ping", ModelIdentity=model_identity),
            backend_pb2.TokenizationResponse,
            timeout=_timeout("health", timeout),
            metadata=_metadata(token),
        )
    except GrpcCallError as exc:
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        return False
    return True


def predict(
    address: str,
    prompt: str,
    *,
    options: backend_pb2.PredictOptions | None = None,
    model_identity: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> backend_pb2.Reply:
    """Predict ``prompt``; ``options`` (copied, Prompt overwritten) sets Tokens, Temperature...

    ``model_identity``: the ``model_identity`` of the route answer (PredictOptions field 54). A
    LocalAI backend holding another model answers NOT_FOUND "model identity mismatch" (a
    GrpcCallError) instead of answering from the wrong model; "" skips the check.
    """
    return _call(
        address,
        _BACKEND + "Predict",
        _predict_request(options, model_identity, Prompt=prompt),
        backend_pb2.Reply,
        timeout=_timeout("inference", timeout),
        metadata=_metadata(token),
    )


def predict_stream(
    address: str,
    prompt: str,
    *,
    options: backend_pb2.PredictOptions | None = None,
    model_identity: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> Iterator[backend_pb2.Reply]:
    """PredictStream: the backend's replies (chunks) as they come; arguments as :func:`predict`.

    A generator: the call starts at the first ``next()``; ``timeout`` bounds the whole stream;
    a failure (also mid-stream) raises GrpcCallError from the iteration; a consumer that stops
    early cancels the call.
    """
    method = _BACKEND + "PredictStream"
    call = _channel_for_call(address, method).unary_stream(
        method, request_serializer=_serialize, response_deserializer=backend_pb2.Reply.FromString
    )
    request = _predict_request(options, model_identity, Prompt=prompt)
    started = time.monotonic()
    replies = call(request, timeout=_timeout("inference", timeout), metadata=_metadata(token))
    try:
        yield from replies
    except grpc.RpcError as exc:
        error = _error(method, exc, address)
        _observe(method, error.code, started)
        raise error from None
    finally:
        replies.cancel()  # no-op once the stream ended
    _observe(method, grpc.StatusCode.OK, started)


def embedding(
    address: str,
    text: str,
    *,
    options: backend_pb2.PredictOptions | None = None,
    model_identity: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> backend_pb2.EmbeddingResult:
    """Embedding of ``text`` (sent in PredictOptions.Embeddings, as LocalAI does); ``options``
    and ``model_identity`` as for :func:`predict`."""
    return _call(
        address,
        _BACKEND + "Embedding",
        _predict_request(options, model_identity, Embeddings=text),
        backend_pb2.EmbeddingResult,
        timeout=_timeout("inference", timeout),
        metadata=_metadata(token),
    )


def _predict_request(
    options: backend_pb2.PredictOptions | None, model_identity: str | None, **fields
) -> backend_pb2.PredictOptions:
    """A copy of ``options`` with ``fields`` set, and ``ModelIdentity`` when one is given
    (None keeps whatever ``options`` carries)."""
    request = backend_pb2.PredictOptions()
    if options is not None:
        request.CopyFrom(options)
    for name, value in fields.items():
        setattr(request, name, value)
    if model_identity is not None:
        request.ModelIdentity = model_identity
    return request


# --- controlplane.worker.v1.Worker ----------------------------------------------------------


def start_backend(
    address: str,
    model_name: str,
    backend_type: str,
    replica_index: int,
    *,
    node_id: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> worker_pb2.StartBackendResponse:
    """Ask the worker to start (or reuse) the backend process for (model, replica)."""
    request = worker_pb2.StartBackendRequest(
        model_name=model_name, backend_type=backend_type, replica_index=replica_index
    )
    return _call(
        address,
        _WORKER + "StartBackend",
        request,
        worker_pb2.StartBackendResponse,
        timeout=_timeout("worker_start", timeout),
        metadata=_metadata(token, node_id),
        connect_timeout=_timeout("connect", None),
    )


def stop_backend(
    address: str,
    model_name: str,
    replica_index: int,
    *,
    node_id: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> worker_pb2.StopBackendResponse:
    """Stop one replica process; ``.stopped`` is False when nothing ran for that key."""
    request = worker_pb2.StopBackendRequest(model_name=model_name, replica_index=replica_index)
    return _call(
        address,
        _WORKER + "StopBackend",
        request,
        worker_pb2.StopBackendResponse,
        timeout=_timeout("worker", timeout),
        metadata=_metadata(token, node_id),
        connect_timeout=_timeout("connect", None),
    )


def unload_model(
    address: str,
    model_name: str,
    *,
    node_id: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> worker_pb2.UnloadModelResponse:
    """Stop every replica of ``model_name`` on the worker; ``.stopped`` counts them."""
    return _call(
        address,
        _WORKER + "UnloadModel",
        worker_pb2.UnloadModelRequest(model_name=model_name),
        worker_pb2.UnloadModelResponse,
        timeout=_timeout("worker", timeout),
        metadata=_metadata(token, node_id),
        connect_timeout=_timeout("connect", None),
    )


def list_backends(
    address: str,
    *,
    node_id: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> worker_pb2.ListBackendsResponse:
    """Every backend process the worker knows, including exited ones."""
    return _call(
        address,
        _WORKER + "ListBackends",
        worker_pb2.ListBackendsRequest(),
        worker_pb2.ListBackendsResponse,
        timeout=_timeout("worker", timeout),
        metadata=_metadata(token, node_id),
        connect_timeout=_timeout("connect", None),
    )
