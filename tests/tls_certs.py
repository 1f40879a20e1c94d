"""Throwaway certificate authorities for the TLS tests, made with the ``openssl`` command line.

Each test makes its own CA in its temporary directory (EC P-256 keys, valid for a day) and
issues leaf certificates from it; nothing is shared between tests or kept afterwards. Leaves
carry both ``serverAuth`` and ``clientAuth``, as a worker's certificate does when the worker
presents it to its own backends under mutual TLS (docs/tls.md).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Leaf:
    cert: str
    key: str


@dataclass(frozen=True)
class Ca:
    cert: str
    key: str
    directory: Path

    def issue(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Leaf:
        """A certificate for ``hosts`` (IP addresses and DNS names) signed by this CA."""
        stem = self.directory / name
        subject_alt_names = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
        extensions = stem.with_suffix(".ext")
        extensions.write_text(
            f"subjectAltName={subject_alt_names}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        key, csr, cert = stem.with_suffix(".key"), stem.with_suffix(".csr"), stem.with_suffix(".pem")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                 "-out", cert, "-days", "1", "-sha256", "-extfile", extensions)
        return Leaf(cert=str(cert), key=str(key))


def make_ca(directory: Path, name: str = "test-ca") -> Ca:
    """A new self-signed CA in ``directory / name``."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command (Debian package openssl)")
    home = directory / name
    home.mkdir(parents=True)
    key, cert = home / "ca.key", home / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "1", "-sha256", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Ca(cert=str(cert), key=str(key), directory=home)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
