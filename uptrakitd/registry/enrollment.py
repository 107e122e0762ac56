"""Enrollment tokens (SPEC §6): the plaintext shown once, stored hashed, checked when a service enrolls."""
from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet.defer import inlineCallbacks

from uptrakitd.audit import BY_SYSTEM, AuditTrail, Said, audited
from uptrakitd.store import Store, tokens as stored
from uptrakitd.registry.tokens import new_token, token_hash


DEFAULT_MAX_USES = 1
DEFAULT_EXPIRES_IN = 24 * 3600


class TokenRejected(Exception):
    """An enrollment token that cannot be used; the message says why (never the token)."""


def check_enrollment_token(record: dict[str, Any] | None, kind: str, now: float) -> dict[str, Any]:
    """The token's record when it may enroll a service of `kind` now; TokenRejected otherwise."""
    if record is None:
        raise TokenRejected("enrollment token not recognized")
    if record["revoked_at"] is not None:
        raise TokenRejected("enrollment token revoked")
    if record["expires_at"] is not None and record["expires_at"] < now:
        raise TokenRejected("enrollment token expired")
    if record["max_uses"] is not None and record["uses"] >= record["max_uses"]:
        raise TokenRejected("enrollment token used up")
    if record["kind"] is not None and record["kind"] != kind:
        raise TokenRejected(f"enrollment token is for {record['kind']} services")
    return record


def consume_enrollment_token(conn: Any, token: str, kind: str, now: float) -> dict[str, Any]:
    """Store operation: check a presented token and count one use, in the caller's transaction."""
    record = check_enrollment_token(stored.find_enrollment_token(conn, token_hash(token)), kind, now)
    stored.count_enrollment_use(conn, record["id"], int(now))
    return record


class EnrollmentTokens:
    """Create, list and revoke enrollment tokens."""

    def __init__(self, store: Store, audit: AuditTrail | None = None) -> None:
        self.store = store
        self.audit = audit

    @inlineCallbacks
    def create(self, name: str, kind: str | None = None, max_uses: int | None = DEFAULT_MAX_USES,
               expires_in: int | None = DEFAULT_EXPIRES_IN, auto_approve: bool = False, said: Said = BY_SYSTEM) -> Any:
        """A new token; fires with its record plus the plaintext `token` (shown once).

        By default one use within 24 h, and the service waits for approval; None means no limit.
        """
        token = new_token("upt_")
        now = int(time.time())
        token_id = str(uuid.uuid4())
        record = yield audited(self.audit, self.store, stored.insert_enrollment_token, token_id, name, kind,
                               token_hash(token), max_uses, now + expires_in if expires_in else None, auto_approve,
                               now, action="enrollment_token.created", obj={"kind": "enrollment_token", "id": token_id},
                               details={"name": name, "kind": kind, "max_uses": max_uses, "expires_in": expires_in,
                                        "auto_approve": auto_approve}, said=said)
        return dict(record, token=token)

    def list(self) -> Any:
        """Every token (without secrets); fires with a list of dicts."""
        return self.store.run(stored.list_enrollment_tokens)

    def revoke(self, token_id: str, said: Said = BY_SYSTEM) -> Any:
        """Revoke one token; fires with False when it is unknown or already revoked."""
        return audited(self.audit, self.store, stored.revoke_enrollment_token, token_id, int(time.time()),
                       action="enrollment_token.deleted", obj={"kind": "enrollment_token", "id": token_id},
                       details=lambda done: {} if done else None, said=said)
