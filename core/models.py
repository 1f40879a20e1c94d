"""API keys: how frontends and operators authenticate to the REST API.

A key is shown once, at creation (``manage.py create_api_key``); only its sha256 is stored.
Keys look like ``cpk_<random>``; the first characters (``prefix``) are kept in clear so a
listing can say which key is which, and so that authentication finds the candidate row by an
indexed lookup before comparing hashes in constant time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        """Keys that are not revoked."""
        return self.filter(revoked_at__isnull=True)


class ApiKeyManager(models.Manager.from_queryset(ApiKeyQuerySet)):
    def create_key(self, name: str, role: str) -> tuple[ApiKey, str]:
        """Create a key; returns ``(api_key, plaintext)``. The plaintext is never stored, so
        this is the only moment it can be shown. Raises ValueError for an empty name or an
        unknown role."""
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
        ``last_used_at`` with a conditional update at most once per ``LAST_USED_RESOLUTION``.
        """
        if not token or not token.startswith(KEY_PREFIX) or len(token) <= DISPLAY_PREFIX_LENGTH:
            return None
        for key in self.active().filter(prefix=token[:DISPLAY_PREFIX_LENGTH]):
            if token_matches(token, key.key_hash):
                self.touch(key, now=now)
                return key
        return None

    def touch(self, key: ApiKey, *, now: datetime | None = None) -> bool:
        """Stamp ``key.last_used_at`` unless it was stamped within ``LAST_USED_RESOLUTION``.
        Idiom: conditional update by id (``WHERE last_used_at IS NULL OR last_used_at <
        now - resolution``), so concurrent uses write at most once. Returns True when the row
        was written (``key`` is updated in memory too)."""
        now = now or timezone.now()
        written = (
            self.filter(pk=key.pk)
            .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION))
            .update(last_used_at=now)
        )
        if written:
            key.last_used_at = now
        return written == 1

    def revoke(self, key: ApiKey, *, now: datetime | None = None) -> bool:
        """Revoke ``key`` from ``now`` on. Idiom: conditional update ``WHERE revoked_at IS
        NULL``; False when it already was revoked (``key`` is updated in memory on success)."""
        now = now or timezone.now()
        revoked = self.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now) == 1
        if revoked:
            key.revoked_at = now
        return revoked


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

    def touch(self, *, now: datetime | None = None) -> bool:
        """Stamp ``last_used_at`` (``ApiKey.objects.touch``); True when the row was written."""
        return type(self).objects.touch(self, now=now)

    def revoke(self, *, now: datetime | None = None) -> bool:
        """Revoke this key from now on (``ApiKey.objects.revoke``). False when it already was."""
        return type(self).objects.revoke(self, now=now)
