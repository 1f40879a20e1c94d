"""gRPC over TLS (proto/tls.py): real servers on loopback, certificates from a throwaway CA.

The server is the real echo backend (``worker.backends.echo.serve``) with server credentials
built as the worker builds them; the clients are the control plane's (``proto.client``, set up
through the Django settings it reads) and the gateway's (``grpc.aio``).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from core import checks
from proto import backend_pb2, backend_pb2_grpc, client, tls
from tests.tls_certs import make_ca
from worker.backends.echo import EchoBackend, serve

TOKEN = "backend-token"


@pytest.fixture
def ca(tmp_path):
    return make_ca(tmp_path, "fleet-ca")


@pytest.fixture
def backend(ca):
    """backend(client_ca=None) -> grpcs:// address of an echo backend serving TLS with a
    certificate for 127.0.0.1 signed by ``ca``."""
    from tests.processes import free_port

    servers = []

    def start(client_ca=None):
        leaf = ca.issue(f"backend{len(servers)}")
        port = free_port()
        credentials = tls.server_credentials(leaf.cert, leaf.key, client_ca)
        servers.append(serve(f"127.0.0.1:{port}", TOKEN, EchoBackend(), threads=2, credentials=credentials))
        return tls.tls_address(f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(grace=None)
    client.close_all_channels()


def _load(address):
    loaded, message = client.load_model(address, backend_pb2.ModelOptions(Model="tiny"), token=TOKEN, timeout=10)
    assert loaded, message


def test_a_client_verifying_the_server_against_its_ca_talks_tls(backend, ca, settings):
    settings.GRPC_TLS_CA = ca.cert
    address = backend()
    assert client.probe(address, token=TOKEN, timeout=5).outcome is client.Probe.ALIVE
    _load(address)
    assert client.predict(address, "over tls", token=TOKEN, timeout=5).message == b"over tls"
    assert [r.message for r in client.predict_stream(address, "a b", token=TOKEN, timeout=5)] == [b"a", b" b"]


def test_a_client_trusting_another_ca_fails_with_a_certificate_error(backend, tmp_path, settings):
    address = backend()
    settings.GRPC_TLS_CA = make_ca(tmp_path, "other-ca").cert
    with pytest.raises(client.BackendUnavailable) as failed:
        client.status(address, token=TOKEN, timeout=5)
    # grpc's own words, handed through: the handshake failed on the certificate
    assert "CERTIFICATE_VERIFY_FAILED" in failed.value.detail, failed.value.detail
    # the routing probe counts it as unreachable (no connection), like any failed handshake
    assert client.probe(address, token=TOKEN, timeout=5).outcome is client.Probe.UNREACHABLE


def test_a_certificate_for_another_host_is_refused(ca, settings):
    from tests.processes import free_port

    leaf = ca.issue("elsewhere", hosts=("10.9.8.7", "worker.example"))
    port = free_port()
    server = serve(f"127.0.0.1:{port}", TOKEN, EchoBackend(), credentials=tls.server_credentials(leaf.cert, leaf.key))
    settings.GRPC_TLS_CA = ca.cert
    try:
        with pytest.raises(client.BackendUnavailable) as failed:
            client.status(f"grpcs://127.0.0.1:{port}", token=TOKEN, timeout=5)
    finally:
        server.stop(grace=None)
        client.close_all_channels()
    assert "Hostname Verification Check failed" in failed.value.detail, failed.value.detail


def test_a_plaintext_address_of_a_tls_server_does_not_connect(backend, ca, settings):
    settings.GRPC_TLS_CA = ca.cert
    address = backend()
    bare, is_tls = tls.split_address(address)
    assert is_tls and not bare.startswith("grpcs")
    with pytest.raises(client.BackendUnavailable):
        client.status(bare, token=TOKEN, timeout=3)
    # ... unless the process dials every address with TLS (CONTROLPLANE_GRPC_TLS)
    settings.GRPC_TLS = True
    client.close_all_channels()
    assert client.status(bare, token=TOKEN, timeout=5).state == backend_pb2.StatusResponse.READY


def test_mutual_tls_refuses_a_client_without_a_certificate(backend, ca, tmp_path, settings):
    settings.GRPC_TLS_CA = ca.cert
    address = backend(client_ca=ca.cert)

    with pytest.raises(client.BackendUnavailable) as refused:
        client.status(address, token=TOKEN, timeout=5)
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert "no client certificate was presented" in refused.value.detail, refused.value.detail

    # a certificate from another CA is refused as well
    stranger = make_ca(tmp_path, "stranger-ca").issue("control-plane")
    settings.GRPC_TLS_CERT, settings.GRPC_TLS_KEY = stranger.cert, stranger.key
    client.close_all_channels()
    with pytest.raises(client.BackendUnavailable):
        client.status(address, token=TOKEN, timeout=5)

    # the control plane's certificate from the fleet's CA is accepted
    mine = ca.issue("control-plane")
    settings.GRPC_TLS_CERT, settings.GRPC_TLS_KEY = mine.cert, mine.key
    client.close_all_channels()
    assert client.status(address, token=TOKEN, timeout=5).state == backend_pb2.StatusResponse.READY
    # TLS is beside the bearer token, not instead of it
    with pytest.raises(client.GrpcCallError) as unauthenticated:
        client.status(address, token="wrong", timeout=5)
    assert unauthenticated.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_the_gateways_asyncio_channel_dials_tls_the_same_way(backend, ca, settings):
    settings.GRPC_TLS_CA = ca.cert
    address = backend()
    _load(address)

    async def call(trusted: str):
        channel = tls.create_aio_channel(address, tls=tls.ClientTls(ca_file=trusted))
        try:
            stub = backend_pb2_grpc.BackendStub(channel)
            return await stub.Predict(
                backend_pb2.PredictOptions(Prompt="aio"), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
        finally:
            await channel.close()

    assert asyncio.run(call(ca.cert)).message == b"aio"


def test_an_unreadable_tls_file_is_a_configuration_error_not_a_dead_backend(backend, ca, tmp_path, settings):
    address = backend()
    settings.GRPC_TLS_CA = str(tmp_path / "missing.pem")
    with pytest.raises(client.GrpcCallError) as failed:
        client.status(address, token=TOKEN, timeout=5)
    assert failed.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "CONTROLPLANE_GRPC_TLS_CA" in failed.value.detail and "missing.pem" in failed.value.detail
    # a probe must not make the reconciler remove replicas over a configuration mistake
    assert client.probe(address, token=TOKEN, timeout=5).outcome is client.Probe.BUSY
    # and the system checks (every management command, the web process's start) name it
    errors = checks.check_grpc_tls_files()
    assert [e.id for e in errors] == ["controlplane.E002"] and "missing.pem" in errors[0].msg

    settings.GRPC_TLS_CA = ca.cert
    settings.GRPC_TLS_CERT = ca.issue("half").cert  # a certificate without its key
    assert any("must be set together" in e.msg for e in checks.check_grpc_tls_files())


def test_addresses_split_and_join():
    assert tls.split_address("grpcs://10.0.0.7:50051") == ("10.0.0.7:50051", True)
    assert tls.split_address("10.0.0.7:50051") == ("10.0.0.7:50051", False)
    assert tls.split_address("grpcs://[::1]:50051") == ("[::1]:50051", True)
    assert tls.tls_address("[::1]:50051") == "grpcs://[::1]:50051"
