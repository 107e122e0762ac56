"""Admin PKI routes: PKI settings, service-certificate settings, rotation, revocation, certificate list."""
from __future__ import annotations

import datetime

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ... import __version__
from ...errors import BadRequest, NotFound
from uptrakitd.process.offload import in_thread
from ...pki.authority import CertificateAuthority
from ...pki.crl import CrlPublisher
from ...pki.ocsp import OCSP_VALIDITY
from ...pki.serials import BadSerial, format_serial, parse_serial
from uptrakitd.registry.runtime_settings import RuntimeSettings
from ...store import certificates
from ..router import Response, Route, int_field, iso, json_body, route
from .audit import said_by


class PkiSettingsRoutes:
    """GET settings/pki and PUT settings/service-certificates."""

    def __init__(self, ca: CertificateAuthority, crls: CrlPublisher, runtime: RuntimeSettings) -> None:
        self.ca = ca
        self.crls = crls
        self.runtime = runtime

    def routes(self) -> list[Route]:
        return [
            route("GET", r"/api/v1/settings/pki", self.pki_settings, admin=True),
            route("PUT", r"/api/v1/settings/service-certificates", self.put_service_certs, admin=True),
        ]

    def pki_settings(self, request: Any) -> dict:
        now = self.ca.now()
        def describe(ca: Any) -> dict | None:
            if ca is None:
                return None
            crl = self.crls.current.get(ca.generation)
            return {"generation": ca.generation, "cn": ca.common_name, "fingerprint": ca.fingerprint,
                    "not_after": ca.not_after.isoformat(), "external": ca.external, "custody": ca.custody,
                    "crl_number": crl.number if crl else None,
                    "crl_age_seconds": int((now - crl.this_update).total_seconds()) if crl else None,
                    "crl_entries": crl.entries if crl else None}
        state = self.ca.state
        return {"active_ca": describe(state.active()), "previous_ca": describe(state.previous(now)),
                "ca_bundle_hash": self.ca.bundle_hash(),
                "service_certificates": {"lifetime_hours": self.runtime.service_certs.lifetime_hours,
                                         "renewal_window_hours": self.runtime.renewal_window_hours()},
                "ocsp_validity_seconds": int(OCSP_VALIDITY.total_seconds()),
                "crl_validity_seconds": int(self.crls.validity.total_seconds()),
                "trust_domain": self.ca.trust_domain, "pki_addr": self.runtime.network.pki_addr,
                "version": __version__}

    @inlineCallbacks
    def put_service_certs(self, request: Any) -> Any:
        body = json_body(request, {"lifetime_hours", "renewal_window_hours"})
        changes: dict[str, Any] = {}
        if "lifetime_hours" in body:
            changes["lifetime_hours"] = int_field(body, "lifetime_hours", 1, 730 * 24, nullable=False)
        if "renewal_window_hours" in body:
            changes["renewal_window_hours"] = int_field(body, "renewal_window_hours", 1, 730 * 24)
        new = yield self.runtime.update_service_certs(changes, said_by(request))
        return {"lifetime_hours": new.lifetime_hours, "renewal_window_hours": self.runtime.renewal_window_hours()}


class CertificateRoutes:
    """Rotation, revocation and the certificate list."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def routes(self) -> list[Route]:
        return [
            route("POST", r"/api/v1/settings/rotate-ca", self.rotate, admin=True),
            route("POST", r"/api/v1/certificates/(?P<serial>[^/]+)/revoke", self.revoke, admin=True),
            route("GET", r"/api/v1/certificates", self.list_certificates, admin=True),
            route("GET", r"/api/v1/certificates/(?P<serial>[0-9A-Fa-f:]{1,100})", self.get_certificate, admin=True),
        ]

    def rotate(self, request: Any) -> Any:
        json_body(request, ())  # takes no fields: anything sent is a mistake worth reporting
        return self.ca.rotate(said_by(request))

    @inlineCallbacks
    def revoke(self, request: Any, serial: str) -> Any:
        try:
            number = parse_serial(serial)
        except BadSerial as e:
            raise BadRequest(str(e), "invalid_serial") from None
        body = json_body(request, {"reason"})
        reason = body.get("reason", "unspecified")
        if not isinstance(reason, str):
            raise BadRequest("reason must be a string", "invalid_reason")
        record = yield self.ca.revoke(number, reason, said_by(request))
        return {"serial": format_serial(record.serial), "revoked": True, "reason": record.reason,
                "revoked_at": iso(record.revoked_at), "service_id": record.service_id}

    @inlineCallbacks
    def get_certificate(self, request: Any, serial: str) -> Any:
        """One certificate whole: what it says (subject, names, SPIFFE ID, validity), its issuer's custody,
        its revocation, and its PEM."""
        try:
            number = parse_serial(serial)
        except BadSerial as e:
            raise BadRequest(str(e), "invalid_serial") from None
        record = self.ca.state.records.get(number)
        pem = yield self.ca.store.run(certificates.pem_of, format_serial(number))
        if record is None or pem is None:
            raise NotFound(f"no certificate with serial {format_serial(number)}", "certificate_not_found")
        issuer = self.ca.state.generations.get(record.ca_generation)
        described = yield in_thread(self.ca.clock, _describe_certificate, pem)
        now = int(self.ca.clock.seconds())
        return dict(described, serial=format_serial(number), service_id=record.service_id, purpose=record.purpose,
                    ca_generation=record.ca_generation, issuer_custody=issuer.custody if issuer else None,
                    status=_status(record, now, self._trusted()), revoked_at=iso(record.revoked_at),
                    revocation_reason=record.reason, pem=pem)

    def list_certificates(self, request: Any) -> Any:
        def arg(name: str) -> str | None:
            value = request.args.get(name.encode(), [None])[0]
            return value.decode("utf-8", "replace") if value is not None else None
        wanted, status, q, limit_text = arg("service_id"), arg("status"), arg("q"), arg("limit")
        if status is not None and status not in STATUSES:
            raise BadRequest("status: must be valid, revoked, expired or untrusted", "invalid_filter")
        limit = None
        if limit_text is not None:
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100_000:
                raise BadRequest("limit: must be an integer from 1 to 100000", "invalid_filter")
            limit = int(limit_text)
        state = self.ca.state
        if wanted:
            records = list(state.by_service.get(wanted, ()))
        else:
            records = list(state.records.values())  # snapshot; filtering and formatting happen off the reactor
        return in_thread(self.ca.clock, _certificates_json, records, int(self.ca.clock.seconds()), self._trusted(),
                         status, (q or "").strip().upper() or None, limit)

    def _trusted(self) -> frozenset[int]:
        """The generations in the trust bundle now."""
        now = datetime.datetime.fromtimestamp(self.ca.clock.seconds(), datetime.timezone.utc)
        return frozenset(ca.generation for ca in self.ca.state.trusted(now))


def _describe_certificate(pem: str) -> dict[str, Any]:
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(n, "value", n)) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(), "sans": names,
            "spiffe_id": next((n for n in names if n.startswith("spiffe://")), None),
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat()}


def _status(r: Any, now: int, trusted: frozenset[int]) -> str:
    """revoked, expired, untrusted (its issuer left the trust bundle: nothing accepts it any more) or valid."""
    if r.revoked_at:
        return "revoked"
    if r.not_after < now:
        return "expired"
    return "valid" if r.ca_generation in trusted else "untrusted"


STATUSES = ("valid", "revoked", "expired", "untrusted")


def _certificates_json(records: list[Any], now: int, trusted: frozenset[int], status: str | None = None,
                       q: str | None = None, limit: int | None = None) -> Response:
    """In issue order (the records' order; not_before ties within a second); with `limit`, the newest `limit`
    that match, and `total`: how many matched."""
    chosen = []
    for r in records:
        if status is not None and _status(r, now, trusted) != status:
            continue
        if q is not None and not (format_serial(r.serial).startswith(q) or (r.service_id or "").upper() == q):
            continue
        chosen.append(r)
    total = len(chosen)
    if limit is not None:
        chosen = chosen[-limit:]
    out = []
    for r in chosen:
        out.append({"serial": format_serial(r.serial), "service_id": r.service_id, "purpose": r.purpose,
                    "ca_generation": r.ca_generation, "not_before": iso(r.not_before), "not_after": iso(r.not_after),
                    "status": _status(r, now, trusted), "revoked_at": iso(r.revoked_at),
                    "revocation_reason": r.reason})
    return Response(json.dumps({"certificates": out, "total": total}).encode() + b"\n", "application/json")
