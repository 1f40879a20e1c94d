"""The gateway's endpoints: authentication, the model list, chat and text completions (whole or
streamed as server-sent events) and embeddings.

Each inference request holds one lease for its whole duration (``serving``), calls the replica
with the node's backend token and the lease's ``ModelIdentity``, and gives the lease back on
completion, on error and when the client hangs up (the handler's task is cancelled, and the
``finally`` blocks below run). A replica that does not answer (UNAVAILABLE), or answers for
another model (NOT_FOUND "model identity mismatch"), is removed from the registry as the
router's own warm path removes one, and the request is routed once more.
"""

from __future__ import annotations

import ipaddress
import json
import time

import grpc
from django.conf import settings
from django.db.models import Count
from prometheus_client import CONTENT_TYPE_LATEST

from core.models import ApiKey
from proto import backend_pb2, client
from registry.models import ModelLoadInfo, NodeModel

from . import mapping, metrics
from .errors import GatewayError, backend_failed, invalid, model_not_found

MISMATCH = "model identity mismatch"  # LocalAI's words for a backend that holds another model


# --- dispatch and authentication --------------------------------------------------------------


async def dispatch(app, exchange) -> None:
    path = exchange.path.rstrip("/") or "/"
    if path == "/metrics" and exchange.method == "GET":
        return await scrape_metrics(app, exchange)
    if path.startswith("/v1/models/") and exchange.method == "GET":
        exchange.endpoint = "models"
        await authenticate(app, exchange)
        return await retrieve_model(app, exchange, path[len("/v1/models/") :])
    methods = ROUTES.get(path)
    if methods is None:
        raise GatewayError(404, f"Unknown path {exchange.path!r}; the API is under /v1/.", code="unknown_url")
    entry = methods.get(exchange.method)
    if entry is None:
        raise GatewayError(
            405,
            f"{exchange.method} is not allowed on {path}.",
            code="method_not_allowed",
            headers={"Allow": ", ".join(sorted(methods))},
        )
    exchange.endpoint, handler = entry
    await authenticate(app, exchange)
    await handler(app, exchange)


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})


async def authenticate(app, exchange) -> ApiKey:
    """An API key of role frontend or operator in ``Authorization: Bearer``, else 401."""
    header = exchange.headers.get("authorization", "")
    if not header.strip():
        raise _unauthorized(
            "No API key: send 'Authorization: Bearer <key>' (manage.py create_api_key NAME --role frontend).",
            "missing_api_key",
        )
    scheme, _, token = header.strip().partition(" ")
    key = None
    if scheme.lower() == "bearer" and token.strip():
        key = await app.serving.authenticate(token.strip())
    if key is None:
        raise _unauthorized("Incorrect or revoked API key.", "invalid_api_key")
    return key


def _body(exchange) -> dict:
    try:
        body = json.loads(exchange.raw_body or b"null", parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"The body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.", code="invalid_json")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# --- models ---------------------------------------------------------------------------------


def _model_entries(name: str | None = None) -> list[dict]:
    """Models with load info or ready replicas (the ones a request can be routed to)."""
    infos = ModelLoadInfo.objects.order_by()
    ready = NodeModel.objects.ready().order_by()
    if name is not None:
        infos, ready = infos.filter(model_name=name), ready.filter(model_name=name)
    updated = dict(infos.values_list("model_name", "updated_at"))
    counts = dict(ready.values("model_name").annotate(n=Count("pk")).values_list("model_name", "n"))
    return [
        mapping.model_entry(
            model,
            int(updated[model].timestamp()) if model in updated else 0,
            ready_replicas=counts.get(model, 0),
            has_load_info=model in updated,
        )
        for model in sorted(set(updated) | set(counts))
    ]


async def list_models(app, exchange) -> None:
    entries = await app.serving.database(_model_entries)
    await exchange.respond(200, {"object": "list", "data": entries})


async def retrieve_model(app, exchange, name: str) -> None:
    entries = await app.serving.database(_model_entries, name)
    if not entries:
        raise model_not_found(name)
    exchange.model = name
    await exchange.respond(200, entries[0])


# --- calling a replica ----------------------------------------------------------------------


def _is_stale(error: client.GrpcCallError) -> bool:
    """The replica is not what the registry says: nothing answers, or another model does."""
    return isinstance(error, client.BackendUnavailable) or (
        error.code == grpc.StatusCode.NOT_FOUND and MISMATCH in error.detail
    )


def backend_error(error: client.GrpcCallError) -> GatewayError:
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(
            504,
            f"The backend did not answer within {settings.GATEWAY_REQUEST_TIMEOUT:g}s.",
            type="server_error",
            code="backend_timeout",
        )
    code = error.code.name if error.code is not None else "UNKNOWN"
    return backend_failed(f"The backend failed ({code}): {error.detail or 'no message'}")


def _identified(options: backend_pb2.PredictOptions, leased) -> backend_pb2.PredictOptions:
    request = backend_pb2.PredictOptions()
    request.CopyFrom(options)
    request.ModelIdentity = leased.model_identity
    return request


async def on_replica(app, exchange, model: str, call, *, affinity_key: str | None = None):
    """Lease a replica of ``model`` (preferring the one ``affinity_key`` maps to) and return
    ``(leased, await call(leased))``; the caller releases the lease. A stale replica is removed
    and the request routed once more; any other failure releases the lease and becomes the
    answer (502, 504)."""
    for attempt in (1, 2):
        leased = await app.serving.acquire(model, affinity_key)
        exchange.model = model
        try:
            return leased, await call(leased)
        except client.GrpcCallError as error:
            if _is_stale(error):
                await app.serving.report_unreachable(leased, f"{error.code.name if error.code else ''} {error.detail}")
                if attempt == 1:
                    continue
                raise backend_failed(
                    f"The replica did not answer: {error.detail}", code="backend_unreachable"
                ) from None
            await app.serving.release(leased)
            raise backend_error(error) from None
        except BaseException:
            await app.serving.release(leased)
            raise
    raise AssertionError("unreachable")


# --- chat and text completions --------------------------------------------------------------


async def chat_completions(app, exchange) -> None:
    prefix = int(settings.GATEWAY_AFFINITY_PREFIX_CHARS)
    await _text(app, exchange, mapping.chat_request(_body(exchange), prefix_chars=prefix))


async def completions(app, exchange) -> None:
    prefix = int(settings.GATEWAY_AFFINITY_PREFIX_CHARS)
    await _text(app, exchange, mapping.completion_request(_body(exchange), prefix_chars=prefix))


async def _text(app, exchange, request: mapping.TextRequest) -> None:
    timeout = float(settings.GATEWAY_REQUEST_TIMEOUT)
    if request.stream:
        return await _stream(app, exchange, request, timeout)

    async def call(leased):
        return await app.backends.predict(
            leased.address, _identified(request.options, leased), token=leased.token, timeout=timeout
        )

    leased, reply = await on_replica(app, exchange, request.model, call, affinity_key=request.affinity_key)
    try:
        tally = mapping.Tally()
        text = tally.add(reply) + tally.flush()
        answer_id = mapping.new_id(request.object_prefix)
        answer = mapping.text_answer(request, answer_id, mapping.now_seconds(), text, tally)
        _count(exchange, tally.prompt_tokens, tally.completion)
        metrics.observe_first_token(request.model, exchange.endpoint, time.monotonic() - exchange.arrived)
        await exchange.respond(200, answer)
    finally:
        await app.serving.release(leased)  # after the answer: the client does not wait for it


async def _stream(app, exchange, request: mapping.TextRequest, timeout: float) -> None:
    """Server-sent events from PredictStream. Every batch of replies (``Backends.predict_stream``:
    what was read since the previous batch, at most ``GATEWAY_STREAM_INTERVAL`` apart) is framed
    into one body chunk, written with one ``send()``, still one event per reply, as OpenAI's
    clients expect; the end of the stream (the rest of the text, the finishing chunk, the usage
    chunk and ``[DONE]``) goes out with the last batch."""

    async def open_stream(leased):
        stream = app.backends.predict_stream(
            leased.address,
            _identified(request.options, leased),
            token=leased.token,
            timeout=timeout,
            interval=float(settings.GATEWAY_STREAM_INTERVAL),
        )
        try:
            return stream, await anext(stream, None)  # the first replies: a dead replica fails here
        except BaseException:
            await stream.aclose()
            raise

    leased, (stream, batch) = await on_replica(
        app, exchange, request.model, open_stream, affinity_key=request.affinity_key
    )
    answer_id, created = mapping.new_id(request.object_prefix), mapping.now_seconds()
    tally = mapping.Tally()
    in_flight = metrics.streams(request.model)
    in_flight.inc()
    try:
        await exchange.start_events()
        before, after = mapping.chunk_frame(request, answer_id, created)
        frames = []
        if request.kind == "chat":
            frames.append(mapping.event(mapping.text_chunk(request, answer_id, created, "", None, first=True)))
        first = True
        add, dumps = tally.add, json.dumps
        while batch is not None:
            replies, last = batch
            for reply in replies:
                text = add(reply)
                if text:
                    frames.append(before + dumps(text) + after)
            if first and tally.chunks:
                metrics.observe_first_token(request.model, exchange.endpoint, time.monotonic() - exchange.arrived)
                first = False
            if last:
                break
            if frames:
                await exchange.events("".join(frames))
                frames.clear()
            try:
                batch = await anext(stream, None)
            except client.GrpcCallError as error:
                raise backend_error(error) from None
        rest = tally.flush()
        if rest:
            frames.append(mapping.event(mapping.text_chunk(request, answer_id, created, rest, None)))
        finish = tally.finish_reason(request.max_tokens)
        frames.append(mapping.event(mapping.text_chunk(request, answer_id, created, None, finish)))
        if request.include_usage:
            frames.append(mapping.event(mapping.usage_chunk(request, answer_id, created, tally)))
        await exchange.events("".join(frames), last=True)
    finally:
        in_flight.dec()
        _count(exchange, tally.prompt_tokens, tally.completion)
        await stream.aclose()
        await app.serving.release(leased)


def _count(exchange, prompt: int, completion: int) -> None:
    exchange.tokens = (prompt, completion)
    metrics.observe_tokens(exchange.model, prompt, completion)


# --- embeddings -----------------------------------------------------------------------------


async def embeddings(app, exchange) -> None:
    request = mapping.embedding_request(_body(exchange))
    timeout = float(settings.GATEWAY_REQUEST_TIMEOUT)

    async def call(leased):
        return [
            await app.backends.embedding(leased.address, _identified(item, leased), token=leased.token, timeout=timeout)
            for item in request.inputs
        ]

    leased, results = await on_replica(app, exchange, request.model, call)
    try:
        answer = mapping.embedding_answer(request, results)
        _count(exchange, answer["usage"]["prompt_tokens"], 0)
        await exchange.respond(200, answer)
    finally:
        await app.serving.release(leased)


# --- /metrics -------------------------------------------------------------------------------


async def scrape_metrics(app, exchange) -> None:
    """Prometheus text for peers in ``METRICS_ALLOW``, or with an operator API key."""
    if not peer_allowed(exchange.peer):
        key = await authenticate(app, exchange)
        if key.role != ApiKey.Role.OPERATOR:
            raise GatewayError(
                403,
                "/metrics answers addresses in METRICS_ALLOW or an operator API key.",
                type="permission_error",
                code="metrics_forbidden",
            )
    await exchange.respond(200, metrics.scrape(), content_type=CONTENT_TYPE_LATEST.encode())


def peer_allowed(address: str) -> bool:
    """Whether ``/metrics`` answers this peer without a key (``METRICS_ALLOW``, as the web
    process's ``/metrics`` does)."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if getattr(peer, "ipv4_mapped", None):
        peer = peer.ipv4_mapped
    parts = [part.strip() for part in settings.METRICS_ALLOW.split(",") if part.strip()]
    return any(peer in ipaddress.ip_network(part, strict=False) for part in parts)


ROUTES = {
    "/v1/models": {"GET": ("models", list_models)},
    "/v1/chat/completions": {"POST": ("chat_completions", chat_completions)},
    "/v1/completions": {"POST": ("completions", completions)},
    "/v1/embeddings": {"POST": ("embeddings", embeddings)},
}
