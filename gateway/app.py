"""The gateway's ASGI application: plain ASGI, no framework.

One :class:`Exchange` per HTTP request: it reads the body (at most ``CONTROLPLANE_MAX_BODY_BYTES``),
answers JSON or server-sent events, and carries the request id (``X-Request-ID`` in and out,
``core.logs`` context for every log line of the request, the database threads' too). The
handler runs as its own task beside a watcher of the connection: when the client hangs up, the
handler is cancelled, which cancels its gRPC call and releases its lease (``serving``).

Errors are OpenAI's documents (``gateway.errors``); anything unexpected is a 500 in the same
format, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from django.conf import settings

from core.logs import _VALID_REQUEST_ID as VALID_REQUEST_ID
from core.logs import REQUEST_ID_HEADER, log_context, new_request_id

from . import handlers, metrics
from .backend import Backends
from .errors import GatewayError
from .serving import Database, Serving

logger = logging.getLogger("gateway")

JSON = b"application/json"


class Disconnected(Exception):
    """The client is gone: nothing more can be sent."""


class Exchange:
    """One HTTP request and its answer."""

    def __init__(self, scope, receive, send) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.method = scope["method"]
        self.path = scope["path"]
        self.headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        incoming = self.headers.get(REQUEST_ID_HEADER.lower(), "")
        self.request_id = incoming if VALID_REQUEST_ID.match(incoming) else new_request_id()
        self.arrived = time.monotonic()
        self.status = 0
        self.started = False  # the status line was sent
        self.complete = False  # the last byte was sent
        # Filled in by handlers for the request's log line and metrics.
        self.endpoint = "other"
        self.model = ""
        self.outcome = ""
        self.tokens = (0, 0)
        self.raw_body = b""

    @property
    def peer(self) -> str:
        client = self.scope.get("client")
        return client[0] if client else ""

    async def body(self, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"The request body is larger than {limit} bytes.", code="payload_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def wait_disconnect(self) -> None:
        """Return when the client hangs up before the answer is complete."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.complete:
                    return
                await asyncio.Event().wait()  # answered: wait to be cancelled

    async def _start(self, status: int, content_type: bytes, headers: dict[str, str] | None = None) -> None:
        raw = [(b"content-type", content_type), (REQUEST_ID_HEADER.lower().encode(), self.request_id.encode())]
        raw += [(key.lower().encode("latin-1"), str(value).encode("latin-1")) for key, value in (headers or {}).items()]
        self.status, self.started = status, True
        await self._out({"type": "http.response.start", "status": status, "headers": raw})

    async def _out(self, message: dict) -> None:
        try:
            await self._send(message)
        except OSError as error:  # uvicorn raises ClientDisconnected (an OSError) once the client left
            raise Disconnected() from error

    async def respond(
        self, status: int, document, headers: dict[str, str] | None = None, content_type: bytes = JSON
    ) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document, separators=(",", ":")).encode()
        await self._start(status, content_type, headers)
        await self._out({"type": "http.response.body", "body": body})
        self.complete = True

    async def start_events(self) -> None:
        await self._start(200, b"text/event-stream", {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def event(self, document) -> None:
        """One server-sent event ``data: <json>``."""
        data = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
        await self._out({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

    async def raw_event(self, text: str) -> None:
        """An event already framed (``data: ...\\n\\n``)."""
        await self._out({"type": "http.response.body", "body": text.encode(), "more_body": True})

    async def end_events(self) -> None:
        await self._out({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        self.complete = True

    async def fail(self, error: GatewayError) -> None:
        """The error as an answer, or, once a stream has started, as its last event."""
        if not self.started:
            await self.respond(error.status, error.body(), error.headers)
        elif not self.complete:
            await self.event(error.body())
            await self._out({"type": "http.response.body", "body": b""})
            self.complete = True


class GatewayApp:
    """``gateway.asgi:application``."""

    def __init__(self) -> None:
        self.serving: Serving | None = None
        self.backends: Backends | None = None

    def _ensure_started(self) -> None:
        # Created lazily inside the serving event loop (grpc.aio channels belong to one loop).
        if self.serving is None:
            self.serving = Serving(Database(int(settings.GATEWAY_DB_THREADS)))
            self.backends = Backends()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            self._ensure_started()
            exchange = Exchange(scope, receive, send)
            with log_context(request_id=exchange.request_id):
                await self._serve(exchange)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._ensure_started()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def close(self) -> None:
        if self.backends is not None:
            await self.backends.close()
        if self.serving is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.serving.db.shutdown)
        self.serving = self.backends = None

    async def _serve(self, exchange: Exchange) -> None:
        try:
            exchange.raw_body = await exchange.body(int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))
        except Disconnected:
            return
        except GatewayError as error:
            exchange.outcome = outcome_of(error)
            try:
                await exchange.fail(error)
            except Disconnected:
                exchange.outcome = "cancelled"
            self._finish(exchange)
            return
        handler = asyncio.ensure_future(self._handle(exchange))
        watcher = asyncio.ensure_future(exchange.wait_disconnect())
        try:
            done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if handler not in done:
                # The client hung up before the answer was complete: stop the work (the
                # handler's cleanup cancels its gRPC call and releases its lease).
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
        except asyncio.CancelledError:  # the server is stopping: end the request cleanly
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            raise
        finally:
            watcher.cancel()

    async def _handle(self, exchange: Exchange) -> None:
        error: GatewayError | None = None
        try:
            await handlers.dispatch(self, exchange)
        except GatewayError as caught:
            error = caught
        except Disconnected:
            exchange.outcome = "cancelled"
        except asyncio.CancelledError:
            exchange.outcome = "cancelled"
            self._finish(exchange)
            raise
        except Exception:
            logger.exception("%s %s failed", exchange.method, exchange.path)
            error = GatewayError(
                500, "The gateway failed to answer; see its log.", type="server_error", code="internal_error"
            )
        if error is not None:
            exchange.outcome = exchange.outcome or outcome_of(error)
            try:
                await exchange.fail(error)
            except Disconnected:
                exchange.outcome = "cancelled"
        self._finish(exchange)

    def _finish(self, exchange: Exchange) -> None:
        seconds = time.monotonic() - exchange.arrived
        outcome = exchange.outcome or "ok"
        if exchange.endpoint != "other":
            metrics.observe_request(exchange.model, exchange.endpoint, outcome, seconds)
        with log_context(model=exchange.model or None):
            logger.info(
                "%s %s %s %s %.3fs tokens=%d/%d",
                exchange.method,
                exchange.path,
                exchange.status or "-",
                outcome,
                seconds,
                *exchange.tokens,
            )


def outcome_of(error: GatewayError) -> str:
    if error.status in (401, 403):
        return "unauthorized"
    if error.code == "model_not_found":
        return "model_not_found"
    if error.status == 503:
        return "unavailable"
    if error.status == 504:
        return "backend_timeout"
    if error.status == 502:
        return "backend_error"
    return "client_error" if error.status < 500 else "error"
