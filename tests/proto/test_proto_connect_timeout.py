"""Worker gRPC calls against an address that accepts TCP and never answers: they end within
the connect deadline (``CONTROLPLANE_GRPC_CONNECT_TIMEOUT``), not after the call's own deadline
(StartBackend 30 s); a refused connection still fails at once, and a worker that answers is
unaffected."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from proto import client


@pytest.fixture
def silent_address():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    yield address
    stop.set()
    thread.join(2)
    client.close_channel(address)
    for sock in accepted:
        sock.close()
    listener.close()


@pytest.mark.parametrize("call", ["start_backend", "list_backends"])
def test_a_worker_that_accepts_tcp_and_never_answers_is_given_up_on_within_the_connect_deadline(
    silent_address, call, monkeypatch
):
    monkeypatch.setitem(client.DEFAULT_TIMEOUTS, "connect", 1.0)
    monkeypatch.setattr(client, "_django_setting", lambda name: None)
    began = time.monotonic()
    with pytest.raises(client.NotConnected) as raised:
        if call == "start_backend":
            client.start_backend(silent_address, "m", "echo", 0, token="", timeout=30)
        else:
            client.list_backends(silent_address, token="", timeout=30)
    assert time.monotonic() - began < 2.5
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_refused_connection_still_fails_at_once_as_unavailable(monkeypatch):
    monkeypatch.setattr(client, "_django_setting", lambda name: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens
    began = time.monotonic()
    with pytest.raises(client.BackendUnavailable) as raised:
        client.list_backends(f"127.0.0.1:{port}", token="", timeout=30)
    assert time.monotonic() - began < 1.0 and not isinstance(raised.value, client.NotConnected)


def test_a_worker_that_answers_is_called_as_before(serve, fake_worker, monkeypatch):
    monkeypatch.setattr(client, "_django_setting", lambda name: None)
    address = serve(fake_worker())
    backends = client.list_backends(address, token="", timeout=5).backends
    assert [backend.model_name for backend in backends] == ["llama"]  # what the fake worker runs
