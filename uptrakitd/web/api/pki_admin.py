"""Admin PKI routes: PKI settings, service-certificate settings, rotation, revocation, certificate list."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ...errors import BadRequest
from ...pki.serials import BadSerial, format_serial, parse_serial
from ..router import Response, Route, int_field, iso, json_body, route


class PkiAdminRoutes:
    """Handlers for the admin side of SPEC §4 and §6."""

    def __init__(self, controller: Any) -> None:
        self.c = controller

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/api/v1/settings/pki", self.pki_settings, admin=True),
            route("PUT", r"/api/v1/settings/service-certificates", self.put_service_certs, admin=True),
            route("POST", r"/api/v1/settings/rotate-ca", self.rotate, admin=True),
            route("POST", r"/api/v1/certificates/(?P<serial>[^/]+)/revoke", self.revoke, admin=True),
            route("GET", r"/api/v1/certificates", self.list_certificates, admin=True),
        ]

    def pki_settings(self, request: Any) -> dict:
        pki = self.c.pki
        now = pki.now()
        def describe(ca: Any) -> dict | None:
            if ca is None:
                return None
            crl = pki.crls.current.get(ca.generation)
            return {"generation": ca.generation, "cn": ca.common_name, "fingerprint": ca.fingerprint,
                    "not_after": ca.not_after.isoformat(), "external": ca.external,
                    "crl_number": crl.number if crl else None,
                    "crl_age_seconds": int((now - crl.this_update).total_seconds()) if crl else None,
                    "crl_entries": crl.entries if crl else None}
        sc = self.c.service_certs
        return {"active_ca": describe(pki.authority.active()), "previous_ca": describe(pki.authority.previous(now)),
                "ca_bundle_hash": pki.authority.bundle_hash(now),
                "service_certificates": {"lifetime_hours": sc.lifetime_hours,
                                         "renewal_window_hours": self.c.renewal_window_hours()},
                "ocsp_validity_seconds": int(pki.ocsp.validity.total_seconds()),
                "crl_validity_seconds": int(pki.crls.validity.total_seconds()),
                "trust_domain": pki.trust_domain, "pki_addr": self.c.network.pki_addr}

    @inlineCallbacks
    def put_service_certs(self, request: Any) -> Any:
        body = json_body(request)
        unknown = set(body) - {"lifetime_hours", "renewal_window_hours"}
        if unknown:
            raise BadRequest(f"{sorted(unknown)[0]}: unknown field", "invalid_field")
        changes: dict[str, Any] = {}
        if "lifetime_hours" in body:
            changes["lifetime_hours"] = int_field(body, "lifetime_hours", 1, 730 * 24, nullable=False)
        if "renewal_window_hours" in body:
            changes["renewal_window_hours"] = int_field(body, "renewal_window_hours", 1, 730 * 24)
        yield self.c.update_service_certs(changes)
        return {"lifetime_hours": self.c.service_certs.lifetime_hours,
                "renewal_window_hours": self.c.renewal_window_hours()}

    @inlineCallbacks
    def rotate(self, request: Any) -> Any:
        result = yield self.c.pki.rotate()
        return {k: v for k, v in result.items() if k != "ca_bundle_pem"}

    @inlineCallbacks
    def revoke(self, request: Any, serial: str) -> Any:
        try:
            number = parse_serial(serial)
        except BadSerial as e:
            raise BadRequest(str(e), "invalid_serial") from None
        body = json_body(request)
        reason = body.get("reason", "unspecified")
        if not isinstance(reason, str):
            raise BadRequest("reason must be a string", "invalid_reason")
        record = yield self.c.pki.revoke(number, reason)
        self.c.metrics.revocations.labels(reason).inc()
        return {"serial": format_serial(record.serial), "revoked": True, "reason": record.reason,
                "revoked_at": iso(record.revoked_at), "service_id": record.service_id}

    def list_certificates(self, request: Any) -> Any:
        wanted = request.args.get(b"service_id", [None])[0]
        authority = self.c.pki.authority
        if wanted:
            records = list(authority.by_service.get(wanted.decode("utf-8", "replace"), ()))
        else:
            records = list(authority.records.values())  # snapshot; formatting 100 000 happens off the reactor
        return self.c.to_thread(_certificates_json, records, int(self.c.pki.clock.seconds()))


def _certificates_json(records: list[Any], now: int) -> Response:
    out = []
    for r in sorted(records, key=lambda r: (r.not_before, r.serial)):
        status = "revoked" if r.revoked_at else ("expired" if r.not_after < now else "valid")
        out.append({"serial": format_serial(r.serial), "service_id": r.service_id, "purpose": r.purpose,
                    "ca_generation": r.ca_generation, "not_before": iso(r.not_before), "not_after": iso(r.not_after),
                    "status": status, "revoked_at": iso(r.revoked_at), "revocation_reason": r.reason})
    return Response(json.dumps({"certificates": out}).encode() + b"\n", "application/json")
