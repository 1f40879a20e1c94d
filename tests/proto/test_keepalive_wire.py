"""``proto.keepalive.KeptConnection`` reads what a real HTTP/1.1 server may send: against a raw
TCP server on 127.0.0.1 (plain or TLS with a throwaway CA) that reads each request and writes
scripted answer bytes, answers framed by Content-Length, by chunked transfer coding and by the
server's close; HTTP/1.0 answers and ``Connection: close``; header names in any case; interim
answers; answers cut short; oversized header blocks; requests it must refuse to send; and which
of these keep the connection for the next call (counted by the server's accepted connections).

The exchanges with gunicorn itself (keep-alive expiry, resets after sending, a restart) are
tested in ``tests/worker/test_worker_keepalive.py`` and ``tests/cpclient/test_keepalive.py``."""

from __future__ import annotations

import http.client
import queue
import socket
import ssl
import threading
from dataclasses import dataclass

import pytest

from proto.keepalive import MAX_HEAD_BYTES, KeptConnection
from tests.tls_certs import make_ca

OK_JSON = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'


@dataclass
class Answer:
    """What the server does with one request: write ``raw``, then close the connection when
    ``close``; ``stall``: write nothing and keep the connection open (a server that hangs)."""

    raw: bytes = b""
    close: bool = False
    stall: bool = False


class ScriptedServer:
    """A raw TCP server: each request read (head up to the blank line, then a Content-Length
    body) is recorded and answered with the next queued :class:`Answer`."""

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls_context = tls_context
        self.answers: queue.Queue[Answer] = queue.Queue()
        self.requests: list[bytes] = []  # each request's head and body as received
        self.accepted = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_context else 'http'}://127.0.0.1:{self.port}"

    def answer(self, raw: bytes, *, close: bool = False) -> None:
        self.answers.put(Answer(raw, close))

    def stall(self) -> None:
        self.answers.put(Answer(stall=True))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls_context is not None:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    received = conn.recv(65536)
                    if not received:
                        return
                    buffer += received
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                answer = self.answers.get(timeout=10)
                if answer.stall:
                    self._stop.wait(30)
                    return
                conn.sendall(answer.raw)
                if answer.close:
                    return
        except (OSError, queue.Empty):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def server():
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture
def kept(server):
    kept = KeptConnection(server.url, timeout=5)
    yield kept
    kept.close()


def get(kept: KeptConnection, **kwargs):
    return kept.exchange("GET", "/thing", None, {"Accept": "application/json"}, **kwargs)


def test_answers_framed_by_content_length_share_one_connection(server, kept):
    server.answer(OK_JSON)
    server.answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\n{}")
    response, body = get(kept)
    assert (response.status, response.reason, body) == (200, "OK", b'{"ok": true}')
    assert response.headers["content-type"] == "application/json"
    response, body = get(kept)
    assert (response.status, response.reason, body) == (404, "Not Found", b"{}")
    assert response.getheader("Retry-After") == "3"
    assert server.accepted == 1


def test_a_chunked_answer_is_joined_and_its_trailers_dropped(server, kept):
    server.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    server.answer(OK_JSON)
    response, body = get(kept)
    assert body == b"hello 0123456789"
    assert "x-trailer" not in response.headers
    assert not response.will_close
    assert get(kept)[1] == b'{"ok": true}'  # nothing of the chunked answer was left to read
    assert server.accepted == 1


def test_a_chunk_larger_than_one_read_is_read_whole(server, kept):
    payload = bytes(range(256)) * 1024
    server.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
    )
    assert get(kept)[1] == payload


def test_an_answer_without_length_is_read_to_the_close_and_the_connection_dropped(server, kept):
    server.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True)
    server.answer(OK_JSON)
    response, body = get(kept)
    assert body == b"until the end"
    assert response.will_close
    assert get(kept)[1] == b'{"ok": true}'
    assert server.accepted == 2


def test_an_http_1_0_answer_closes_the_connection(server, kept):
    server.answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    server.answer(OK_JSON)
    response, body = get(kept)
    assert (response.version, body, response.will_close) == (10, b"ok", True)
    get(kept)
    assert server.accepted == 2


def test_header_names_in_any_case(server, kept):
    server.answer(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-LENGTH: 4\r\nretry-AFTER: 7\r\nCONNECTION: Close\r\n\r\nbusy"
    )
    response, body = get(kept)
    assert body == b"busy"
    assert response.getheader("Retry-After") == response.headers["retry-after"] == "7"
    assert response.will_close  # "Close" in any case


def test_interim_answers_are_skipped_and_bodyless_answers_have_no_body(server, kept):
    server.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK_JSON)
    server.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
    server.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")  # a HEAD answer: the length of a GET's body
    assert get(kept)[0].status == 200
    assert get(kept)[1] == b""
    response, body = kept.exchange("HEAD", "/thing", None, {})
    assert (response.status, body) == (200, b"")
    assert server.accepted == 1


def test_more_bytes_than_the_answer_drop_the_connection(server, kept):
    server.answer(OK_JSON + b"HTTP/1.1 200 OK\r\n")  # out of step: the rest is not an answer to anything
    server.answer(OK_JSON)
    assert get(kept)[0].will_close
    get(kept)
    assert server.accepted == 2


def test_the_request_carries_host_prefix_length_and_headers(server):
    kept = KeptConnection(server.url + "/prefix/", timeout=5)
    server.answer(OK_JSON)
    server.answer(OK_JSON)
    kept.exchange("POST", "/api/x?y=1", b'{"a": 1}', {"Authorization": "Bearer t", "Content-Type": "application/json"})
    kept.exchange("POST", "/api/release", None, {"Authorization": "Bearer t"})
    kept.close()
    first, second = server.requests
    assert first.startswith(b"POST /prefix/api/x?y=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in first
    assert b"\r\nAuthorization: Bearer t\r\n" in first
    assert first.endswith(b'\r\nContent-Length: 8\r\n\r\n{"a": 1}')
    assert second.endswith(b"\r\nContent-Length: 0\r\n\r\n")  # a POST without body says so


def test_a_header_or_path_that_would_split_the_request_is_refused_before_sending(server, kept):
    with pytest.raises(ValueError):
        kept.exchange("GET", "/thing", None, {"Authorization": "Bearer t\r\nX-Injected: 1"})
    with pytest.raises(http.client.InvalidURL):
        kept.exchange("GET", "/thing HTTP/1.1\r\nX-Injected: 1", None, {})
    assert server.accepted == 0


def test_a_server_closing_mid_body_raises_incomplete_read_and_is_not_retried(server, kept):
    server.answer(OK_JSON)
    get(kept)
    server.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", close=True)
    with pytest.raises(http.client.IncompleteRead):
        get(kept, repeatable=True)
    assert len(server.requests) == 2  # not sent again: the answer had begun


def test_a_server_closing_mid_chunked_body_raises_incomplete_read(server, kept):
    server.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort", close=True)
    with pytest.raises(http.client.IncompleteRead):
        get(kept)


def test_a_server_closing_mid_headers_resends_a_repeatable_call_on_a_kept_connection(server, kept):
    server.answer(OK_JSON)
    get(kept)
    server.answer(b"HTTP/1.1 200 OK\r\nContent-Le", close=True)
    server.answer(OK_JSON)
    assert get(kept, repeatable=True)[1] == b'{"ok": true}'
    assert (len(server.requests), server.accepted) == (3, 2)


def test_a_server_closing_mid_headers_raises_for_a_call_that_is_not_repeatable(server, kept):
    server.answer(OK_JSON)
    kept.exchange("POST", "/route", b"{}", {})
    server.answer(b"HTTP/1.1 200 OK\r\nContent-Le", close=True)
    with pytest.raises(http.client.RemoteDisconnected):
        kept.exchange("POST", "/route", b"{}", {})
    assert len(server.requests) == 2


def test_an_oversized_header_block_is_refused(server, kept):
    server.answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(http.client.LineTooLong):
        get(kept)


def test_too_many_headers_are_refused(server, kept):
    server.answer(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"Content-Length: 0\r\n\r\n"
    )
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        get(kept)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"SPDY/3 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
    ],
    ids=["status", "protocol", "space-before-colon", "conflicting-length", "negative-length", "chunk-size"],
)
def test_a_malformed_answer_raises_an_http_exception_and_drops_the_connection(server, kept, raw):
    server.answer(raw)
    server.answer(OK_JSON)
    with pytest.raises(http.client.HTTPException):
        get(kept)
    get(kept)
    assert server.accepted == 2


def test_a_timeout_is_raised_and_never_retried(server):
    kept = KeptConnection(server.url, timeout=5)
    server.answer(OK_JSON)
    get(kept)
    server.stall()
    with pytest.raises(TimeoutError):
        get(kept, repeatable=True, timeout=0.3)
    assert len(server.requests) == 2
    kept.close()


@pytest.fixture
def tls_server(tmp_path):
    ca = make_ca(tmp_path, "keepalive-ca")
    leaf = ca.issue("control-plane")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    server = ScriptedServer(tls_context=context)
    yield server, ca
    server.close()


def test_https_verifies_the_server_and_keeps_the_connection(tls_server):
    server, ca = tls_server
    kept = KeptConnection(server.url, timeout=5, ssl_context=ssl.create_default_context(cafile=ca.cert))
    server.answer(OK_JSON)
    server.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert get(kept)[1] == b'{"ok": true}'
    assert get(kept)[1] == b"ok"
    assert server.accepted == 1
    kept.close()


def test_https_refuses_a_server_its_context_does_not_trust(tls_server, tmp_path):
    server, _ = tls_server
    stranger = make_ca(tmp_path, "stranger-ca")
    kept = KeptConnection(server.url, timeout=5, ssl_context=ssl.create_default_context(cafile=stranger.cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        get(kept)
