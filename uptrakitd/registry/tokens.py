"""Bearer secrets (enrollment tokens, enrollment secrets, admin tokens): made here, stored as hashes."""
from __future__ import annotations

import hashlib
import secrets


def token_hash(token: str) -> str:
    """SHA-256 hex of a high-entropy token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(prefix: str) -> str:
    """A fresh random token with a recognizable prefix."""
    return prefix + secrets.token_urlsafe(32)
