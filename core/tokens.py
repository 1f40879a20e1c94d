"""Secrets handed to callers: generated once, stored only as a hash, compared in constant time.

Tokens are 256-bit random values, so a fast hash (sha256) is enough: there is nothing to
brute-force that a slow password hash would protect.
"""

import hashlib
import hmac
import secrets


def new_token(prefix: str = "") -> str:
    """A fresh random token; ``prefix`` makes leaked tokens recognisable (e.g. ``cpk_``)."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token against a stored hash."""
    if not token or not stored_hash:
        return False
    return hmac.compare_digest(hash_token(token), stored_hash)


def secret_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of two plaintext secrets (the fleet registration token)."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))
