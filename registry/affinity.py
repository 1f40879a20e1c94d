"""Affinity routing: which replica a route call's ``affinity_key`` prefers (pure, no Django).

A key (a session id, or a hash of a prompt prefix computed by a gateway) is mapped to one of a
model's routable replicas by rendezvous (highest-random-weight) hashing: every replica gets the
score ``md5(key | node_id | replica_index)`` and the key's order is the replicas by score,
highest first. Adding or removing a replica moves only the keys whose first choice it is (about
1/n of them); the others keep their replica, so what a replica has cached for a session (its KV
cache, a prompt prefix) keeps being used.

Bounded load (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam 2017):
a replica takes a key only while its ``in_flight`` is below the cap
``ceil(factor x (total in-flight + 1) / replicas) + 1``: ``ROUTE_AFFINITY_LOAD_FACTOR`` times
the model's average in-flight with this request counted, plus one (so that at light load a
replica serving one request still takes its sessions' next turns, and an idle model works). The key goes to the first replica of
its order under the cap, so a spilled key lands on its own second choice, the same one for
every turn of the session while the first stays busy. Some replica is always under the cap:
the least busy one is at or below the average, and the cap is above the average; the router
falls back to least in-flight only when concurrent pickers fill or hold every replica under
the cap at that instant.

The replica's identity in the hash is its slot, ``node_id`` and ``replica_index``, not its row
id: a row re-created for the same slot (a control-plane restart that reaps and restores rows)
keeps its keys. PostgreSQL computes the same scores and cap inside the warm pick statement
(``registry/managers/leases.py``); SQLite's path calls :func:`choose` (tests check that both
agree).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Iterable
from typing import NamedTuple

MAX_KEY_LENGTH = 256


class Candidate(NamedTuple):
    """A routable replica as the preference sees it."""

    pk: object
    node_id: object
    replica_index: int
    in_flight: int


def validate_key(key: str | None) -> str | None:
    """The key to route by: None for no affinity (None or ""). Raises ValueError for a key that
    is not a string, is longer than ``MAX_KEY_LENGTH`` characters or holds a control character
    (PostgreSQL's text cannot even hold NUL)."""
    if key is None or key == "":
        return None
    if not isinstance(key, str):
        raise ValueError("affinity key must be a string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"affinity key must be at most {MAX_KEY_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise ValueError("affinity key must not contain control characters")
    return key


def effective_factor(factor: float) -> float:
    """The load factor used: at least 1 (below 1 no replica might be under the cap)."""
    return max(1.0, float(factor))


def score(key: str, node_id, replica_index: int) -> str:
    """The rendezvous score of a replica for ``key``: a hex md5, compared as a string (higher
    wins). PostgreSQL: ``md5(key || '|' || node_id::text || '|' || replica_index::text)``."""
    return hashlib.md5(f"{key}|{node_id}|{replica_index}".encode()).hexdigest()


def load_cap(in_flights: Iterable[int], factor: float) -> int:
    """The bound: a replica takes a key only while its in-flight is below this.
    ``ceil(factor x (sum + 1) / count) + 1``; 0 without replicas."""
    loads = list(in_flights)
    if not loads:
        return 0
    return math.ceil(effective_factor(factor) * (sum(loads) + 1) / len(loads)) + 1


def preference(key: str, candidates: Iterable[Candidate]) -> list[Candidate]:
    """The key's order of the replicas: highest score first (ties, which md5 never makes in
    practice, by primary key)."""
    return sorted(candidates, key=lambda c: (score(key, c.node_id, c.replica_index), str(c.pk)), reverse=True)


def choose(key: str, candidates: Iterable[Candidate], factor: float) -> Candidate | None:
    """The replica ``key`` goes to: the first of its order whose in-flight is below the cap.
    None only without candidates."""
    candidates = list(candidates)
    cap = load_cap((c.in_flight for c in candidates), factor)
    for candidate in preference(key, candidates):
        if candidate.in_flight < cap:
            return candidate
    return None
