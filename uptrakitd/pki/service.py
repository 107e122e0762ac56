"""PKI actions on the running daemon: issue, revoke, rotate, and keeping TLS/CRL/OCSP in step."""
from __future__ import annotations

import datetime
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from ..errors import BadRequest, Conflict, NotFound
from ..files import atomic_write
from ..trust.tls import SwappableServerContext, build_context
from . import records
from .authority import Authority, CertRecord
from .ca import AUTO_ROTATE_WHEN_LEFT, CaGeneration, create_ca, key_pem
from .crl import REASONS, CrlPublisher
from .issue import issue_client_certificate, issue_server_certificate, server_cert_due
from .ocsp import OcspResponder
from .serials import format_serial

log = Logger()


class PkiService:
    """The CA as the running daemon uses it. Every change is committed before it is acted on."""

    def __init__(self, authority: Authority, store: Any, clock: Any, to_thread: Callable[..., Deferred],
                 crls: CrlPublisher, ocsp: OcspResponder, tls: SwappableServerContext, data_dir: Any,
                 server_cert: x509.Certificate, server_key: Any, pki_addr: Callable[[], str | None],
                 hostname: str, sans: tuple[str, ...], trust_domain: str) -> None:
        self.authority = authority
        self.store = store
        self.clock = clock
        self.to_thread = to_thread
        self.crls = crls
        self.ocsp = ocsp
        self.tls = tls
        self.data_dir = data_dir
        self.server_cert = server_cert
        self.server_key = server_key
        self.pki_addr = pki_addr
        self.hostname = hostname
        self.sans = sans
        self.trust_domain = trust_domain
        self.rotation_observers: list[Callable[[dict], Any]] = []
        self.revocation_observers: list[Callable[[CertRecord], Any]] = []
        self._rotating = False
        self.tls_installed: list[Callable[[], Any]] = []

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def install_tls(self) -> None:
        """Build and install a TLS context for the current server cert, trusted CAs and CRLs."""
        now = self.now()
        trusted = self.authority.trusted(now)
        self.tls.install(build_context(self.server_cert, self.server_key, [ca.cert for ca in trusted],
                                       self.is_revoked))
        for observer in self.tls_installed:
            observer()
        log.debug("TLS context installed (trusted CA generations {gens})", gens=[ca.generation for ca in trusted])

    def is_revoked(self, serial: int) -> bool:
        """True for a serial we issued and revoked (checked at every TLS handshake)."""
        record = self.authority.records.get(serial)
        return record is not None and record.revoked_at is not None

    @inlineCallbacks
    def issue_for_service(self, csr: x509.CertificateSigningRequest, service_id: str, kind: str,
                          lifetime: datetime.timedelta) -> Any:
        """Sign a checked CSR with the active CA and record it; fires with Issued."""
        ca = self.authority.active()
        issued = issue_client_certificate(ca, csr, service_id, kind, self.trust_domain, lifetime,
                                          self.pki_addr(), self.now())
        record = yield self.store.run(records.insert_certificate, issued, service_id, "client")
        self.authority.add_record(record)
        log.info("issued certificate {serial} to service {service_id} (CA G{generation}, until {not_after})",
                 serial=format_serial(issued.serial), service_id=service_id, generation=ca.generation,
                 not_after=issued.cert.not_valid_after_utc.isoformat())
        return issued

    @inlineCallbacks
    def revoke(self, serial: int, reason: str) -> Any:
        """Revoke durably, then OCSP answers revoked at once and a CRL rebuild is scheduled."""
        if reason not in REASONS:
            raise BadRequest(f"unknown revocation reason {reason!r}; one of {', '.join(REASONS)}",
                             "invalid_reason")
        record = self.authority.records.get(serial)
        if record is None:
            raise NotFound(f"no certificate with serial {format_serial(serial)}", "certificate_not_found")
        if record.revoked_at is not None:
            raise Conflict(f"certificate {format_serial(serial)} is already revoked", "already_revoked")
        revoked_at = int(self.clock.seconds())
        yield self.store.run(records.mark_revoked, serial, revoked_at, reason)
        record.revoked_at, record.reason = revoked_at, reason
        self.ocsp.invalidate(serial)
        self.crls.request_rebuild()
        log.info("revoked {serial} ({reason})", serial=format_serial(serial), reason=reason)
        for observer in list(self.revocation_observers):
            try:
                observer(record)
            except Exception:
                log.failure("revocation observer failed")
        return record

    @inlineCallbacks
    def rotate(self) -> Any:
        """Create generation n+1, make it active, rebuild TLS/CRLs, tell observers (SPEC §4.6)."""
        active = self.authority.active()
        if active.external:
            raise BadRequest("the CA is external (--ca-cert/--ca-key); rotate it outside uptrakitd",
                             "external_ca")
        if self._rotating:
            raise Conflict("a CA rotation is already running", "rotation_in_progress")
        self._rotating = True
        try:
            generation = active.generation + 1
            pki_addr = self.pki_addr()
            cert, key = yield self.to_thread(create_ca, generation, pki_addr, self.now())
            key_file = f"ca-{generation}.key"
            yield self.to_thread(atomic_write, self.data_dir / "pki" / key_file, key_pem(key), 0o600)
            yield self.store.run(records.insert_generation, generation, cert,
                                 cert.public_bytes(serialization.Encoding.PEM).decode(), key_file, False)
            self.authority.add_generation(CaGeneration(generation, cert, key, False))
            self.ocsp.invalidate()
            now = self.now()
            bundle = self.authority.bundle_pem(now)
            yield self.to_thread(atomic_write, self.data_dir / "pki" / "ca.crt", bundle, 0o644)
            yield self.crls.rebuild()
            trusted = self.authority.trusted(now)
            if self.server_cert.issuer not in [t.cert.subject for t in trusted]:
                # Its issuer just left the trusted set. Re-issue from the *previous* CA, which both the
                # services that follow this rotation and those one rotation behind still trust.
                yield self.reissue_server_certificate(trusted[-1])
            else:
                self.install_tls()
            ca = self.authority.active()
            result = {"generation": generation, "fingerprint": ca.fingerprint,
                      "not_after": ca.not_after.isoformat(), "ca_bundle_hash": self.authority.bundle_hash(now),
                      "ca_bundle_pem": bundle.decode("ascii")}
            log.info("rotated the CA: generation {generation} ({cn}) is active, G{previous} stays trusted",
                     generation=generation, cn=ca.common_name, previous=active.generation)
            notified = 0
            outcomes = yield DeferredList([maybeDeferred(o, result) for o in list(self.rotation_observers)],
                                          consumeErrors=True)
            for ok, value in outcomes:
                if ok and isinstance(value, int):
                    notified += value
                elif not ok:
                    log.failure("rotation observer failed", value)
            result["notified"] = notified
            return result
        finally:
            self._rotating = False

    @inlineCallbacks
    def check_daily(self) -> Any:
        """Auto-rotate when < 183 days remain; re-issue the server certificate when <= 30 days remain."""
        now = self.now()
        active = self.authority.active()
        if not active.external and active.not_after - now < AUTO_ROTATE_WHEN_LEFT and not self._rotating:
            log.info("active CA expires {when}: rotating automatically", when=active.not_after.isoformat())
            yield self.rotate()
        if server_cert_due(self.server_cert, now):
            yield self.reissue_server_certificate()

    @inlineCallbacks
    def reissue_server_certificate(self, ca: CaGeneration | None = None) -> Any:
        """A new server certificate (from the active CA unless told), recorded before it is written and used."""
        issued, key = issue_server_certificate(ca or self.authority.active(), self.hostname, self.sans,
                                               self.pki_addr(), self.now())
        record = yield self.store.run(records.insert_certificate, issued, None, "server")
        self.authority.add_record(record)
        pki_dir = self.data_dir / "pki"
        yield self.to_thread(atomic_write, pki_dir / "server.key", key_pem(key), 0o600)
        yield self.to_thread(atomic_write, pki_dir / "server.crt", issued.pem, 0o644)
        self.server_cert, self.server_key = issued.cert, key
        self.install_tls()
        log.info("re-issued the server certificate {serial}", serial=format_serial(issued.serial))
        return issued
