"""Admin API tokens and their roles: `admin` may do everything, `read` may use the admin GET routes."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from uptrakitd.audit import BY_SYSTEM, AuditTrail, Said, audited
from uptrakitd.store import Store, tokens as stored
from uptrakitd.registry.tokens import new_token, token_hash

log = Logger()
ROLES = ("admin", "read")


class AdminTokenRegistry:
    """Owns the admin tokens: hashes and permissions in memory, in step with the store."""

    def __init__(self, store: Store, active: dict[str, list[str]], names: dict[str, tuple[str, str]] | None = None,
                 audit: AuditTrail | None = None) -> None:
        self.store = store
        self.audit = audit
        self._permissions = dict(active)  # token hash -> permissions
        self._names = dict(names or {})   # token hash -> (id, name): who made a change, for the audit trail
        self._seen: set[str] = set()      # hashes this process has seen used (their first use is noted once)

    def describe(self, token: str) -> dict[str, Any] | None:
        """The audit trail's actor for a known token: {kind: admin_token, id, name, role} (None if unknown)."""
        digest = token_hash(token)
        perms = self._permissions.get(digest)
        if perms is None:
            return None
        token_id, name = self._names.get(digest, ("", ""))
        return {"kind": "admin_token", "id": token_id, "name": name, "role": "admin" if "admin" in perms else "read"}

    def check(self, token: str, method: str = "GET") -> bool | None:
        """True: allowed; False: a known token without the permission; None: unknown token."""
        digest = token_hash(token)
        perms = self._permissions.get(digest)
        if perms is None:
            return None
        if digest not in self._seen:
            self._seen.add(digest)
            self._first_use(digest, token)
        return "admin" in perms or ("read" in perms and method in ("GET", "HEAD"))

    def _first_use(self, digest: str, token: str) -> None:
        """The token's first use anywhere is an audit entry (the database says whether this is it)."""
        if self.audit is None:
            return
        actor = self.describe(token) or {}
        audited(self.audit, self.store, stored.mark_first_use, digest, int(time.time()),
                action="admin_token.first_used", obj={"kind": "admin_token", "id": actor.get("id", "")}, details=lambda first: {} if first else None,
                said=Said(actor)).addErrback(
            lambda f: log.warn("audit: an admin token's first use could not be recorded ({error})",
                               error=f.getErrorMessage()))

    @inlineCallbacks
    def create(self, name: str, permissions: list[str], said: Said = BY_SYSTEM) -> Any:
        """A new token; fires with its record including the plaintext `token` (shown once)."""
        token = new_token("upt_admin_")
        token_id, perms, created_at = str(uuid.uuid4()), list(permissions), int(time.time())
        yield audited(self.audit, self.store, stored.insert_admin_token, token_id, name, token_hash(token),
                      json.dumps(perms), created_at, action="admin_token.created",
                      obj={"kind": "admin_token", "id": token_id}, details={"name": name, "permissions": perms},
                      said=said)
        self._permissions[token_hash(token)] = perms
        self._names[token_hash(token)] = (token_id, name)
        return {"id": token_id, "name": name, "permissions": perms, "created_at": created_at, "token": token}

    @inlineCallbacks
    def session(self, token: str) -> Any:
        """Who `token` is: fires with {id, name, permissions, role}, role `admin` or `read` (None if unknown)."""
        row = yield self.store.run(stored.admin_token_by_hash, token_hash(token))
        if row is None:
            return None
        perms = json.loads(row["permissions"])
        return {"id": row["id"], "name": row["name"], "permissions": perms,
                "role": "admin" if "admin" in perms else "read"}

    @inlineCallbacks
    def list(self) -> Any:
        """Every token (without secrets); fires with a list of dicts."""
        rows = yield self.store.run(stored.list_admin_tokens)
        return [dict(row, permissions=json.loads(row["permissions"])) for row in rows]

    @inlineCallbacks
    def reload(self) -> Any:
        """Another controller created or revoked a token: read the active ones again."""
        rows = yield self.store.run(stored.active_admin_tokens)
        self._permissions = {row["token_hash"]: json.loads(row["permissions"]) for row in rows}
        self._names = {row["token_hash"]: (row["id"], row["name"]) for row in rows}

    @inlineCallbacks
    def revoke(self, token_id: str, said: Said = BY_SYSTEM) -> Any:
        """Revoke one token; fires with False when it is unknown or already revoked."""
        digest = yield audited(self.audit, self.store, stored.revoke_admin_token, token_id, int(time.time()),
                               action="admin_token.revoked", obj={"kind": "admin_token", "id": token_id},
                               details=lambda digest: None if digest is None else {}, said=said)
        if digest is None:
            return False
        self._permissions.pop(digest, None)
        return True
