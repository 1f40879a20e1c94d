"""The gateway's gRPC client for LocalAI backends (``backend.Backend``), on ``grpc.aio``.

The gateway serves many concurrent streams from one event loop, so it calls backends with
grpc's asyncio API instead of ``proto.client``'s blocking stubs (one thread per stream). The
rules are ``proto.client``'s: one channel per address (kept for this process's event loop),
a deadline on every call, ``authorization: Bearer <backend token>`` only when a token is given,
and failures raised as ``proto.client.GrpcCallError`` (``BackendUnavailable`` for UNAVAILABLE:
nothing listens at the address, the router's "unreachable"), so callers never see grpc's own
exceptions. Calls are reported to ``proto.client.call_observer`` (the control plane's gRPC
metrics) like every other call the control plane makes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from proto import backend_pb2, backend_pb2_grpc, client, tls

_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.client_idle_timeout_ms", 60_000),
    ("grpc.max_receive_message_length", 50 * 1024 * 1024),
    ("grpc.max_send_message_length", 50 * 1024 * 1024),
)
_METHOD = "/backend.Backend/"


class Backends:
    """Channels to backends, by address; create and use it inside one event loop."""

    def __init__(self) -> None:
        self._stubs: dict[str, tuple[aio.Channel, backend_pb2_grpc.BackendStub]] = {}

    def _stub(self, address: str) -> backend_pb2_grpc.BackendStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = tls.create_aio_channel(address, _CHANNEL_OPTIONS)  # TLS for grpcs:// (proto/tls.py)
            entry = self._stubs[address] = (channel, backend_pb2_grpc.BackendStub(channel))
        return entry[1]

    async def close(self) -> None:
        """Close every channel (at shutdown). A channel is never closed while the gateway runs:
        a call may be starting on it, and a channel to an address whose backend died costs
        nothing once idle (it stops reconnecting after ``grpc.client_idle_timeout_ms``), and
        serves the next backend started on that port."""
        stubs, self._stubs = self._stubs, {}
        for channel, _stub in stubs.values():
            await channel.close()

    async def predict(
        self, address: str, request: backend_pb2.PredictOptions, *, token: str, timeout: float
    ) -> backend_pb2.Reply:
        return await self._unary(address, "Predict", request, token=token, timeout=timeout)

    async def embedding(
        self, address: str, request: backend_pb2.PredictOptions, *, token: str, timeout: float
    ) -> backend_pb2.EmbeddingResult:
        return await self._unary(address, "Embedding", request, token=token, timeout=timeout)

    async def _unary(self, address, name, request, *, token, timeout):
        method = getattr(self._stub(address), name)
        started = time.monotonic()
        try:
            reply = await method(request, timeout=timeout, metadata=_metadata(token))
        except aio.AioRpcError as exc:
            raise _failed(_METHOD + name, exc, started) from None
        _observe(_METHOD + name, grpc.StatusCode.OK, started)
        return reply

    async def predict_stream(
        self,
        address: str,
        request: backend_pb2.PredictOptions,
        *,
        token: str,
        timeout: float,
        interval: float = 0.0,
    ) -> AsyncIterator[tuple[list[backend_pb2.Reply], bool]]:
        """The replies of PredictStream in batches, ``(replies, last)``: every reply that arrived
        while the consumer was busy comes at once (a list, never empty), so that it can write
        them in one go; ``last`` says the stream ended well after these (so the consumer can
        write its own end with them; after a failure, the last batch is not ``last`` and the
        next step raises). ``interval`` (seconds): a batch is handed over no sooner than that
        long after the previous one (the first at once), and the replies read meanwhile join
        it; so no reply waits longer than ``interval`` for its turn, a backend that generates
        slower than that sees no delay at all, and the end of the stream cuts the wait short.
        Leaving the iteration early (a consumer that stops, a cancelled task) cancels the call
        on the backend."""
        call = self._stub(address).PredictStream(request, timeout=timeout, metadata=_metadata(token))
        started = time.monotonic()
        method = _METHOD + "PredictStream"
        batch: list[backend_pb2.Reply] = []
        ready = asyncio.Event()  # a reply was read, or the stream ended
        wake = asyncio.Event()  # the consumer's wait for more replies to join a batch is over
        ended: list[BaseException | None] = []  # [None] at EOF, [error] on failure
        loop = asyncio.get_running_loop()
        handed_over = -interval  # loop time of the last batch handed over

        async def pump() -> None:
            try:
                async for reply in call:
                    batch.append(reply)
                    ready.set()
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                ended.append(error)
            else:
                ended.append(None)
            ready.set()
            wake.set()  # the end of the stream is handed over without waiting out the interval

        reader = asyncio.ensure_future(pump())
        try:
            while True:
                if batch:
                    early = handed_over + interval - loop.time()
                    if early > 0 and not ended:
                        # The reader goes on meanwhile: what it reads joins this batch.
                        wake.clear()
                        timer = loop.call_later(early, wake.set)
                        try:
                            await wake.wait()
                        finally:
                            timer.cancel()
                    replies = batch.copy()
                    batch.clear()
                    if ended == [None]:  # nothing can follow: the call is over, and it went well
                        _observe(method, grpc.StatusCode.OK, started)
                        yield replies, True
                        return
                    yield replies, False
                    handed_over = loop.time()
                elif ended:
                    break
                else:
                    ready.clear()
                    await ready.wait()
            error = ended[0]
            if isinstance(error, aio.AioRpcError):
                raise _failed(method, error, started) from None
            if error is not None:
                raise error
        finally:
            call.cancel()  # a no-op once the stream ended
            reader.cancel()
        _observe(method, grpc.StatusCode.OK, started)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _failed(method: str, exc: aio.AioRpcError, started: float) -> client.GrpcCallError:
    code = exc.code()
    _observe(method, code, started)
    cls = client.BackendUnavailable if code == grpc.StatusCode.UNAVAILABLE else client.GrpcCallError
    return cls(method, code, exc.details() or "")


def _observe(method: str, code: grpc.StatusCode | None, started: float) -> None:
    observer = client.call_observer
    if observer is not None:
        try:
            observer(method, code.name if code is not None else "UNKNOWN", time.monotonic() - started)
        except Exception:  # metrics never break a call
            pass
