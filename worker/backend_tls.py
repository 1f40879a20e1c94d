"""TLS of the worker's backend processes (docs/tls.md).

A worker that serves TLS hands its certificate and key (and, for mutual TLS, its client CA) to
the backends that can serve TLS, through the ``BACKEND_TLS_*`` environment: the built-in echo
backend, and every ``--tls-backend``. LocalAI's backends cannot serve TLS and get none of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

from proto import tls
from worker.config import ECHO_BACKEND, echo_command

#: The environment a TLS-capable backend serves TLS from (the echo backend reads it).
BACKEND_TLS_ENV = ("BACKEND_TLS_CERT", "BACKEND_TLS_KEY", "BACKEND_TLS_CLIENT_CA")
_PLAINTEXT = tls.ClientTls()


@dataclass(frozen=True)
class BackendTls:
    """TLS of a worker's backends: the worker's own certificate and key (and client CA for
    mutual TLS), served by the backend types in ``backend_types``; ``ca_file`` is what the
    worker verifies them with. Other backend types (LocalAI's: they cannot serve TLS) stay
    plaintext."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    ca_file: str | None
    backend_types: frozenset[str]

    @classmethod
    def from_config(cls, config) -> BackendTls | None:
        if not config.tls:
            return None
        types = set(config.tls_backends)
        if config.backends.get(ECHO_BACKEND) == echo_command():  # the built-in echo serves TLS
            types.add(ECHO_BACKEND)
        return cls(
            cert_file=os.path.abspath(config.tls_cert),
            key_file=os.path.abspath(config.tls_key),
            client_ca_file=os.path.abspath(config.tls_client_ca) if config.tls_client_ca else None,
            ca_file=config.tls_ca,
            backend_types=frozenset(types),
        )

    def environment(self) -> dict[str, str]:
        paths = (self.cert_file, self.key_file, self.client_ca_file)
        return {name: path for name, path in zip(BACKEND_TLS_ENV, paths, strict=True) if path}

    def client(self) -> tls.ClientTls:
        """How the worker dials its TLS backends: verifying them against ``ca_file`` and, when
        they require client certificates, presenting its own certificate."""
        mutual = bool(self.client_ca_file)
        return tls.ClientTls(
            ca_file=self.ca_file,
            cert_file=self.cert_file if mutual else None,
            key_file=self.key_file if mutual else None,
            names=("--tls-ca", "--tls-cert", "--tls-key"),
        )


def backend_channel(address: str, backend_tls: BackendTls | None, advertise_host: str) -> grpc.Channel:
    """A channel for the worker's own call (Health, Status, Free) to its backend at ``address``
    (``host:port``), plaintext when ``backend_tls`` is None. A TLS backend is verified under the
    advertised host's name, which its certificate carries, also when it is dialled on loopback."""
    if backend_tls is None:
        return tls.create_channel(address, tls=_PLAINTEXT)
    return tls.create_channel(
        tls.tls_address(address),
        [("grpc.ssl_target_name_override", advertise_host.strip("[]"))],
        tls=backend_tls.client(),
    )
