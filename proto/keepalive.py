"""One kept HTTP/1.1 connection to the control plane, shared by the two clients that may import
nothing of ours but ``proto`` (``tests/test_layers.py``): ``cpclient`` (one per thread) and the
worker's node-API client (``worker/control_plane.py``). Standard library only: cpclient needs
nothing else outside its gRPC helpers, and the worker nothing but grpcio and protobuf.

Every call goes over the same connection (the control plane's gunicorn keeps an idle one
``WEB_KEEPALIVE``, 20 s by default), so a call costs no TCP (or TLS) handshake.

**The exchange is done here on the socket, not by ``http.client``** (whose answer parsing,
through ``email.parser``, was most of a frontend's CPU per route + release, issue 14): the
request (request line, ``Host``, ``Accept-Encoding: identity``, the caller's headers,
``Content-Length``, body) is written with one ``sendall``; the answer's status line and header
block (at most 64 KiB and 100 header lines) are parsed here, and its body is read by
``Content-Length``, by chunked transfer coding (trailers read and dropped), or to the close when
it has neither. Interim (1xx) answers are skipped; ``HEAD``, 204 and 304 answers have no body.
The connection is closed after the answer (``Response.will_close``) when the server says
``Connection: close``, answers HTTP/1.0, sends a body delimited by its close, sends both
``Transfer-Encoding`` and ``Content-Length``, or sends more bytes than the answer (out of step).
A malformed answer raises an ``http.client.HTTPException`` (``BadStatusLine``, ``LineTooLong``,
``IncompleteRead``, ...), as ``http.client`` would, and a request that cannot be written
safely (a control character in the path or a header) raises ``http.client.InvalidURL`` or
``ValueError`` before anything is sent. Header names are compared case-insensitively: the
answer's are lower-cased (``Response.headers``; repeated ones joined with ``", "``).

When a request may be sent again, and when never:

* A kept connection the server has closed in the meantime (keep-alive expiry, a restart) is
  found *before* sending: an idle connection with something to read (the server's FIN) is
  stale and is replaced by a new one, so nothing is written to it.
* A failure while the request is being written (reset, broken pipe) on a kept connection means
  the server closed it before the request arrived whole (a request is written in one ``send``
  with its body), so the server cannot have acted on it: it is sent once more on a new
  connection, whatever the call.
* A failure after the request went out (the server closed the connection at the same moment,
  or died before its answer's headers were complete) is ambiguous: the server may have acted.
  It is sent once more only for calls the caller marks ``repeatable`` (safe to repeat: a
  heartbeat, a read, a lease release); any other call (a route, which grants a lease; a
  registration, which rotates the node's credentials) raises, and its caller decides. An answer
  cut short in its body raises ``http.client.IncompleteRead``, not retried.
* Timeouts are never retried: the server may have acted.

Proxy variables (``HTTP_PROXY``, ...) are not read, and redirects are not followed: the
control plane is reached directly and answers its API without redirects.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import ssl
import urllib.parse

# What a peer's close looks like when a request is written to, or its answer read from, a
# connection the server has just closed.
CLOSED_BY_PEER = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)

MAX_HEAD_BYTES = 65536  # an answer's status line and headers (http.client's bound per line)
MAX_HEADERS = 100  # header lines of one answer (http.client's bound)
_RECEIVE_SIZE = 65536

_LINE_END = re.compile(rb"\r?\n")
_TEXT_LINE_END = re.compile("\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS_CODE = re.compile("[1-9][0-9][0-9]")
_DIGITS = re.compile("[0-9]{1,18}")
# Refused before sending, as http.client refuses them: a request target with a space or a
# control character (or, here, anything not ASCII), a header name that is not one, a header
# value with a line break (which would smuggle a header or a second request).
_BAD_TARGET = re.compile("[\x00-\x20\x7f-\U0010ffff]")
_HEADER_NAME = re.compile(r"[^:\s][^:\r\n]*")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")
_BODYLESS_METHODS = frozenset(("GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"))


class _NotSent(Exception):
    """The request could not be written whole: the server cannot have acted on it."""


class Response:
    """An answer's status line and headers. ``headers``: a dict keyed by lower-cased names
    (repeated headers joined with ``", "``); ``getheader`` takes a name in any case."""

    __slots__ = ("status", "reason", "version", "headers", "will_close")

    def __init__(self, status: int, reason: str, version: int, headers: dict[str, str], will_close: bool):
        self.status = status
        self.reason = reason
        self.version = version  # 10 or 11, as http.client.HTTPResponse.version
        self.headers = headers
        self.will_close = will_close

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def __repr__(self) -> str:
        return f"Response({self.status} {self.reason!r})"


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
        self._host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self._port = parts.port or default_port
        self._prefix = parts.path
        self._https = parts.scheme == "https"
        self._ssl_context = ssl_context  # None: the system's roots, loaded at the first connection
        # Host as http.client sends it: IPv6 literals in brackets, the port only when not the default.
        host = f"[{self._host}]" if ":" in self._host else self._host.encode("idna").decode("ascii")
        host = host if self._port == default_port else f"{host}:{self._port}"
        self._fixed_headers = f"Host: {host}\r\nAccept-Encoding: identity\r\n"
        self._sock: socket.socket | None = None

    def exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: dict[str, str],
        *,
        repeatable: bool = False,
        timeout: float | None = None,
    ) -> tuple[Response, bytes]:
        """Send one request, read its whole answer; returns the response (status, reason,
        headers) and its body. Raises ``OSError`` or ``http.client.HTTPException`` when there
        is no answer (the connection is dropped then). ``headers`` must not set ``Host`` or
        ``Content-Length`` (they are added here)."""
        timeout = self.timeout if timeout is None else timeout
        request = self._request_bytes(method, path, data, headers)
        sock, kept = self._usable_connection(timeout)
        try:
            try:
                response, raw = self._send(sock, request, method)
            except (_NotSent, *CLOSED_BY_PEER) as exc:
                self.close()
                if not kept or not (repeatable or isinstance(exc, _NotSent)):
                    raise
                sock, _ = self._usable_connection(timeout)
                response, raw = self._send(sock, request, method)
        except _NotSent as exc:
            self.close()
            raise exc.__cause__ from None
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response, raw

    def _request_bytes(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> bytes:
        target = self._prefix + path
        if _BAD_TARGET.search(target) or _BAD_TARGET.search(method):
            raise http.client.InvalidURL(f"refusing to send {method!r} {target!r}: a space or control character")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed_headers]
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            value = str(value)
            if _BAD_HEADER_VALUE.search(value):
                raise ValueError(f"invalid value of header {name!r}")  # the value may be a secret: not shown
            lines.append(f"{name}: {value}\r\n")
        if data is not None:
            lines.append(f"Content-Length: {len(data)}\r\n\r\n")
            return "".join(lines).encode("latin-1") + data
        if method not in _BODYLESS_METHODS:
            lines.append("Content-Length: 0\r\n")  # as http.client: a POST without body says so
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send(self, sock: socket.socket, request: bytes, method: str) -> tuple[Response, bytes]:
        try:
            sock.sendall(request)
        except CLOSED_BY_PEER as exc:
            raise _NotSent() from exc
        return _read_answer(sock, method)

    def _usable_connection(self, timeout: float) -> tuple[socket.socket, bool]:
        """The kept connection when it is still open (True), else a new one (False). An idle
        kept connection that has something to read was closed by the server (or is out of
        step): it is dropped before anything is written to it."""
        sock = self._sock
        if sock is not None and not _readable(sock):
            if sock.gettimeout() != timeout:  # (settimeout is a system call each time)
                sock.settimeout(timeout)
            return sock, True
        self.close()
        sock = socket.create_connection((self._host, self._port), timeout)
        try:
            # The request goes out in one write and is answered before the next: no Nagle delay
            # (http.client sets it too).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._https:
                if self._ssl_context is None:  # made once: loading the system's roots is slow
                    self._ssl_context = ssl.create_default_context()
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock, False

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


if hasattr(select, "poll"):

    def _readable(sock: socket.socket) -> bool:
        # poll, not select: cheaper, and no FD_SETSIZE limit in a process with many sockets
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

else:  # pragma: no cover - Windows

    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])


# --- reading one answer --------------------------------------------------------------------------


def _read_answer(sock: socket.socket, method: str) -> tuple[Response, bytes]:
    """The answer to the request just sent: its ``Response`` and whole body."""
    buffer = b""
    while True:
        head, buffer = _read_head(sock, buffer)
        response = _parse_head(head)
        if not 100 <= response.status < 200 or response.status == 101:
            break  # interim answers (100 Continue, 103 Early Hints) precede the real one
    headers = response.headers
    status = response.status
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "transfer-encoding" in headers:
        if "content-length" in headers:
            response.will_close = True  # both framings: an error or a smuggling attempt (RFC 9112 6.1)
        if _tokens(headers["transfer-encoding"])[-1] == "chunked":
            body, buffer = _read_chunked(sock, buffer)
        else:
            body, buffer = _read_to_close(sock, buffer), b""
            response.will_close = True
    elif "content-length" in headers:
        body, buffer = _read_length(sock, buffer, _content_length(headers["content-length"]))
    else:
        body, buffer = _read_to_close(sock, buffer), b""
        response.will_close = True
    if buffer or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        response.will_close = True  # more than the answer: out of step, the connection is not reused
    return response, body


def _receive(sock: socket.socket) -> bytes:
    return sock.recv(_RECEIVE_SIZE)


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    """The status line and header block (without the blank line), and what follows it."""
    while True:
        if buffer:  # (empty when a new answer begins: nothing to look for yet)
            head_end, body_start = _head_end(buffer)
            if head_end >= 0:
                if head_end > MAX_HEAD_BYTES:
                    break
                return buffer[:head_end], buffer[body_start:]
            if len(buffer) > MAX_HEAD_BYTES:
                break
        received = _receive(sock)
        if not received:
            if buffer:
                raise http.client.RemoteDisconnected(
                    "Remote end closed connection before the answer's headers were complete"
                )
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        buffer += received
    raise http.client.LineTooLong("the answer's header block")


def _head_end(buffer: bytes) -> tuple[int, int]:
    """Where the header block ends and the body starts in ``buffer`` (-1, -1: not yet). The
    blank line is CRLF CRLF, or a bare LF for either (tolerated, as http.client does); two
    ``find`` calls, several times cheaper than one regular expression."""
    crlf = buffer.find(b"\n\r\n")
    bare = buffer.find(b"\n\n", 0, len(buffer) if crlf < 0 else crlf + 1)
    if bare >= 0:
        return bare, bare + 2
    if crlf >= 0:
        return (crlf - 1 if buffer[crlf - 1 : crlf] == b"\r" else crlf), crlf + 3
    return -1, -1


def _parse_head(head: bytes) -> Response:
    text = head.decode("iso-8859-1")
    lines = text.split("\r\n")
    if text.count("\n") >= len(lines):  # some line ends with a bare LF
        lines = _TEXT_LINE_END.split(text)
    status_line = lines[0]
    version_text, _, rest = status_line.partition(" ")
    code, _, reason = rest.strip().partition(" ")
    if not version_text.startswith("HTTP/1.") or not _STATUS_CODE.fullmatch(code):
        raise http.client.BadStatusLine(status_line)
    version = 10 if version_text == "HTTP/1.0" else 11
    if len(lines) > MAX_HEADERS + 1:
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    previous = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name and name[-1] not in " \t" and name[0] not in " \t":
            name = previous = name.lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        elif line[:1] in (" ", "\t") and previous:  # obsolete line folding: continues the previous value
            headers[previous] = f"{headers[previous]} {line.strip()}"
        else:  # no name, or white space before its colon (RFC 9112 5.1: rejected)
            raise http.client.HTTPException(f"malformed header line {line!r}")
    if version == 10:
        will_close = True  # HTTP/1.0: one answer per connection
    else:
        will_close = "connection" in headers and "close" in _tokens(headers["connection"])
    return Response(int(code), reason.strip(), version, headers, will_close)


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",")]


def _content_length(value: str) -> int:
    # "n, n" (a repeated header) is allowed when the values agree (RFC 9110 8.6)
    values = {part.strip() for part in value.split(",")}
    if len(values) != 1:
        raise http.client.HTTPException(f"conflicting Content-Length {value!r}")
    (text,) = values
    if not _DIGITS.fullmatch(text):
        raise http.client.HTTPException(f"invalid Content-Length {value!r}")
    return int(text)


def _read_length(sock: socket.socket, buffer: bytes, length: int) -> tuple[bytes, bytes]:
    """``length`` bytes of body (some already in ``buffer``) and what follows them."""
    if len(buffer) >= length:
        return buffer[:length], buffer[length:]
    body = bytearray(length)
    body[: len(buffer)] = buffer
    view = memoryview(body)
    got = len(buffer)
    while got < length:
        count = sock.recv_into(view[got:], min(length - got, 1 << 20))
        if not count:
            raise http.client.IncompleteRead(bytes(body[:got]), length - got)
        got += count
    return bytes(body), b""


def _read_to_close(sock: socket.socket, buffer: bytes) -> bytes:
    parts = [buffer]
    while received := _receive(sock):
        parts.append(received)
    return b"".join(parts)


def _read_chunked(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    """A chunked body (chunk extensions ignored, trailers read and dropped) and what follows."""
    parts = []
    while True:
        line, buffer = _read_line(sock, buffer, parts)
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise http.client.IncompleteRead(b"".join(parts))  # as http.client: a bad chunk size
        size = int(size_text, 16)
        if size == 0:
            break
        while len(buffer) < size + 2:
            received = _receive(sock)
            if not received:
                raise http.client.IncompleteRead(b"".join(parts) + buffer[:size], size - len(buffer))
            buffer += received
        if buffer[size : size + 2] == b"\r\n":
            parts.append(buffer[:size])
            buffer = buffer[size + 2 :]
        elif buffer[size : size + 1] == b"\n":
            parts.append(buffer[:size])
            buffer = buffer[size + 1 :]
        else:
            raise http.client.IncompleteRead(b"".join(parts))  # the chunk is not followed by its line end
    trailer_bytes = 0
    while True:  # trailer fields, up to the blank line
        line, buffer = _read_line(sock, buffer, parts)
        if not line:
            return b"".join(parts), buffer
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEAD_BYTES:
            raise http.client.LineTooLong("the answer's trailer fields")


def _read_line(sock: socket.socket, buffer: bytes, parts: list[bytes]) -> tuple[bytes, bytes]:
    """One line of a chunked body (without its end) and what follows it."""
    while True:
        end = _LINE_END.search(buffer)
        if end is not None:
            return buffer[: end.start()], buffer[end.end() :]
        if len(buffer) > MAX_HEAD_BYTES:
            raise http.client.LineTooLong("a chunk-size line")
        received = _receive(sock)
        if not received:
            raise http.client.IncompleteRead(b"".join(parts))
        buffer += received
