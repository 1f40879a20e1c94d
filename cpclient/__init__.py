"""A typed client of the control plane's frontend and operator APIs, standard library only,
and the operator CLI (``python -m cpclient``, ``cpclient.cli``).

::

    from cpclient import ControlPlaneClient

    cp = ControlPlaneClient("http://127.0.0.1:8000", api_key="cpk_...")
    with cp.lease("llama-3.1-8b", backend_type="llama-cpp", model_options={"Model": "llama.gguf"}) as lease:
        call_backend(lease.address)          # the lease is released on exit, also on exceptions

See docs/operations.md ("The frontend client", "The operator CLI").
"""

from .client import ControlPlaneClient, Lease, LoadInfo
from .errors import (
    AuthenticationError,
    ConflictError,
    ControlPlaneError,
    DeadlineExceeded,
    LoadFailed,
    NotFoundError,
    PermissionError_,
    TransportError,
    UnavailableError,
    ValidationError,
)

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ControlPlaneClient",
    "ControlPlaneError",
    "DeadlineExceeded",
    "Lease",
    "LoadFailed",
    "LoadInfo",
    "NotFoundError",
    "PermissionError_",
    "TransportError",
    "UnavailableError",
    "ValidationError",
]
