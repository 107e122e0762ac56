"""What the operator opens first: the overview with its banners, rotation progress, the proxy doctor, the session
(four small route classes, each with the components it reads)."""
from __future__ import annotations

import datetime
from typing import Any, Protocol

from twisted.internet.defer import inlineCallbacks

from uptrakitd.registry.admin_tokens import AdminTokenRegistry
from uptrakitd.registry.directory import ServiceDirectory
from ...errors import Unauthorized
from uptrakitd.process.offload import in_thread
from ...pki.authority import CertificateAuthority
from ...pki.ca import AUTO_ROTATE_WHEN_LEFT
from ...pki.crl import CrlPublisher
from ...pki.serials import format_serial
from uptrakitd.registry.runtime_settings import RuntimeSettings
from ...trust.doctor import IdentityDoctor
from ...trust.proxies import is_trusted
from ..router import Route, bearer_token, iso, route
from .services import Connections

SERVER_CERT_WARN = datetime.timedelta(days=30)
DAY = 86400


class ServerCert(Protocol):
    def not_after(self) -> datetime.datetime: ...


def _name(s: Any) -> str:
    return str(s.friendly_name or s.hostname or s.id)


class RotationProgress:
    """`GET /api/v1/rotation`: approved services by the generation of their current certificate (the
    truth in the records, not a log of pushes, so it is right after a restart too)."""

    def __init__(self, ca: CertificateAuthority, directory: ServiceDirectory, connections: Connections) -> None:
        self.ca = ca
        self.directory = directory
        self.connections = connections

    def routes(self) -> list[Route]:
        return [route("GET", r"/api/v1/rotation", lambda request: self.progress(self.ca.clock.seconds()),
                      admin=True)]

    def progress(self, now_ts: float) -> dict[str, Any]:
        state = self.ca.state
        active = state.active().generation
        last = self.connections.last_rotation
        renewed, old, without = [], [], []
        for s in self.directory:
            if s.status != "approved":
                continue
            cert = state.current_for(s.id, now_ts)
            item = {"id": s.id, "name": _name(s),
                    "connected": self.directory.holder(s, self.connections.is_connected(s.id))[0],
                    "ca_generation": cert.ca_generation if cert else None}
            if cert is None:
                without.append(item)
            elif cert.ca_generation == active:
                renewed.append(item)
            else:
                old.append(item)
        this_one = last is not None and last["generation"] == active
        return {"generation": active, "rotating": self.ca.rotating,
                "rotated_at": iso(last["at"]) if last and this_one else None,
                "notified": last["notified"] if last and this_one else None,
                "renewed": renewed, "on_old_generation": old, "without_certificate": without,
                "complete": not old and not self.ca.rotating}


class OverviewRoutes:
    """`GET /api/v1/overview`: what the operator opens first, with its banners."""

    def __init__(self, ca: CertificateAuthority, crls: CrlPublisher, runtime: RuntimeSettings,
                 directory: ServiceDirectory, connections: Connections, server_cert: ServerCert,
                 rotation: RotationProgress) -> None:
        self.ca = ca
        self.crls = crls
        self.runtime = runtime
        self.directory = directory
        self.connections = connections
        self.server_cert = server_cert
        self.rotation = rotation

    def routes(self) -> list[Route]:
        return [route("GET", r"/api/v1/overview", self.overview, admin=True)]

    def overview(self, request: Any) -> Any:
        now = self.ca.now()
        now_ts = now.timestamp()
        state = self.ca.state
        window = self.runtime.renewal_window_hours() * 3600
        names = {s.id: _name(s) for s in self.directory}
        records = list(state.records.values())  # snapshot; counting 100 000 happens off the reactor
        d = in_thread(self.ca.clock, _certificate_counts, records, now_ts, window, names)
        return d.addCallback(self._overview, now)

    def _overview(self, counts: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
        state = self.ca.state
        services = [s for s in self.directory if s.status != "deactivated"]
        banners: list[dict[str, str]] = []

        def ca_json(ca: Any) -> dict[str, Any] | None:
            if ca is None:
                return None
            crl = self.crls.current.get(ca.generation)
            age = int((now - crl.this_update).total_seconds()) if crl else None
            if crl is None or age is not None and age > self.crls.validity.total_seconds():
                banners.append({"code": "crl_stale", "severity": "error",
                                "text": f"the CRL of CA generation {ca.generation} is older than its validity "
                                        f"({int(self.crls.validity.total_seconds() // 3600)} h): proxies that check "
                                        "CRLs will refuse every client. Check the log for CRL rebuild errors."})
            return {"generation": ca.generation, "cn": ca.common_name, "not_after": ca.not_after.isoformat(),
                    "days_left": (ca.not_after - now).days, "external": ca.external, "custody": ca.custody,
                    "crl_number": crl.number if crl else None, "crl_age_seconds": age,
                    "crl_entries": crl.entries if crl else None}

        active, previous = state.active(), state.previous(now)
        active_json, previous_json = ca_json(active), ca_json(previous)
        if active.not_after - now < AUTO_ROTATE_WHEN_LEFT:
            banners.append({"code": "ca_rotation_due", "severity": "error" if active.external else "warning",
                            "text": f"the active CA expires in {(active.not_after - now).days} days, inside the "
                                    f"{AUTO_ROTATE_WHEN_LEFT.days}-day rotation threshold: "
                                    + ("rotate the external CA and restart with the new files." if active.external
                                       else "rotate it (Rotate CA on the PKI page) before proxies and agents "
                                            "lose trust.")})
        server_left = self.server_cert.not_after() - now
        if server_left < SERVER_CERT_WARN:
            banners.append({"code": "server_certificate_expiring", "severity": "error",
                            "text": f"the controller's server certificate expires in {server_left.days} days and "
                                    "was not re-issued: check the log for 'server certificate' errors."})
        network = self.runtime.network
        if network.trusts_everything():
            banners.append({"code": "trusts_everything", "severity": "error",
                            "text": "trusted_proxies contains 0.0.0.0/0 or ::/0: ANY client can claim any identity "
                                    "through forwarded headers. Trust only your proxies' addresses (Network page)."})
        progress = self.rotation.progress(now.timestamp())
        if not progress["complete"]:
            banners.append({"code": "rotation_in_progress", "severity": "info",
                            "text": f"CA rotation to generation {progress['generation']}: "
                                    f"{len(progress['on_old_generation'])} service(s) still on an older "
                                    "generation. Keep the previous CA on the proxies until this reaches 0 "
                                    "(Rotation page)."})
        pending = sum(1 for s in services if s.status == "pending")
        if pending:
            banners.append({"code": "services_pending", "severity": "info",
                            "text": f"{pending} service(s) wait for approval (Services page)."})
        return {"now": iso(now.timestamp()), "active_ca": active_json, "previous_ca": previous_json,
                "ca_bundle_hash": self.ca.bundle_hash(),
                "server_certificate": {"not_after": self.server_cert.not_after().isoformat(),
                                       "days_left": server_left.days},
                "services": {"total": len(services),
                             "connected": sum(self.directory.holder(s, self.connections.is_connected(s.id))[0]
                                              for s in services),
                             "pending": pending},
                "certificates": counts, "renewal_window_hours": self.runtime.renewal_window_hours(),
                "rotation": {"in_progress": self.ca.rotating or not progress["complete"],
                             "generation": progress["generation"]},
                "banners": banners}



class DiagnosticsRoutes:
    """`GET /api/v1/diagnostics/identity`: the proxy doctor's record and advice."""

    def __init__(self, doctor: IdentityDoctor, runtime: RuntimeSettings) -> None:
        self.doctor = doctor
        self.runtime = runtime

    def routes(self) -> list[Route]:
        return [route("GET", r"/api/v1/diagnostics/identity", self.diagnostics, admin=True)]

    def diagnostics(self, request: Any) -> dict[str, Any]:
        net = self.runtime.network
        configured = {"forwarded_client_cert_pem_header": net.forwarded_client_cert_pem_header,
                      "forwarded_client_cert_info_header": net.forwarded_client_cert_info_header,
                      "forwarded_client_verify_header": net.forwarded_client_verify_header}
        report = self.doctor.report(net.real_ip_header, configured,
                                    lambda peer: is_trusted(peer, net.trusted_proxies))
        for peer in report["peers"]:
            peer["first_seen"], peer["last_seen"] = iso(peer["first_seen"]), iso(peer["last_seen"])
        report["trusted_proxies"] = [str(n) for n in net.trusted_proxies]
        report["real_ip_header"] = net.real_ip_header
        report["configured_headers"] = configured
        return report


class SessionRoutes:
    """`GET /api/v1/session`: who the presented admin token is (name, role), for the UI's header."""

    def __init__(self, admin_tokens: AdminTokenRegistry) -> None:
        self.admin_tokens = admin_tokens

    def routes(self) -> list[Route]:
        return [route("GET", r"/api/v1/session", self.session, admin=True)]

    @inlineCallbacks
    def session(self, request: Any) -> Any:
        token = bearer_token(request)
        who = yield self.admin_tokens.session(token or "")
        if who is None:  # revoked between the router's check and here
            raise Unauthorized("admin token not recognized")
        return who


def _certificate_counts(records: list[Any], now_ts: float, window: float, names: dict[str, str]) -> dict[str, Any]:
    expiring, revoked_24h, valid = [], 0, 0
    for r in records:
        if r.revoked_at is not None:
            if r.revoked_at >= now_ts - DAY:
                revoked_24h += 1
            continue
        if r.purpose != "client" or r.not_after <= now_ts:
            continue
        valid += 1
        if r.not_after - now_ts <= window:
            expiring.append(r)
    expiring.sort(key=lambda r: r.not_after)
    return {"valid": valid, "revoked_last_24h": revoked_24h, "expiring_in_window": len(expiring),
            "expiring": [{"serial": format_serial(r.serial), "service": names.get(r.service_id or "", r.service_id),
                          "not_after": iso(r.not_after)} for r in expiring[:20]]}
