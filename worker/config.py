"""The worker's configuration and the parsers for its command-line values."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field

#: The address prefix of a TLS endpoint (proto/tls.py; repeated here so that this module
#: imports without grpc).
TLS_SCHEME = "grpcs://"

GPU_VENDORS = ("nvidia", "amd", "intel", "vulkan", "unknown")

#: The built-in backend, always available as backend_type ``echo``.
ECHO_BACKEND = "echo"


def echo_command() -> list[str]:
    return [sys.executable, "-m", "worker.backends.echo"]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """``"25769803776"``, ``"24GiB"``, ``"24GB"``, ``"512M"`` -> bytes (``Gi`` binary, ``G`` decimal)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a byte size: {text!r}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit else 0
    return int(float(number) * base**power)


def parse_labels(values: list[str]) -> dict[str, str]:
    """``["gpu=a100,zone=eu", "team=ml"]`` -> a dict; raises ValueError on an entry without ``=``."""
    labels: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"label {item!r} is not key=value")
            labels[key.strip()] = val.strip()
    return labels


def parse_backends(values: list[str]) -> dict[str, list[str]]:
    """``["llama-cpp=/opt/llama --threads 4"]`` -> ``{"llama-cpp": [...argv]}``, echo included.

    A user entry named ``echo`` overrides the built-in one.
    """
    backends = {ECHO_BACKEND: echo_command()}
    for value in values:
        name, sep, command = value.partition("=")
        argv = shlex.split(command)
        if not sep or not name.strip() or not argv:
            raise ValueError(f"backend {value!r} is not NAME=COMMAND")
        backends[name.strip()] = argv
    return backends


def parse_port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"port range {text!r} is not LOW-HIGH") from None
    if not (0 < lo <= hi < 65536):
        raise ValueError(f"port range {text!r} is not within 1-65535 with LOW <= HIGH")
    return lo, hi


@dataclass
class WorkerConfig:
    """Everything ``python -m worker run`` was told. Times are seconds, memory bytes."""

    registration_token: str
    name: str
    advertise_host: str = "127.0.0.1"
    port: int = 50051
    control_plane: str | None = None
    #: Host the worker service and its backends bind to; defaults to ``advertise_host``.
    bind_host: str | None = None
    total_vram: int | None = None
    total_ram: int | None = None
    gpu_vendor: str = "unknown"
    backends: dict[str, list[str]] = field(default_factory=lambda: parse_backends([]))
    labels: dict[str, str] = field(default_factory=dict)
    max_replicas_per_model: int = 1
    heartbeat_interval: float = 10.0
    backend_port_range: tuple[int, int] = (50100, 50199)
    backend_health_timeout: float = 30.0
    backend_stop_grace: float = 5.0
    drain_timeout: float = 30.0
    drain_poll_interval: float = 1.0
    register: bool = True
    register_tries: int = 10
    register_base_delay: float = 2.0
    register_max_delay: float = 30.0
    http_timeout: float = 10.0
    #: Where the node token is kept between runs (re-registering an existing name needs it);
    #: None keeps it in memory only.
    state_dir: str | None = None
    #: Only without registration (``--no-register``): the token the worker service accepts and
    #: the one its backends require. A registered worker gets both from the control plane.
    service_token: str | None = None
    backend_token: str | None = None
    #: TLS (docs/tls.md): the certificate and key the worker service (and its TLS-capable
    #: backends) serve; with them the worker advertises ``grpcs://HOST:PORT``.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Mutual TLS: callers must present a certificate signed by this CA (PEM).
    tls_client_ca: str | None = None
    #: CA the worker verifies its TLS backends with (and an https control plane, beside the
    #: system's roots); None: gRPC's and Python's default roots.
    tls_ca: str | None = None
    #: backend_type names, besides the built-in echo, that serve TLS from the BACKEND_TLS_*
    #: environment (LocalAI's backends cannot: they stay plaintext).
    tls_backends: frozenset[str] = frozenset()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def address(self) -> str:
        """The worker service address the control plane dials: ``HOST:PORT``, or
        ``grpcs://HOST:PORT`` when the service serves TLS."""
        plain = join_host_port(self.advertise_host, self.port)
        return TLS_SCHEME + plain if self.tls else plain

    @property
    def listen_host(self) -> str:
        return self.bind_host or self.advertise_host


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
