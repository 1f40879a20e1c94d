"""The gRPC core configuration of the gateway process, applied before grpc is first imported.

gRPC reads ``GRPC_EXPERIMENTS`` once, when its core starts. By default grpcio's clients read
their sockets on EventEngine threads and hand every completed read to the caller's thread:
for a stream of one small message per token, that is a thread hop and two context switches per
token on top of grpc.aio's own hand-over to the event loop. With the ``event_engine_client``
experiment off, the thread waiting for a call's completion reads the socket itself: a bare
``grpc.aio`` reader spends about half the CPU per token, the gateway about a fifth less
(bench/RESULTS.md, "Gateway streaming, session 7").

Only the gateway process is configured (``manage.py gateway`` and ``gateway.asgi``); an
operator's own ``GRPC_EXPERIMENTS`` is kept as it is. Importing this module imports nothing of
grpc.
"""

from __future__ import annotations

import os

GATEWAY_GRPC_EXPERIMENTS = "-event_engine_client"


def configure() -> None:
    """Set the gateway's ``GRPC_EXPERIMENTS`` unless the environment already has one; call it
    before anything imports grpc (it has no effect afterwards)."""
    os.environ.setdefault("GRPC_EXPERIMENTS", GATEWAY_GRPC_EXPERIMENTS)
