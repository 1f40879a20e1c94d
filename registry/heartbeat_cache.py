"""A web process's memory of node tokens and of heartbeats not yet written: the state behind
coalesced heartbeats (``registry/heartbeat_flush.py``, ``registry/api/heartbeat.py``).

* ``node_tokens`` (``NodeTokenCache``): hash of a node token -> the node it authenticated and
  the ``(status, address)`` the database last answered for it. Filled only from a write the
  database confirmed (``Node.objects.heartbeat_with_token`` or a flush's ``heartbeat_batch``
  RETURNING), so only tokens that matched their node's row are ever in it; a token that is
  not finds no entry and goes to the database. Fresh for
  ``CONTROLPLANE_NODE_AUTH_CACHE_SECONDS`` after the last confirmation (monotonic clock).
* ``pending`` (``HeartbeatBuffer``): per node, the heartbeat received and acknowledged but not
  written yet, several heartbeats of one node in one flush window merged into one (the latest
  timestamp; each figure the latest reported).

No model is imported here: the registry verbs that change a node's token, status or existence
(``registry/managers/nodes.py``) call ``forget_node``, which drops the node's entry (and, for
a re-registration, a sign-off or a deletion, its pending heartbeat) in this process at once. Another process's memory is not reached; what
bounds its staleness is said in ``registry/heartbeat_flush.py``.

Concurrency: the web threads and the one flusher thread of the process share these objects;
each method holds the object's lock for a few dictionary operations (no I/O under a lock).
``generation`` (as in ``core.models._VerifiedKeys``) keeps a confirmation whose database round
trip began before a ``forget_node`` from storing what the forgetting made stale.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class KnownToken:
    token_hash: str
    node_id: str
    status: str
    address: str
    fresh_until: float  # time.monotonic()


class NodeTokenCache:
    """Per-process cache of node tokens the database confirmed (module doc)."""

    MAX_ENTRIES = 100_000  # more distinct tokens than that: start over (each refills on a miss)

    def __init__(self):
        self.entries: dict[str, KnownToken] = {}
        self.generation = 0
        self.lock = threading.Lock()

    def get(self, token_hash: str, node_id: str) -> KnownToken | None:
        """The fresh entry of this token hash for this node, or None (go to the database)."""
        entry = self.entries.get(token_hash)
        if entry is None or entry.node_id != node_id or entry.fresh_until <= time.monotonic():
            return None
        # Found by the digest of the presented token; the comparison of the stored digest is
        # constant-time all the same, as every comparison of credentials in the project.
        return entry if hmac.compare_digest(entry.token_hash, token_hash) else None

    def confirm(self, token_hash: str, node_id: str, status: str, address: str, generation: int) -> None:
        """The database just accepted this token for this node and answered ``(status,
        address)``: keep it, unless a ``forget`` happened since ``generation`` was read."""
        ttl = float(settings.CONTROLPLANE_NODE_AUTH_CACHE_SECONDS)
        if ttl <= 0 or not token_hash:
            return
        with self.lock:
            if generation != self.generation:
                return
            if len(self.entries) >= self.MAX_ENTRIES and token_hash not in self.entries:
                self.entries.clear()
            self.entries[token_hash] = KnownToken(token_hash, node_id, status, address, time.monotonic() + ttl)

    def drop(self, token_hash: str) -> None:
        """The database refused this token (a flush wrote nothing for it)."""
        with self.lock:
            self.generation += 1
            self.entries.pop(token_hash, None)

    def forget(self, node_id: str) -> None:
        with self.lock:
            self.generation += 1
            for token_hash in [h for h, entry in self.entries.items() if entry.node_id == node_id]:
                del self.entries[token_hash]

    def clear(self) -> None:
        with self.lock:
            self.generation += 1
            self.entries.clear()


@dataclass
class PendingHeartbeat:
    node_id: str
    token_hash: str
    received_at: object  # an aware datetime: the last_heartbeat to write
    figures: dict  # reported figures by name (only non-None values)


class HeartbeatBuffer:
    """Acknowledged heartbeats not yet written, at most one per node and token (module doc).
    Keyed by the token too: a heartbeat with a token the node no longer holds (which its flush
    will refuse) must not replace one with the node's current token."""

    def __init__(self):
        self.pending: dict[tuple[str, str], PendingHeartbeat] = {}
        self.lock = threading.Lock()

    def add(self, node_id: str, token_hash: str, received_at, figures: dict) -> None:
        reported = {name: value for name, value in figures.items() if value is not None}
        with self.lock:
            self._merge(PendingHeartbeat(node_id, token_hash, received_at, reported))

    def _merge(self, newer: PendingHeartbeat) -> None:
        key = (newer.node_id, newer.token_hash)
        older = self.pending.get(key)
        if older is not None:
            # What writing both in order would leave: the later timestamp, each figure as last reported.
            newer.figures = {**older.figures, **newer.figures}
        self.pending[key] = newer

    def take(self) -> list[PendingHeartbeat]:
        """Everything pending, in node id order; the buffer is empty afterwards."""
        with self.lock:
            taken, self.pending = self.pending, {}
        return sorted(taken.values(), key=lambda heartbeat: (heartbeat.node_id, heartbeat.token_hash))

    def put_back(self, heartbeats: list[PendingHeartbeat]) -> None:
        """A flush failed: its heartbeats wait for the next one, under any that arrived since."""
        with self.lock:
            for older in heartbeats:
                key = (older.node_id, older.token_hash)
                newer = self.pending.pop(key, None)
                self.pending[key] = older
                if newer is not None:
                    self._merge(newer)

    def discard(self, node_id: str) -> None:
        with self.lock:
            for key in [key for key in self.pending if key[0] == node_id]:
                del self.pending[key]

    def __len__(self) -> int:
        return len(self.pending)


node_tokens = NodeTokenCache()
pending = HeartbeatBuffer()


def forget_node(node_id, *, drop_pending: bool = False) -> None:
    """A node's token, status or existence changed in this process: its cached token is
    dropped (its next heartbeat is written with the database's own check of the token, and
    the answer says the new status). ``drop_pending`` (the node re-registered, signed off or
    was deleted) drops its pending heartbeat too: it was sent by the worker before that, and
    written afterwards it would put back a timestamp and figures from before it."""
    node_id = str(node_id)
    node_tokens.forget(node_id)
    if drop_pending:
        pending.discard(node_id)
