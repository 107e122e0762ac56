"""Enrollment tokens and admin tokens (SPEC §6): plaintext shown once."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks

from uptrakitd.registry.admin_tokens import ROLES, AdminTokenRegistry
from uptrakitd.registry.enrollment import DEFAULT_EXPIRES_IN, DEFAULT_MAX_USES, EnrollmentTokens
from ...errors import BadRequest, NotFound
from ...printable import has_control
from ..router import Route, int_field, iso, json_body, route
from .services import KINDS, UUID
from .audit import said_by


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or has_control(name):
        raise BadRequest("name: required, a string of up to 200 characters without control characters",
                         "invalid_field")
    return name.strip()


def _times(record: dict[str, Any]) -> dict[str, Any]:
    return dict(record, **{k: iso(record.get(k)) for k in ("expires_at", "created_at", "revoked_at") if k in record})


class TokenRoutes:
    """Translate HTTP to the enrollment-token store and the admin-token registry."""

    def __init__(self, enrollment: EnrollmentTokens, admin_tokens: AdminTokenRegistry) -> None:
        self.enrollment = enrollment
        self.admin_tokens = admin_tokens

    def routes(self) -> list[Route]:
        return [
            route("POST", r"/api/v1/enrollment-tokens", self.create_enrollment_token, admin=True),
            route("GET", r"/api/v1/enrollment-tokens", self.list_enrollment_tokens, admin=True),
            route("DELETE", rf"/api/v1/enrollment-tokens/(?P<token_id>{UUID})", self.revoke_enrollment_token,
                  admin=True),
            route("POST", r"/api/v1/admin-tokens", self.create_admin_token, admin=True),
            route("GET", r"/api/v1/admin-tokens", self.list_admin_tokens, admin=True),
            route("DELETE", rf"/api/v1/admin-tokens/(?P<token_id>{UUID})", self.revoke_admin_token, admin=True),
        ]

    @inlineCallbacks
    def create_enrollment_token(self, request: Any) -> Any:
        body = json_body(request, {"name", "kind", "max_uses", "expires_in_seconds", "auto_approve"})
        name = _name(body)
        kind = body.get("kind")
        if kind is not None and kind not in KINDS:
            raise BadRequest("kind: must be agent or mqtt (or omitted for both)", "invalid_field")
        # absent: the safe default (one use, 24 h); null: no limit, said on purpose
        max_uses = int_field(body, "max_uses", 1, 1_000_000) if "max_uses" in body else DEFAULT_MAX_USES
        expires = int_field(body, "expires_in_seconds", 1, 10 * 365 * 86400) if "expires_in_seconds" in body \
            else DEFAULT_EXPIRES_IN
        auto_approve = body.get("auto_approve", False)
        if not isinstance(auto_approve, bool):
            raise BadRequest("auto_approve: must be true or false", "invalid_field")
        record = yield self.enrollment.create(name, kind, max_uses, expires, auto_approve,
                                               said=said_by(request))
        return 201, _times(record)

    @inlineCallbacks
    def list_enrollment_tokens(self, request: Any) -> Any:
        rows = yield self.enrollment.list()
        return {"tokens": [_times(r) for r in rows]}

    @inlineCallbacks
    def revoke_enrollment_token(self, request: Any, token_id: str) -> Any:
        done = yield self.enrollment.revoke(token_id.lower(), said_by(request))
        if not done:
            raise NotFound("no such active enrollment token", "token_not_found")
        return {"id": token_id.lower(), "revoked": True}

    @inlineCallbacks
    def create_admin_token(self, request: Any) -> Any:
        body = json_body(request, {"name", "permissions"})
        name = _name(body)
        permissions = body.get("permissions", ["admin"])
        if not isinstance(permissions, list) or not all(p in ROLES for p in permissions):
            raise BadRequest("permissions: a list of 'admin' and/or 'read'", "invalid_field")
        record = yield self.admin_tokens.create(name, permissions, said_by(request))
        return 201, _times(record)

    @inlineCallbacks
    def list_admin_tokens(self, request: Any) -> Any:
        rows = yield self.admin_tokens.list()
        return {"tokens": [_times(r) for r in rows]}

    @inlineCallbacks
    def revoke_admin_token(self, request: Any, token_id: str) -> Any:
        done = yield self.admin_tokens.revoke(token_id.lower(), said_by(request))
        if not done:
            raise NotFound("no such active admin token", "token_not_found")
        return {"id": token_id.lower(), "revoked": True}
