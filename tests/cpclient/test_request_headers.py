"""cpclient's request headers, made once per API key: against the raw scripted server of
``tests/proto/test_keepalive_wire.py`` (a real socket), a call carries the key, the JSON
``Accept``, and ``Content-Type`` only with a body; a key the caller sets later is sent from the
next call on."""

from __future__ import annotations

import pytest

from cpclient import ControlPlaneClient
from tests.proto.test_keepalive_wire import ScriptedServer

BODY = b'{"released": true}'
RELEASED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


@pytest.fixture
def server():
    server = ScriptedServer()
    yield server
    server.close()


def test_the_headers_follow_the_api_key_and_the_body(server):
    client = ControlPlaneClient(server.url, "key-one", timeout=5)
    for _ in range(3):
        server.answer(RELEASED)
    assert client.release("lease-1") is True
    assert client.renew("lease-1") is None  # a body: {}; the answer has no expires_at
    client.api_key = "key-two"
    client.release("lease-1")
    client.close()
    release, renew, after_change = (request.split(b"\r\n\r\n")[0] for request in server.requests)
    assert b"\r\nAuthorization: Bearer key-one\r\n" in release
    assert b"\r\nAccept: application/json, application/problem+json\r\n" in release
    assert b"Content-Type" not in release
    assert b"\r\nContent-Type: application/json\r\n" in renew
    assert b"\r\nAuthorization: Bearer key-two\r\n" in after_change
    assert server.accepted == 1
