"""Services, enrollment tokens and admin tokens (SPEC §6)."""
from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ... import services as services_mod
from ... import tokens
from ...channel import wire
from ...errors import BadRequest, Conflict, NotFound
from ...pki.serials import format_serial
from ..router import Route, int_field, iso, json_body, route

UUID = r"[0-9a-fA-F-]{36}"


class ServiceRoutes:
    """Handlers for services and tokens."""

    def __init__(self, controller: Any) -> None:
        self.c = controller

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/api/v1/services", self.list_services, admin=True),
            route("GET", rf"/api/v1/services/(?P<service_id>{UUID})", self.get_service, admin=True),
            route("PUT", rf"/api/v1/services/(?P<service_id>{UUID})", self.put_service, admin=True),
            route("DELETE", rf"/api/v1/services/(?P<service_id>{UUID})", self.deactivate, admin=True),
            route("POST", rf"/api/v1/services/(?P<service_id>{UUID})/approve", self.approve, admin=True),
            route("POST", rf"/api/v1/services/(?P<service_id>{UUID})/reject", self.reject, admin=True),
            route("POST", r"/api/v1/enrollment-tokens", self.create_enrollment_token, admin=True),
            route("GET", r"/api/v1/enrollment-tokens", self.list_enrollment_tokens, admin=True),
            route("DELETE", rf"/api/v1/enrollment-tokens/(?P<token_id>{UUID})", self.revoke_enrollment_token,
                  admin=True),
            route("POST", r"/api/v1/admin-tokens", self.create_admin_token, admin=True),
            route("GET", r"/api/v1/admin-tokens", self.list_admin_tokens, admin=True),
            route("DELETE", rf"/api/v1/admin-tokens/(?P<token_id>{UUID})", self.revoke_admin_token, admin=True),
        ]

    # -- services ------------------------------------------------------------------------------

    def _describe(self, s: Any) -> dict[str, Any]:
        cert = self.c.pki.authority.current_for(s.id, self.c.pki.clock.seconds())
        return {"id": s.id, "kind": s.kind, "hostname": s.hostname, "friendly_name": s.friendly_name,
                "status": s.status, "capabilities": list(s.capabilities), "ip_address": s.ip_address,
                "proxy_ip": s.proxy_ip, "identity_source": s.identity_source,
                "connected": s.id in self.c.hub.connected, "last_seen_at": iso(s.last_seen_at),
                "created_at": iso(s.created_at), "cert_lifetime_hours": s.cert_lifetime_hours,
                "ping_interval_seconds": s.ping_interval_seconds,
                "certificate": None if cert is None else {"serial": format_serial(cert.serial),
                                                          "not_after": iso(cert.not_after),
                                                          "ca_generation": cert.ca_generation}}

    def _service(self, service_id: str) -> Any:
        try:
            key = str(uuid.UUID(service_id))
        except ValueError:
            raise NotFound("no such service", "service_not_found") from None
        service = self.c.service_records.get(key)
        if service is None:
            raise NotFound("no such service", "service_not_found")
        return service

    def list_services(self, request: Any) -> dict:
        def arg(name: str) -> str | None:
            value = request.args.get(name.encode(), [None])[0]
            return value.decode("utf-8", "replace") if value is not None else None
        kind, status, connected = arg("kind"), arg("status"), arg("connected")
        if kind is not None and kind not in ("agent", "mqtt"):
            raise BadRequest("kind: must be agent or mqtt", "invalid_filter")
        if status is not None and status not in ("pending", "approved", "rejected", "deactivated"):
            raise BadRequest("status: must be pending, approved, rejected or deactivated", "invalid_filter")
        if connected is not None and connected not in ("true", "false"):
            raise BadRequest("connected: must be true or false", "invalid_filter")
        out = []
        for s in sorted(self.c.service_records.values(), key=lambda s: (s.created_at, s.id)):
            if kind and s.kind != kind or status and s.status != status:
                continue
            if connected is not None and (s.id in self.c.hub.connected) != (connected == "true"):
                continue
            out.append(self._describe(s))
        return {"services": out}

    def get_service(self, request: Any, service_id: str) -> dict:
        return self._describe(self._service(service_id))

    @inlineCallbacks
    def put_service(self, request: Any, service_id: str) -> Any:
        service = self._service(service_id)
        body = json_body(request)
        unknown = set(body) - {"cert_lifetime_hours", "ping_interval_seconds", "friendly_name"}
        if unknown:
            raise BadRequest(f"{sorted(unknown)[0]}: not a writable field", "invalid_field")
        changes: dict[str, Any] = {}
        if "cert_lifetime_hours" in body:
            changes["cert_lifetime_hours"] = int_field(body, "cert_lifetime_hours", 1, 730 * 24)
        if "ping_interval_seconds" in body:
            changes["ping_interval_seconds"] = int_field(body, "ping_interval_seconds", 5, 3600)
        if "friendly_name" in body:
            if body["friendly_name"] is not None and (not isinstance(body["friendly_name"], str)
                                                      or len(body["friendly_name"]) > 200):
                raise BadRequest("friendly_name: must be a string of up to 200 characters", "invalid_field")
            changes["friendly_name"] = body["friendly_name"]
        if changes:
            yield self.c.store.run(services_mod.update_fields, service.id, **changes)
            for key, value in changes.items():
                setattr(service, key, value)
        return self._describe(service)

    @inlineCallbacks
    def deactivate(self, request: Any, service_id: str) -> Any:
        service = self._service(service_id)
        if service.status != "deactivated":
            yield self.c.store.run(services_mod.update_fields, service.id, status="deactivated",
                                   enrollment_secret_hash=None)
            service.status, service.enrollment_secret_hash = "deactivated", None
            # close first, so the service learns why ("service deactivated", not "certificate revoked")
            self.c.hub.close_service(service.id, wire.SERVICE_DEACTIVATED)
            for record in list(self.c.pki.authority.by_service.get(service.id, ())):
                if record.revoked_at is None:
                    yield self.c.pki.revoke(record.serial, "cessationOfOperation")
        return self._describe(service)

    @inlineCallbacks
    def _set_status(self, service_id: str, status: str) -> Any:
        service = self._service(service_id)
        if service.status != "pending":
            raise Conflict(f"service is {service.status}, not pending", "not_pending")
        yield self.c.store.run(services_mod.update_fields, service.id, status=status)
        service.status = status
        if status == "rejected":
            self.c.hub.close_service(service.id, wire.SERVICE_NOT_APPROVED)
        return self._describe(service)

    def approve(self, request: Any, service_id: str) -> Any:
        return self._set_status(service_id, "approved")

    def reject(self, request: Any, service_id: str) -> Any:
        return self._set_status(service_id, "rejected")

    # -- tokens --------------------------------------------------------------------------------

    @inlineCallbacks
    def create_enrollment_token(self, request: Any) -> Any:
        body = json_body(request)
        unknown = set(body) - {"name", "kind", "max_uses", "expires_in_seconds", "auto_approve"}
        if unknown:
            raise BadRequest(f"{sorted(unknown)[0]}: unknown field", "invalid_field")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise BadRequest("name: required, a string of up to 200 characters", "invalid_field")
        kind = body.get("kind")
        if kind is not None and kind not in ("agent", "mqtt"):
            raise BadRequest("kind: must be agent or mqtt (or omitted for both)", "invalid_field")
        max_uses = int_field(body, "max_uses", 1, 1_000_000)
        expires = int_field(body, "expires_in_seconds", 1, 10 * 365 * 86400)
        auto_approve = body.get("auto_approve", True)
        if not isinstance(auto_approve, bool):
            raise BadRequest("auto_approve: must be true or false", "invalid_field")
        record = yield self.c.store.run(tokens.create_enrollment_token, name.strip(), kind, max_uses, expires,
                                        auto_approve)
        return 201, self._token_json(record)

    def _token_json(self, record: dict) -> dict:
        out = dict(record)
        for key in ("expires_at", "created_at", "revoked_at"):
            out[key] = iso(out.get(key))
        return out

    @inlineCallbacks
    def list_enrollment_tokens(self, request: Any) -> Any:
        rows = yield self.c.store.run(tokens.list_enrollment_tokens)
        return {"tokens": [self._token_json(r) for r in rows]}

    @inlineCallbacks
    def revoke_enrollment_token(self, request: Any, token_id: str) -> Any:
        done = yield self.c.store.run(tokens.revoke_enrollment_token, token_id.lower())
        if not done:
            raise NotFound("no such active enrollment token", "token_not_found")
        return {"id": token_id.lower(), "revoked": True}

    @inlineCallbacks
    def create_admin_token(self, request: Any) -> Any:
        body = json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise BadRequest("name: required, a string of up to 200 characters", "invalid_field")
        permissions = body.get("permissions", ["admin"])
        if not isinstance(permissions, list) or not all(p in ("admin", "read") for p in permissions):
            raise BadRequest("permissions: a list of 'admin' and/or 'read'", "invalid_field")
        record = yield self.c.store.run(tokens.create_admin_token, name.strip(), permissions)
        self.c.admin_tokens[record.pop("token_hash")] = permissions
        return 201, dict(record, created_at=iso(record["created_at"]))

    @inlineCallbacks
    def list_admin_tokens(self, request: Any) -> Any:
        rows = yield self.c.store.run(tokens.list_admin_tokens)
        return {"tokens": [dict(r, created_at=iso(r["created_at"]), revoked_at=iso(r["revoked_at"])) for r in rows]}

    @inlineCallbacks
    def revoke_admin_token(self, request: Any, token_id: str) -> Any:
        digest = yield self.c.store.run(tokens.revoke_admin_token, token_id.lower())
        if digest is None:
            raise NotFound("no such active admin token", "token_not_found")
        self.c.admin_tokens.pop(digest, None)
        return {"id": token_id.lower(), "revoked": True}
