"""Bearer-token checks for gRPC servers (the worker service and the built-in backends).

LocalAI backends started by a worker require ``authorization: Bearer <token>`` metadata with
the token they get in ``LOCALAI_GRPC_AUTH_TOKEN`` (the node's backend token, the data-plane
credential); the worker's own service requires a different one, the worker command token the
control plane handed over at registration. Neither is the fleet registration token, which
therefore opens nothing here. Checking in an interceptor keeps every RPC covered, including
ones added later.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc


def bearer_token(metadata) -> str | None:
    """Return the token of an ``authorization: Bearer <token>`` metadata entry, else None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


def metadata_value(metadata, name: str) -> str | None:
    for key, value in metadata or ():
        if key.lower() == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
    """A method handler of the same shape as ``handler`` that aborts with ``code``."""

    def abort(request_or_iterator, context):
        context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without the expected bearer token (UNAUTHENTICATED).

    ``token`` None or empty disables the check (a backend started by hand without
    ``LOCALAI_GRPC_AUTH_TOKEN``, as LocalAI does). ``token`` may also be a callable returning
    the current token (the worker's, known only once registered): while it returns None every
    call is refused, so an unregistered worker obeys nobody. ``node_id`` is an optional callable that
    returns the node id this server belongs to (None while unknown); a call whose ``x-node-id``
    metadata names another node is refused with FAILED_PRECONDITION, so an address reused by a
    different worker is never driven as if it were the old one.
    """

    def __init__(self, token: str | Callable[[], str | None] | None, node_id: Callable[[], str | None] | None = None):
        self._current = token if callable(token) else None
        self._token = token.encode() if token and not callable(token) else None
        self._node_id = node_id

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = handler_call_details.invocation_metadata
        expected = self._token
        if self._current is not None:
            current = self._current()
            if not current:
                return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "no credential is valid here yet")
            expected = current.encode()
        if expected is not None:
            presented = bearer_token(metadata)
            if presented is None or not hmac.compare_digest(presented.encode(), expected):
                return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if self._node_id is not None:
            addressed_to = metadata_value(metadata, "x-node-id")
            mine = self._node_id()
            if addressed_to and mine and addressed_to != mine:
                return _abort_handler(
                    handler,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this worker is node {mine}, not {addressed_to}",
                )
        return handler
