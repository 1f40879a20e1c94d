"""The control plane's gRPC channels, one per ``(os.getpid(), address)``, made on first use by
:mod:`proto.tls` (TLS for ``grpcs://`` addresses).

Never at import: django-q2 forks its workers, and a gRPC channel inherited across ``fork()`` is
unusable. An entry made by another pid is ignored (not closed: its sockets belong to the
parent). Channels use a local subchannel pool, because gRPC otherwise shares connections
between channels process-wide and a fresh channel in a forked child would pick up the parent's
socket. ``proto.client`` re-exports the three functions.
"""

from __future__ import annotations

import os
import threading

import grpc

from proto import tls

_CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # no connection sharing across channels/forks
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),  # a restarted backend is seen within seconds
    ("grpc.client_idle_timeout_ms", 60_000),  # stop reconnecting to addresses nobody calls
    ("grpc.max_receive_message_length", 50 * 1024 * 1024),  # as LocalAI's client
    ("grpc.max_send_message_length", 50 * 1024 * 1024),
)

_channels: dict[tuple[int, str], grpc.Channel] = {}
_channels_lock = threading.Lock()


def get_channel(address: str) -> grpc.Channel:
    """The channel for ``address`` owned by this process, created on first use. Raises
    :class:`proto.tls.TlsConfigError` when a TLS setting names a file that cannot be read."""
    key = (os.getpid(), address)
    with _channels_lock:
        channel = _channels.get(key)
        if channel is None:
            channel = tls.create_channel(address, _CHANNEL_OPTIONS)
            _channels[key] = channel
        return channel


def close_channel(address: str) -> None:
    """Close and forget this process's channel to ``address`` (e.g. its replica was removed)."""
    with _channels_lock:
        channel = _channels.pop((os.getpid(), address), None)
    if channel is not None:
        channel.close()


def close_all_channels() -> None:
    """Close this process's channels and forget every entry (for tests and shutdown).

    Entries created by another pid (inherited across fork) are dropped without closing.
    """
    pid = os.getpid()
    with _channels_lock:
        owned = [ch for (owner, _), ch in _channels.items() if owner == pid]
        _channels.clear()
    for channel in owned:
        channel.close()
