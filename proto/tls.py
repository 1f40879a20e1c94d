"""TLS for gRPC: the one place that builds channels and reads certificates.

Every gRPC channel the project opens (the control plane's ``proto.client``, the gateway's
``grpc.aio`` backends, the worker's calls to its own backends) is made by
:func:`create_channel` / :func:`create_aio_channel`, so TLS is decided once, here:

* An address ``grpcs://host:port`` is dialled with TLS; a bare ``host:port`` in plaintext,
  unless the process is told to dial everything with TLS (``CONTROLPLANE_GRPC_TLS``). A worker
  that serves TLS advertises its service and its TLS backends as ``grpcs://...`` (registration,
  ``StartBackend``, ``ListBackends``), so the address stored for a node or replica says how it
  is dialled and every caller (reconciler, router, gateway, frontends) agrees. LocalAI's own
  backends serve plaintext only: their addresses stay bare.
* The server's certificate is verified against ``CONTROLPLANE_GRPC_TLS_CA`` (PEM; unset:
  gRPC's default roots), and its name against the dialled host (a certificate for a worker
  dialled by IP needs that IP in its subjectAltName).
* ``CONTROLPLANE_GRPC_TLS_CERT`` + ``CONTROLPLANE_GRPC_TLS_KEY`` are presented as a client
  certificate (mutual TLS) to workers and backends that require one.

The settings come from Django when it is configured (controlplane/settings.py holds the
defaults) and from the environment, by the same names, when it is not (``cpclient`` used from
a plain script). Files are read when a channel is made (channels are cached by their callers),
so renewed certificates are picked up by channels made afterwards. A file that cannot be read
raises :class:`TlsConfigError`, whose message names the setting and the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

__all__ = [
    "TLS_SCHEME",
    "ClientTls",
    "TlsConfigError",
    "client_tls",
    "create_aio_channel",
    "create_channel",
    "explain",
    "server_credentials",
    "split_address",
    "tls_address",
]

#: The prefix of an address that is dialled with TLS.
TLS_SCHEME = "grpcs://"


class TlsConfigError(ValueError):
    """A TLS setting names a file that cannot be read, or a certificate without its key."""


def split_address(address: str) -> tuple[str, bool]:
    """``("host:port", True)`` for ``grpcs://host:port``, ``(address, False)`` otherwise."""
    if address.startswith(TLS_SCHEME):
        return address[len(TLS_SCHEME) :], True
    return address, False


def tls_address(host_port: str) -> str:
    """The advertised form of a TLS endpoint: ``grpcs://host:port``."""
    return TLS_SCHEME + host_port


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsConfigError(f"{what}: cannot read {path!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ClientTls:
    """How a client dials TLS endpoints. ``ca_file`` None: gRPC's default roots."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: Dial bare ``host:port`` addresses with TLS too (not only ``grpcs://`` ones).
    all_addresses: bool = False
    #: Names used in error messages (the settings or flags the files came from).
    names: tuple[str, str, str] = (
        "CONTROLPLANE_GRPC_TLS_CA",
        "CONTROLPLANE_GRPC_TLS_CERT",
        "CONTROLPLANE_GRPC_TLS_KEY",
    )

    def problems(self) -> list[str]:
        """What is wrong with the configuration (unreadable files, half a key pair); [] if fine."""
        found = []
        if bool(self.cert_file) != bool(self.key_file):
            found.append(f"{self.names[1]} and {self.names[2]} must be set together (client certificate and its key)")
        for path, name in zip((self.ca_file, self.cert_file, self.key_file), self.names, strict=True):
            if path:
                try:
                    _read(path, name)
                except TlsConfigError as exc:
                    found.append(str(exc))
        return found

    def credentials(self) -> grpc.ChannelCredentials:
        problems = self.problems()
        if problems:
            raise TlsConfigError("; ".join(problems))
        root = _read(self.ca_file, self.names[0]) if self.ca_file else None
        if self.cert_file:
            return grpc.ssl_channel_credentials(
                root_certificates=root,
                private_key=_read(self.key_file, self.names[2]),
                certificate_chain=_read(self.cert_file, self.names[1]),
            )
        return grpc.ssl_channel_credentials(root_certificates=root)


def _setting(name: str):
    """Django's setting ``name`` when Django is configured, else the environment variable of the
    same (CONTROLPLANE_-prefixed) name, else None."""
    try:
        from django.conf import settings
    except ImportError:
        settings = None
    if settings is not None and settings.configured:
        return getattr(settings, name)
    return os.environ.get(f"CONTROLPLANE_{name}") or None


def client_tls() -> ClientTls:
    """This process's client TLS configuration (the control plane's settings)."""
    everything = _setting("GRPC_TLS")
    if isinstance(everything, str):
        everything = everything.strip().lower() in {"1", "true", "yes", "on"}
    return ClientTls(
        ca_file=_setting("GRPC_TLS_CA") or None,
        cert_file=_setting("GRPC_TLS_CERT") or None,
        key_file=_setting("GRPC_TLS_KEY") or None,
        all_addresses=bool(everything),
    )


def _target(address: str, tls: ClientTls | None) -> tuple[str, ClientTls | None]:
    """(gRPC target, the TLS to dial it with or None for plaintext)."""
    target, wants_tls = split_address(address)
    config = tls if tls is not None else client_tls()
    return target, config if (wants_tls or config.all_addresses) else None


def explain(address: str, detail: str, tls: ClientTls | None = None) -> str:
    """``detail`` of a failed call to ``address``, with the likely cause added where gRPC's own
    words do not say it: a server that requires a client certificate closes the connection
    after the handshake when none is presented, which gRPC reports as "Socket closed"."""
    config = _target(address, tls)[1] if address else None
    if config is not None and not config.cert_file and "Socket closed" in detail:
        return (
            f"{detail} (TLS: no client certificate was presented; a server that requires one, such as a "
            f"worker started with --tls-client-ca, closes the connection: set {config.names[1]} and "
            f"{config.names[2]})"
        )
    return detail


def create_channel(address: str, options: Sequence[tuple] = (), *, tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to ``address``; ``tls`` None = :func:`client_tls`."""
    target, config = _target(address, tls)
    if config is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, config.credentials(), options=list(options))


def create_aio_channel(address: str, options: Sequence[tuple] = (), *, tls: ClientTls | None = None) -> aio.Channel:
    """An asyncio channel to ``address`` (the gateway's); same rules as :func:`create_channel`."""
    target, config = _target(address, tls)
    if config is None:
        return aio.insecure_channel(target, options=list(options))
    return aio.secure_channel(target, config.credentials(), options=list(options))


def server_credentials(
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
    *,
    names: Sequence[str] = ("cert", "key", "client CA"),
) -> grpc.ServerCredentials:
    """Credentials of a TLS server (the worker service, a TLS backend). With ``client_ca_file``,
    every client must present a certificate signed by it (mutual TLS)."""
    pair = [(_read(key_file, names[1]), _read(cert_file, names[0]))]
    if client_ca_file:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(client_ca_file, names[2]), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)
