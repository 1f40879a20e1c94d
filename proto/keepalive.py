"""One kept HTTP/1.1 connection to the control plane, shared by the two clients that may import
nothing of ours but ``proto`` (``tests/test_layers.py``): ``cpclient`` (one per thread) and the
worker's node-API client (``worker/control_plane.py``). Standard library only: cpclient needs
nothing else outside its gRPC helpers, and the worker nothing but grpcio and protobuf.

Every call goes over the same connection (the control plane's gunicorn keeps an idle one
``WEB_KEEPALIVE``, 20 s by default), so a call costs no TCP (or TLS) handshake.

When a request may be sent again, and when never:

* A kept connection the server has closed in the meantime (keep-alive expiry, a restart) is
  found *before* sending: an idle connection with something to read (the server's FIN) is
  stale and is replaced by a new one, so nothing is written to it.
* A failure while the request is being written (reset, broken pipe) on a kept connection means
  the server closed it before the request arrived whole (a request is written in one ``send``
  with its body), so the server cannot have acted on it: it is sent once more on a new
  connection, whatever the call.
* A failure after the request went out (the server closed the connection at the same moment,
  or died while answering) is ambiguous: the server may have acted. It is sent once more only
  for calls the caller marks ``repeatable`` (safe to repeat: a heartbeat, a read, a lease
  release); any other call (a route, which grants a lease; a registration, which rotates the
  node's credentials) raises, and its caller decides.
* Timeouts are never retried: the server may have acted.

Proxy variables (``HTTP_PROXY``, ...) are not read, and redirects are not followed: the
control plane is reached directly and answers its API without redirects.
"""

from __future__ import annotations

import http.client
import select
import ssl
import urllib.parse

# What a peer's close looks like when a request is written to, or its answer read from, a
# connection the server has just closed.
CLOSED_BY_PEER = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _NotSent(Exception):
    """The request could not be written whole: the server cannot have acted on it."""


class KeptConnection:
    """One kept connection to ``base_url`` (``http://`` or ``https://host[:port][/prefix]``).
    Not thread-safe: one per thread, or calls serialised by the owner."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None):
        """``ssl_context``: how an ``https`` control plane is verified (default: the system's
        roots)."""
        parts = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control plane URL must be http:// or https://host[:port]: {base_url!r}")
        self.timeout = timeout
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path
        self._connection: http.client.HTTPConnection | None = None
        self._ssl_context = ssl_context

    def exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: dict[str, str],
        *,
        repeatable: bool = False,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request, read its whole answer; returns the response (status, reason,
        headers) and its body. Raises ``OSError`` or ``http.client.HTTPException`` when there
        is no answer (the connection is dropped then)."""
        timeout = self.timeout if timeout is None else timeout
        connection, kept = self._usable_connection(timeout)
        try:
            try:
                response, raw = self._send(connection, method, path, data, headers)
            except (_NotSent, *CLOSED_BY_PEER) as exc:
                self.close()
                if not kept or not (repeatable or isinstance(exc, _NotSent)):
                    raise
                connection, _ = self._usable_connection(timeout)
                response, raw = self._send(connection, method, path, data, headers)
        except _NotSent as exc:
            self.close()
            raise exc.__cause__ from None
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response, raw

    def _send(self, connection, method, path, data, headers) -> tuple[http.client.HTTPResponse, bytes]:
        try:
            connection.request(method, self._prefix + path, body=data, headers=headers)
        except CLOSED_BY_PEER as exc:
            raise _NotSent() from exc
        response = connection.getresponse()
        return response, response.read()

    def _usable_connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """The kept connection when it is still open (True), else a new one (False). An idle
        kept connection that has something to read was closed by the server (or is out of
        step): it is dropped before anything is written to it."""
        connection = self._connection
        if connection is not None and connection.sock is not None:
            readable, _, _ = select.select([connection.sock], [], [], 0)
            if not readable:
                connection.sock.settimeout(timeout)
                connection.timeout = timeout
                return connection, True
        self.close()
        if self._scheme == "https":
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl_context or ssl.create_default_context()
            )
        else:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        return self._connection, False

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
