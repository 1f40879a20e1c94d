"""API keys: how frontends and operators authenticate to the REST API.

A key is shown once, at creation (``manage.py create_api_key``); only its sha256 is stored.
Keys look like ``cpk_<random>``; the first characters (``prefix``) are kept in clear so a
listing can say which key is which, and so that authentication finds the candidate row by an
indexed lookup before comparing hashes in constant time.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.tokens import hash_token, new_token, token_matches

KEY_PREFIX = "cpk_"
# "cpk_" plus 8 random characters: about 48 bits, enough to tell keys apart in a listing
# while leaving over 200 secret bits.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 8
# last_used_at is informational; refreshing it at most this often keeps reads from writing.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class _VerifiedKeys:
    """Per-process cache of verified API keys: sha256 of the token -> the key's column values,
    fresh for ``API_KEY_CACHE_SECONDS`` (monotonic clock). Only keys that verified are kept;
    a wrong token always reaches the database. ``revoke`` and ``rename`` in this process drop
    the key's entries at once (and bump ``generation``, so that a verification whose read
    began before the revocation cannot store its now-stale answer); another process's entry
    lives out its TTL, which therefore bounds how long a revoked key keeps working there."""

    MAX_ENTRIES = 10_000

    def __init__(self):
        self.entries: dict[str, tuple[float, tuple]] = {}
        self.generation = 0
        self.lock = threading.Lock()

    def get(self, digest: str) -> tuple | None:
        entry = self.entries.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, values: tuple, ttl: float, generation: int) -> None:
        with self.lock:
            if generation != self.generation:
                return  # a revocation or rename happened during the read: do not keep it
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            self.entries[digest] = (time.monotonic() + ttl, values)

    def forget(self, key_id) -> None:
        with self.lock:
            self.generation += 1
            for digest in [d for d, (_, values) in self.entries.items() if values[0] == key_id]:
                del self.entries[digest]

    def clear(self) -> None:
        with self.lock:
            self.generation += 1
            self.entries.clear()


verified_keys = _VerifiedKeys()


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        """Keys that are not revoked."""
        return self.filter(revoked_at__isnull=True)


class ApiKeyManager(models.Manager.from_queryset(ApiKeyQuerySet)):
    def create_key(self, name: str, role: str) -> tuple[ApiKey, str]:
        """Create a key; returns ``(api_key, plaintext)``. The plaintext is never stored, so
        this is the only moment it can be shown. Raises ValueError for an empty name or an
        unknown role. Idiom: insert guarded by a unique constraint (``key_hash``; a collision
        of 256-bit random tokens would be refused, never stored twice)."""
        if not name or not name.strip():
            raise ValueError("API key name must not be empty")
        if role not in self.model.Role.values:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(self.model.Role.values)}")
        plaintext = new_token(KEY_PREFIX)
        key = self.create(
            name=name.strip(),
            role=role,
            prefix=plaintext[:DISPLAY_PREFIX_LENGTH],
            key_hash=hash_token(plaintext),
        )
        return key, plaintext

    def authenticate(self, token: str, *, now: datetime | None = None) -> ApiKey | None:
        """The active key whose plaintext is ``token``, or None (unknown, malformed, revoked).

        Candidates are found by their display prefix (indexed), then the sha256 of the presented
        token is compared with each candidate's hash in constant time. A successful use stamps
        ``last_used_at`` (``touch``) when the row read says it is older than
        ``LAST_USED_RESOLUTION``. Idiom: read, then a conditional update (``touch``).
        """
        if not token or not token.startswith(KEY_PREFIX) or len(token) <= DISPLAY_PREFIX_LENGTH:
            return None
        now = now or timezone.now()
        for key in self.active().filter(prefix=token[:DISPLAY_PREFIX_LENGTH]):
            if token_matches(token, key.key_hash):
                if (key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION) and self.touch(
                    key.pk, now=now
                ):
                    key.last_used_at = now
                return key
        return None

    def verify(self, token: str) -> ApiKey | None:
        """``authenticate`` through the per-process cache of verified keys (``verified_keys``):
        a key verified less than ``API_KEY_CACHE_SECONDS`` ago in this process is answered
        without a database read. Revocation: immediate in the revoking process; in any other,
        within ``API_KEY_CACHE_SECONDS`` (docs/security.md). ``last_used_at`` is still written
        at most once per ``LAST_USED_RESOLUTION`` (by the reads that refresh the cache). The
        answer is a new instance each call (callers may not share one across threads). Idiom:
        as ``authenticate`` (read, then a conditional update), at most once per TTL."""
        ttl = float(settings.API_KEY_CACHE_SECONDS)
        if ttl <= 0 or not token or not token.startswith(KEY_PREFIX):
            return self.authenticate(token)
        digest = hash_token(token)
        values = verified_keys.get(digest)
        if values is not None:
            return self.model.from_db(self.db, _key_attnames, values)
        generation = verified_keys.generation
        key = self.authenticate(token)
        if key is not None:
            verified_keys.put(digest, tuple(getattr(key, name) for name in _key_attnames), ttl, generation)
        return key

    def verified_role(self, token: str) -> str | None:
        """The role of the key ``verify`` answers for ``token`` (None: no such key), without
        building the key when this process's cache holds it (the warm route's lean path asks
        for nothing else). Idiom: as ``verify`` (it writes only through it, when the key is not
        cached: read, then a conditional update)."""
        values = _cached_values(token)
        if values is not None:
            return values[_ROLE_INDEX]
        key = self.verify(token)
        return None if key is None else key.role

    def cached(self, token: str) -> ApiKey | None:
        """The key ``verify`` would answer from this process's cache of verified keys, without
        a database read or any database access (an event loop may call it); None when the token
        is not cached there (never verified in this process, expired, or no key at all): ask
        ``verify``."""
        values = _cached_values(token)
        return None if values is None else self.model.from_db(self.db, _key_attnames, values)

    def touch(self, key_id, *, now: datetime | None = None) -> bool:
        """Stamp ``last_used_at`` unless it was stamped within ``LAST_USED_RESOLUTION``.
        Idiom: conditional update (``WHERE last_used_at IS NULL OR < now - resolution``), so
        concurrent uses write it once. Returns True when the row was written."""
        now = now or timezone.now()
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
        return self.filter(stale, pk=key_id).update(last_used_at=now) == 1

    def revoke(self, key_id, *, now: datetime | None = None) -> bool:
        """Revoke a key from now on. Idiom: conditional update (``WHERE revoked_at IS NULL``);
        False when it already was revoked (or does not exist). The row stays as the record."""
        revoked = self.filter(pk=key_id, revoked_at__isnull=True).update(revoked_at=now or timezone.now()) == 1
        verified_keys.forget(key_id)
        return revoked

    def rename(self, key_id, name: str) -> bool:
        """Change a key's display name (role, hash and history stay). Idiom: single-column
        update by primary key; False for an unknown key. Raises ValueError for an empty name."""
        if not name or not name.strip():
            raise ValueError("API key name must not be empty")
        renamed = self.filter(pk=key_id).update(name=name.strip()) == 1
        verified_keys.forget(key_id)
        return renamed


class ApiKey(models.Model):
    """A hashed bearer credential with a role: ``frontend`` (route, load info, replica reports)
    or ``operator`` (everything a frontend may do, plus fleet administration)."""

    class Role(models.TextChoices):
        FRONTEND = "frontend", "frontend"
        OPERATOR = "operator", "operator"

    name = models.CharField(max_length=100, help_text="who or what uses this key")
    role = models.CharField(max_length=16, choices=Role.choices)
    prefix = models.CharField(max_length=16, db_index=True, editable=False, help_text="first characters, for display")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyManager()

    class Meta:
        ordering = ["name", "created_at"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.role}, {self.prefix}...)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoke(self, *, now: datetime | None = None) -> bool:
        """``ApiKey.objects.revoke`` for this key, keeping this instance in step."""
        now = now or timezone.now()
        revoked = type(self).objects.revoke(self.pk, now=now)
        if revoked:
            self.revoked_at = now
        return revoked


# Column order of ApiKey.from_db for the cached values (id first: _VerifiedKeys.forget).
_key_attnames = tuple(field.attname for field in ApiKey._meta.concrete_fields)
_ROLE_INDEX = _key_attnames.index("role")


def _cached_values(token: str) -> tuple | None:
    """The cached column values (``_key_attnames``) of the key verified for ``token`` in this
    process, or None (the cache is off, the token cannot be a key, or it is not cached)."""
    if float(settings.API_KEY_CACHE_SECONDS) <= 0 or not token or not token.startswith(KEY_PREFIX):
        return None
    return verified_keys.get(hash_token(token))
